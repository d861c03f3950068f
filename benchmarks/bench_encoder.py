"""Cost of the travel term per training step: frozen CLIP encoder against trainable weights.

One generator step needs, from the encoder,

1. the source embeddings E(x) under ``torch.no_grad()``;
2. the generated embeddings E(G(x)), forward with autograd;
3. the backward of ``travel_loss(E(x), E(G(x)))`` down to the generated images.

With :class:`FrozenCLIPEncoder` no weight requires a gradient, so step 3 computes only the
gradients with respect to activations. The baseline is the same encoder with
``requires_grad=True`` weights, what a naive port that forgets to freeze CLIP computes: every
linear layer then also computes its weight gradient. The generator itself is left out (the
images G(x) are a leaf tensor), so the table isolates the encoder's share of the step.

Random weights from a small config (``FrozenCLIPEncoder.from_config``) stand in for a checkpoint:
the cost depends on the shapes, not the values. Both variants run interleaved in the same
process, after ``--warmup`` steps each, ``--repeats`` times; the tables report the median and the
best step (on a shared machine other work only ever adds time, so the best is the steadier
figure there, and the target is judged on it).

    python benchmarks/bench_encoder.py               # hidden 256, 6 layers, 224 px, batch 8
    python benchmarks/bench_encoder.py --threads 1   # steadier on a shared machine
    python benchmarks/bench_encoder.py --hidden 1024 --layers 24 --heads 16 --patch 14 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from travel_loss import travel_loss
from travel_loss.encoder import FrozenCLIPEncoder

PHASES = ("source forward", "generated forward", "backward", "step")


def build_encoder(args: argparse.Namespace, trainable: bool) -> FrozenCLIPEncoder:
    config = dict(
        image_size=args.image_size,
        patch_size=args.patch,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        projection_dim=args.hidden,
    )
    encoder = FrozenCLIPEncoder.from_config(config, seed=0, crop="center", check_range=False)
    encoder.model.requires_grad_(trainable)
    return encoder.to(args.device)


def timed_step(encoder: FrozenCLIPEncoder, source: torch.Tensor, generated: torch.Tensor) -> dict:
    """Seconds of each phase of one travel-term step, and of the whole step."""
    encoder.model.zero_grad(set_to_none=True)
    generated.grad = None
    marks = [_now(source.device)]
    with torch.no_grad():
        emb_src = encoder(source)
    marks.append(_now(source.device))
    emb_gen = encoder(generated)
    marks.append(_now(source.device))
    travel_loss(emb_src, emb_gen, check_finite=False).backward()
    marks.append(_now(source.device))
    phases = {name: end - start for name, start, end in zip(PHASES, marks, marks[1:])}
    phases["step"] = marks[-1] - marks[0]
    return phases


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (MLP: 4x)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="CLIP input side")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=256, help="side of the images fed in")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    encoders = {"frozen": build_encoder(args, False), "trainable": build_encoder(args, True)}
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.input_size, args.input_size)
    source = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    generated = (torch.rand(shape, generator=generator) * 2 - 1).to(device).requires_grad_(True)

    for _ in range(args.warmup):
        for encoder in encoders.values():
            timed_step(encoder, source, generated)
    samples: dict[str, list[dict]] = {name: [] for name in encoders}
    for _ in tqdm(range(args.repeats), desc="steps", leave=False):
        for name, encoder in encoders.items():  # interleaved: drifting load hits both alike
            samples[name].append(timed_step(encoder, source, generated))

    parameters = sum(p.numel() for p in encoders["frozen"].model.parameters())
    print(
        f"travel term per step: ViT hidden {args.hidden}, {args.layers} layers, patch "
        f"{args.patch}, {args.image_size} px crop of {args.input_size} px, batch {args.batch}, "
        f"{parameters / 1e6:.1f} M parameters; {args.device}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; {args.repeats} steps each, ms"
    )
    for statistic, reduce in (("median", statistics.median), ("best", min)):
        ratios = print_table(statistic, reduce, samples)
    verdict = "meets" if ratios["backward"] <= 0.7 else "misses"
    print(f"best frozen/trainable backward {ratios['backward']:.2f}x: {verdict} the 0.7x target")


def print_table(statistic: str, reduce, samples: dict[str, list[dict]]) -> dict[str, float]:
    """Prints one table of ``reduce`` over the steps; returns frozen/trainable per phase."""
    value = {
        name: {phase: reduce(step[phase] for step in steps) for phase in PHASES} for name, steps in samples.items()
    }
    header = f"{statistic:<10} | " + " | ".join(f"{phase:>17}" for phase in PHASES)
    print("\n" + header)
    print("-" * len(header))
    for name, phases in value.items():
        print(f"{name:<10} | " + " | ".join(f"{1e3 * phases[p]:>17.1f}" for p in PHASES))
    ratios = {p: value["frozen"][p] / value["trainable"][p] for p in PHASES}
    print(f"{'ratio':<10} | " + " | ".join(f"{ratios[p]:>16.2f}x" for p in PHASES))
    return ratios


if __name__ == "__main__":
    main()
