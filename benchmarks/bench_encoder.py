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

A second table prices shared random views (:class:`travel_loss.RandomViews`, the light recipe
``shift=2, blur=0.5, noise=0.1``): the frozen encoder's whole step with K views for each of
``--view-counts`` against the same step without views, interleaved likewise. The encoder runs K
times per image, so the ratio should be close to K; the views themselves add little.

    python benchmarks/bench_encoder.py               # hidden 256, 6 layers, 224 px, batch 8
    python benchmarks/bench_encoder.py --threads 1   # steadier on a shared machine
    python benchmarks/bench_encoder.py --hidden 1024 --layers 24 --heads 16 --patch 14 --device cuda
    python benchmarks/bench_encoder.py --hidden 64 --layers 2 --heads 2 --image-size 64 --patch 8 \
        --input-size 72 --threads 1                  # tiny: a quick check of both tables
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from travel_loss import RandomViews, travel_loss, travel_loss_over_views
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


def timed_views_step(encoder: FrozenCLIPEncoder, source: torch.Tensor, generated: torch.Tensor, count: int) -> float:
    """Seconds of one whole travel-term step with ``count`` shared random views (0: no views)."""
    generated.grad = None
    start = _now(source.device)
    if count == 0:
        with torch.no_grad():
            emb_src = encoder(source)
        loss = travel_loss(emb_src, encoder(generated), check_finite=False)
    else:
        views = RandomViews(count=count, shift=2, blur=0.5, noise=0.1)
        loss = travel_loss_over_views(encoder, source, generated, views, check_finite=False)
    loss.backward()
    return _now(source.device) - start


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
    parser.add_argument("--view-counts", type=int, nargs="*", default=[1, 2, 4], help="K of the views table")
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
    if args.view_counts:
        print_views_table(args, encoders["frozen"], source, generated)


def print_views_table(
    args: argparse.Namespace, encoder: FrozenCLIPEncoder, source: torch.Tensor, generated: torch.Tensor
) -> None:
    """Times the frozen encoder's step with K shared random views against no views, interleaved."""
    counts = [0, *args.view_counts]
    for _ in range(args.warmup):
        for count in counts:
            timed_views_step(encoder, source, generated, count)
    samples: dict[int, list[float]] = {count: [] for count in counts}
    for _ in tqdm(range(args.repeats), desc="views", leave=False):
        for count in counts:
            samples[count].append(timed_views_step(encoder, source, generated, count))
    print("\nshared random views (shift 2, blur p 0.5, noise 0.1), frozen encoder, whole step, ms")
    header = f"{'views':<10} | {'median':>9} | {'best':>9} | {'best / no views':>15}"
    print(header)
    print("-" * len(header))
    baseline = min(samples[0])
    for count in counts:
        name = "none" if count == 0 else f"K = {count}"
        median, best = statistics.median(samples[count]), min(samples[count])
        print(f"{name:<10} | {1e3 * median:>9.1f} | {1e3 * best:>9.1f} | {best / baseline:>14.2f}x")


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
