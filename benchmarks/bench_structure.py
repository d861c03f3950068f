"""The cost of the structure term's token path against the pooled path, one generator-side pass each.

Both paths embed a batch of translations with gradient through a frozen ViT
(:class:`travel_loss.FrozenCLIPEncoder` with random weights, from a config, so nothing is
downloaded) and back-propagate to the images:

- ``pooled``: ``travel_loss(emb_src, encoder(fake))``, the travel loss alone;
- ``tokens global``: ``encoder.forward_with_tokens(fake)`` (the same forward, patch tokens kept),
  ``travel_loss + self_similarity_loss`` over all L x L token pairs (Splice-style);
- ``tokens local``: the same with 5 x 5 windows around 64 sampled centres (F-LSeSim-style).

Time is CPU time (``time.process_time``, the sum over threads: a busy shared machine adds wall time
but little CPU time) per call, the best of ``--repeats`` after one warm-up; on CUDA wall time after
synchronising. The ratio is against ``pooled`` measured in the same run.

    python benchmarks/bench_structure.py                                 # ViT-B/16 shape at 224 px, batch 8
    python benchmarks/bench_structure.py --layers 4 --batch 4             # a lighter tower
    python benchmarks/bench_structure.py --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from travel_loss import FrozenCLIPEncoder, self_similarity_loss, travel_loss


def _best_seconds(step: Callable[[], None], repeats: int, device: str) -> float:
    clock = time.perf_counter if device == "cuda" else time.process_time
    step()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    config = dict(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), image_size=args.image_size, patch_size=args.patch,
        projection_dim=512,
    )  # fmt: skip
    encoder = FrozenCLIPEncoder.from_config(config, seed=0, check_range=False).to(args.device)
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=generator) * 2 - 1).to(args.device)
    fake = (torch.rand(x.shape, generator=generator) * 2 - 1).to(args.device).requires_grad_(True)
    with torch.no_grad():
        emb_src, tokens_src = encoder.forward_with_tokens(x)
    grid = encoder.token_grid

    def pooled() -> None:
        fake.grad = None
        travel_loss(emb_src, encoder(fake)).backward()

    def tokens(window: int | None, positions: int | None) -> Callable[[], None]:
        def step() -> None:
            fake.grad = None
            emb_gen, tokens_gen = encoder.forward_with_tokens(fake)
            structure = self_similarity_loss(tokens_src, tokens_gen, grid=grid, window=window, positions=positions)
            (travel_loss(emb_src, emb_gen) + structure).backward()

        return step

    cases = {
        "pooled": pooled,
        "tokens global": tokens(None, None),
        "tokens local (5x5, 64 centres)": tokens(5, min(64, (grid[0] - 4) * (grid[1] - 4))),
    }
    print(
        f"frozen CLIP-shaped ViT: {args.layers} layers, width {args.hidden}, {args.image_size} px, patch {args.patch} "
        f"({grid[0]}x{grid[1]} tokens), batch {args.batch}, {args.device}; forward + backward to the images"
    )
    baseline = None
    for name, step in cases.items():
        seconds = _best_seconds(step, args.repeats, args.device)
        baseline = baseline or seconds
        print(f"{name:32s} {seconds * 1e3:9.1f} ms   {seconds / baseline:5.3f} x pooled")


if __name__ == "__main__":
    main()
