"""Can a translation game a frozen embedder? The travel loss with and without shared random views.

A frozen embedder is a fixed target: an optimiser (a generator, or here the pixels themselves)
can move the embeddings where the travel loss wants them with small patterns the embedder
over-reacts to, while what the images show stays wrong. Measured in the (retired) toy-street study: a
squared-Euclidean travel loss at weight 1000 went *below* the ideal translation's loss while every
semantic flip stayed; two shared random views stopped it.

The probe, on 16 px toy scenes (a background and three coloured rectangles, N = 8):

- ``ideal``: the translation we want, a palette change of each scene (layout kept);
- ``wrong``: the ideal translations rolled by one, i.e. every translation shows another scene's
  layout (every "semantic flip" made);
- the probe starts from ``wrong`` (or from ``ideal``) and optimises the pixels alone with Adam
  against the travel loss through the frozen embedder, within a per-pixel budget of ``eps``
  (5 % of the [-1, 1] range by default): ``p = clamp(start + eps * tanh(theta), -1, 1)``.

The embedder is gamed when the probe's loss falls below the ideal translation's (ratio < 1) while
the content stays wrong (the pixels moved by at most ``eps``). With views the loss is the expected
view-averaged loss, estimated over fixed evaluation draws, common to the ideal and the probe.

The embedder: a random, frozen ViT-style patch embedder (a 4x4 stride-4 patch embedding, ReLU, a
linear map to 64 dimensions), the front end of the random CLIP that the generator gamed in the
study; ``--embedder linear`` is a random linear projection of the pixels.

    python benchmarks/bench_gaming.py                 # the table, about a minute on one thread
    python benchmarks/bench_gaming.py --steps 400 --eps 0.05
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from travel_loss import RandomViews, travel_loss, travel_loss_over_views
from travel_loss.loss import Distance

# The recipe measured in the (retired) toy-street study.
LIGHT_VIEWS = RandomViews(count=2, shift=2, blur=0.5, noise=0.1)
# DiffAugment's colour and translation (an eighth of 16 px) and CLIP guidance's crops, four views.
HEAVY_VIEWS = RandomViews(count=4, crop=0.25, shift=2, brightness=0.25, saturation=0.5, contrast=0.25, noise=0.05)


def toy_scenes(count: int, size: int, generator: torch.Generator) -> Tensor:
    """(count, 3, size, size) scenes in [-1, 1]: a plain background and three coloured rectangles."""
    scenes = (torch.rand(count, 3, 1, 1, generator=generator) * 0.6 - 0.3).expand(count, 3, size, size).clone()
    for scene in scenes:
        for _ in range(3):
            height, width = torch.randint(size // 4, size // 2 + 1, (2,), generator=generator).tolist()
            top, left = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
            scene[:, top : top + height, left : left + width] = torch.rand(3, 1, 1, generator=generator) * 1.6 - 0.8
    return scenes


def palette_translation(scenes: Tensor, strength: float = 0.6) -> Tensor:
    """The ideal translation: a palette change (channels rotated, contrast 0.7, an offset), layout kept."""
    offset = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    return (1 - strength) * scenes + strength * (0.7 * scenes.roll(1, dims=1) + offset)


def frozen_embedder(kind: str, size: int, seed: int = 0) -> nn.Module:
    """A random frozen embedder of (N, 3, size, size) images: ``"patch"`` (ViT-style) or ``"linear"``."""
    torch.manual_seed(seed)
    if kind == "patch":
        patches = (size // 4) ** 2
        net = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(32 * patches, 64))
    elif kind == "linear":
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 64, bias=False))
    else:
        raise ValueError(f"kind: expected 'patch' or 'linear', got {kind!r}")
    return net.eval().requires_grad_(False)


def loss(
    embedder: nn.Module,
    x: Tensor,
    translations: Tensor,
    views: RandomViews | None,
    distance: Distance,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The travel loss of one step: plain, or under one draw of the views."""
    if views is None:
        return travel_loss(embedder(x), embedder(translations), distance=distance)
    return travel_loss_over_views(embedder, x, translations, views, generator=generator, distance=distance)


def expected_loss(
    embedder: nn.Module,
    x: Tensor,
    translations: Tensor,
    views: RandomViews | None,
    distance: Distance,
    draws: int = 16,
    seed: int = 1234,
) -> float:
    """The loss, averaged over ``draws`` fixed draws of the views (the same draws for every call)."""
    if views is None:
        draws = 1
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        total = sum(float(loss(embedder, x, translations, views, distance, generator)) for _ in range(draws))
    return total / draws


@dataclass(frozen=True)
class GamingResult:
    ideal_loss: float  # the ideal translation's loss
    start_loss: float  # the probe's starting point's loss
    reached_loss: float  # the probe's loss after optimisation
    change: float  # mean |probe - start|: how much the probe changed the pixels (at most eps)
    start_distance: float  # mean |start - ideal|: how far the start's content is from the ideal's
    reached_distance: float  # mean |probe - ideal|: the same after the probe
    seconds: float

    @property
    def ratio(self) -> float:
        """Reached loss / ideal loss: below 1, a translation with the start's content beats the ideal."""
        return self.reached_loss / self.ideal_loss


def gaming_probe(
    embedder: nn.Module,
    x: Tensor,
    ideal: Tensor,
    start: Tensor,
    views: RandomViews | None,
    *,
    distance: Distance = "squared_euclidean",
    eps: float = 0.1,
    steps: int = 200,
    lr: float = 0.05,
    seed: int = 0,
) -> tuple[GamingResult, Tensor]:
    """Optimises the pixels of ``start`` (within ``eps`` per pixel) against the travel loss alone.

    Returns the figures (losses as :func:`expected_loss` under the same ``views``) and the probe's
    translations.
    """
    began = time.perf_counter()
    theta = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def translations() -> Tensor:
        return (start + eps * torch.tanh(theta)).clamp(-1, 1)

    for _ in range(steps):
        optimizer.zero_grad()
        loss(embedder, x, translations(), views, distance, generator).backward()
        optimizer.step()
    with torch.no_grad():
        reached = translations()
    result = GamingResult(
        ideal_loss=expected_loss(embedder, x, ideal, views, distance),
        start_loss=expected_loss(embedder, x, start, views, distance),
        reached_loss=expected_loss(embedder, x, reached, views, distance),
        change=float((reached - start).abs().mean()),
        start_distance=float((start - ideal).abs().mean()),
        reached_distance=float((reached - ideal).abs().mean()),
        seconds=time.perf_counter() - began,
    )
    return result, reached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default="patch", choices=["patch", "linear"])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.1, help="per-pixel budget of the probe")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x = toy_scenes(args.batch, args.size, torch.Generator().manual_seed(args.seed))
    ideal = palette_translation(x)
    wrong = ideal.roll(1, dims=0)
    embedder = frozen_embedder(args.embedder, args.size, args.seed)
    all_views: dict[str, RandomViews | None] = {"none": None, "light": LIGHT_VIEWS, "heavy": HEAVY_VIEWS}
    print(
        f"gaming probe: {args.embedder} embedder, {args.batch} scenes of {args.size} px, {args.steps} Adam steps "
        f"lr {args.lr}, seed {args.seed}, torch threads {torch.get_num_threads()}\n"
        f"light = {LIGHT_VIEWS}\nheavy = {HEAVY_VIEWS}\n"
        "ratio = the probe's loss / the ideal translation's loss (< 1: gamed); change = mean |probe - start|; "
        "to ideal = mean |translation - ideal| at the start > after the probe; "
        "'light re-score' = the no-view probe's translations scored under the light views"
    )
    header = (
        f"{'distance':<18} {'start':<6} {'views':<6} | {'ideal':>9} {'start':>9} {'reached':>9} {'ratio':>7} | "
        f"{'change':>6} {'to ideal':>11} | {'s':>5}"
    )
    print(f"\nper-pixel budget eps {args.eps}\n" + header + "\n" + "-" * len(header))
    for distance in ("squared_euclidean", "cosine"):
        for start_name, start in (("wrong", wrong), ("ideal", ideal)):
            for views_name, views in all_views.items():
                result, reached = gaming_probe(
                    embedder, x, ideal, start, views, distance=distance, eps=args.eps, steps=args.steps, lr=args.lr
                )
                print(
                    f"{distance:<18} {start_name:<6} {views_name:<6} | {result.ideal_loss:>9.3g} "
                    f"{result.start_loss:>9.3g} {result.reached_loss:>9.3g} {result.ratio:>7.3f} | "
                    f"{result.change:>6.3f} {result.start_distance:>5.3f}>{result.reached_distance:<5.3f} | "
                    f"{result.seconds:>5.1f}"
                )
                if views is None:
                    rescored = expected_loss(embedder, x, reached, LIGHT_VIEWS, distance)
                    ideal_loss = expected_loss(embedder, x, ideal, LIGHT_VIEWS, distance)
                    print(f"{'':<18} {start_name:<6} {'light re-score':<14} {'':>23} {rescored / ideal_loss:>7.3f} |")

    print("\nthe budget a wrong translation needs to beat the ideal: ratio per eps, squared_euclidean, wrong start")
    header = f"{'eps':>5} | " + " | ".join(f"{name:>13}" for name in all_views)
    print(header + "\n" + "-" * len(header))
    for eps in args.budgets:
        cells = []
        for views in all_views.values():
            result, _ = gaming_probe(embedder, x, ideal, wrong, views, eps=eps, steps=args.steps, lr=args.lr)
            cells.append(f"{result.ratio:>6.3f} ({result.change:.3f})")
        print(f"{eps:>5.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
