r"""The toy-street study: does the travel loss keep the semantics of a translation?

``python reference/train.py --demo --out DIR`` (or :func:`run_demo`) trains on the toy streets
(:class:`reference.data.ToyStreets`, A "game" -> B "city") on a CPU, with no download, one
generator per value of lambda, and scores each on held-out A scenes against their label maps
(:func:`reference.data.score_translations`):

- **semantic flip rate** (0 is ideal): the fraction of non-lane pixels whose class changed;
- **lane accuracy** (1 is ideal): the fraction of lane pixels that became white lane;
- **realism** (1 is ideal): the fraction of output pixels whose colour B's jitter could have
  produced (1 for real B scenes, 0 for A scenes left unchanged), and its graded companion
  **palette distance**, the mean RGB distance to B's palette (about 0.04 for real B scenes,
  about 0.27 for unchanged A scenes; lower is more B-like);
- **travel**: the travel loss :math:`\frac{1}{N(N-1)}\sum_{i \ne j} 1 - \cos(v_{ij}, z_{ij})`
  over the whole evaluation set, with the training encoder.

Every run starts from the same generator (a short identity warm start: L1 reconstruction of
A and B scenes, so that "output equals input" is where a generator begins, not a random
image) and the same discriminator initialisation, and sees the same batches; only lambda
differs. Each update is :func:`reference.train.generator_step` then
:func:`reference.train.discriminator_step`, i.e. ``L_G = L_adv + lambda * L_travel`` with the
cosine distance averaged over pairs. The frozen encoder is :func:`reference.toy_encoder.build_toy_encoder`.

The study also runs the toy version of the paper's ablation: lambda = 100 with the same
encoder network left at its random initial weights.

What to expect, and why. lambda = 0 collapses to one B-like street for every input (trees in
the sky, a hood, lost cars: flip rate about 0.5). A growing lambda keeps each scene's own layout
(cars, horizon, road) and, around lambda = 100, still lets the palette move towards B's; a very
large lambda (1000) returns the warm start, i.e. the input: flip rate near 0, realism that of
the input. The random encoder also keeps the layout, but only by keeping everything: its
features change with colour as much as with content, so its outputs stay the input. Two limits
are properties of the method, not of the toy: (1) the travel loss compares differences between
images, so a change made to *every* image (stripes across the top of every sky, a hood on every
scene) costs nothing; with longer training (600 steps at lambda = 100) such common changes
raise the flip rate again while the travel loss stays flat. (2) Within this CPU budget the
generator does not reproduce the 1-2 pixel lane lines at all (the warm start already blurs them
into the road), so lane accuracy stays 0 for every lambda: the yellow -> white change that the
adversarial term should drive is not demonstrated here.

Outputs in ``out_dir``: ``demo_report.json`` (``{"runs": [{"lambda_travel", "semantic_flip_rate",
"lane_accuracy", "realism", ...}, ...], "references": ..., "settings": ...}``), ``demo_grid.png``
(rows: held-out scenes; columns: input | one translation per lambda | the ideal translation)
and a printed table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reference.adaptive_lambda import GradientBalancedLambda, last_layer_weight
from reference.data import PALETTE_B, ToyStreets, paint_labels, score_translations
from reference.evaluate import translate_images
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.toy_encoder import build_toy_encoder
from reference.train import StepOptions, discriminator_step, generator_step, save_image_grid
from travel_loss import travel_loss

__all__ = ["FULL", "QUICK", "DemoSettings", "format_table", "run_demo"]

REPORT_NAME = "demo_report.json"
GRID_NAME = "demo_grid.png"


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on besides the seed."""

    lambdas: tuple[float, ...] = (0.0, 10.0, 100.0, 1000.0)
    random_encoder_lambdas: tuple[float, ...] = (100.0,)  # the ablation: same runs, encoder with random weights
    size: int = 64
    g_width: int = 16
    g_blocks: int = 4
    d_width: int = 16
    d_layers: int = 1  # a 16 x 16-pixel PatchGAN: judges colours and textures, not the whole layout
    batch_size: int = 8
    steps: int = 400  # GAN updates per lambda
    lr: float = 5e-5  # generator; the discriminator gets twice this
    gan_loss: str = "lsgan"
    warm_start_steps: int = 400  # identity warm start of the generator, shared by all runs
    warm_start_lr: float = 2e-3
    train_scenes: int = 1000  # per domain, generated once
    eval_scenes: int = 128  # held-out A scenes (another seed)
    grid_rows: int = 8


FULL = DemoSettings()
QUICK = DemoSettings(
    lambdas=(0.0, 100.0), random_encoder_lambdas=(100.0,), size=32, g_width=8, g_blocks=1, d_width=8, batch_size=4,
    steps=6, warm_start_steps=4, train_scenes=16, eval_scenes=8, grid_rows=4,
)  # fmt: skip

EVAL_SEED_OFFSET = 10_000  # the held-out set's ToyStreets seed is seed + this


def _scenes(domain: str, count: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` toy scenes as images (count, 3, size, size) and label maps (count, size, size)."""
    dataset = ToyStreets(domain, size=size, length=count, seed=seed)
    images, labels = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), torch.stack(labels)


def _batch(images: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    return images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]


def _identity_warm_start(
    generator: nn.Module, images_a: Tensor, images_b: Tensor, settings: DemoSettings, seed: int
) -> list[float]:
    """Train ``generator`` in place to reproduce its input (L1), alternating A and B batches; returns the losses."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=settings.warm_start_lr, betas=(0.5, 0.999))
    batches = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(settings.warm_start_steps):
        real = _batch(images_a if step % 2 == 0 else images_b, settings.batch_size, batches)
        loss = (generator(real) - real).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _score(translated: Tensor, labels: Tensor, sources: Tensor, encoder: nn.Module) -> dict[str, Any]:
    """Toy-street scores of translations, plus the travel loss over the whole set with the training encoder."""
    scores = score_translations(translated, labels)
    with torch.no_grad():
        travel = travel_loss(encoder(sources).double(), encoder(translated).double())
    return {
        "semantic_flip_rate": scores["semantic_flip_rate"],
        "lane_accuracy": scores["lane_accuracy"],
        "realism": scores["realism"],
        "palette_distance": scores["palette_distance"],
        "travel": float(travel),
        "flipped_into": scores["flipped_into"],
        "flip_rate_by_class": scores["flip_rate_by_class"],
    }


def _train_one(
    lambda_travel: float,
    start: nn.Module,
    encoder: nn.Module,
    images_a: Tensor,
    images_b: Tensor,
    settings: DemoSettings,
    seed: int,
    progress: bool,
    *,
    adaptive_lambda_scale: float | None = None,
    encoder_optimizer: torch.optim.Optimizer | None = None,
    travel_distance: str = "cosine",
) -> tuple[nn.Module, dict[str, float]]:
    """Train a copy of ``start`` against a fresh discriminator for ``settings.steps`` updates.

    ``adaptive_lambda_scale``: replace ``lambda_travel`` by
    :class:`reference.adaptive_lambda.GradientBalancedLambda` at the copy's last layer weight with
    this scale (the returned dict then holds ``lambda_final``). ``encoder_optimizer``: ``encoder``
    is trainable (TraVeLGAN's Siamese embedder) and is updated in place with this optimizer.
    """
    generator = copy.deepcopy(start)
    adaptive = None
    if adaptive_lambda_scale is not None:
        adaptive = GradientBalancedLambda(last_layer_weight(generator), scale=adaptive_lambda_scale)
    torch.manual_seed(seed + 1)  # the same discriminator for every lambda
    discriminator = PatchDiscriminator(3, width=settings.d_width, n_layers=settings.d_layers)
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=2 * settings.lr, betas=(0.5, 0.999))
    options = StepOptions(
        lambda_travel=lambda_travel,
        gan_loss=settings.gan_loss,
        travel_distance=travel_distance,
        travel_reduction="mean",
    )
    batches = torch.Generator().manual_seed(seed + 2)  # the same batches for every lambda
    bar = _progress(settings.steps, "lambda auto" if adaptive else f"lambda {lambda_travel:g}", progress)
    sums = {"loss_adv": 0.0, "loss_travel": 0.0, "loss_d": 0.0}
    tail = max(1, settings.steps // 5)  # losses are reported as means over the last fifth of the run
    for step in range(settings.steps):
        real_a = _batch(images_a, settings.batch_size, batches)
        real_b = _batch(images_b, settings.batch_size, batches)
        g_out = generator_step(
            generator, discriminator, encoder, optimizer_g, real_a, options,
            encoder_optimizer=encoder_optimizer, adaptive_lambda=adaptive,
        )  # fmt: skip
        d_out = discriminator_step(discriminator, optimizer_d, real_b, g_out["fake"], options)
        if step >= settings.steps - tail:
            for key, out in (("loss_adv", g_out), ("loss_travel", g_out), ("loss_d", d_out)):
                sums[key] += float(out[key])
        bar.set_postfix(adv=f"{float(g_out['loss_adv']):.3f}", travel=f"{float(g_out['loss_travel']):.3f}")
        bar.update(1)
    bar.close()
    losses = {f"train_{key}": value / tail for key, value in sums.items()}
    if adaptive is not None:
        losses["lambda_final"] = adaptive.value
    return generator, losses


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, disable=not enabled, leave=False)


def _run_name(run: dict[str, Any]) -> str:
    name = f"lambda = {run['lambda_travel']:g}"
    return name if run.get("encoder", "toy") == "toy" else f"{name} ({run['encoder']})"


def format_table(runs: Sequence[dict[str, Any]], references: dict[str, dict[str, Any]] | None = None) -> str:
    """A plain-text table: one row per run (and per reference translation), the scores side by side."""
    header = f"{'':>26} {'flip rate':>10} {'lane acc':>9} {'realism':>8} {'pal.dist':>8} {'travel':>7} {'seconds':>8}"
    lines = [header, "-" * len(header)]

    def number(value: Any, width: int, digits: int = 3) -> str:
        return (
            f"{value:>{width}.{digits}f}"
            if isinstance(value, (int, float)) and math.isfinite(value)
            else f"{'-':>{width}}"
        )

    for run in runs:
        lines.append(
            f"{_run_name(run):>26} {number(run['semantic_flip_rate'], 10)} "
            f"{number(run['lane_accuracy'], 9)} {number(run['realism'], 8)} {number(run['palette_distance'], 8)} "
            f"{number(run['travel'], 7)} "
            f"{number(run.get('seconds'), 8, 1)}"
        )
    for name, row in (references or {}).items():
        lines.append(
            f"{name:>26} {number(row['semantic_flip_rate'], 10)} {number(row['lane_accuracy'], 9)} "
            f"{number(row['realism'], 8)} {number(row['palette_distance'], 8)} {number(row['travel'], 7)} "
            f"{number(None, 8)}"
        )
    lines.append(
        "flip rate: lower is better (0 ideal); lane acc: higher is better (1 ideal); "
        "realism: fraction of B-coloured pixels (1 ideal); "
        "pal.dist: mean distance to B's palette (lower is more B-like)"
    )
    return "\n".join(lines)


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    quick: bool = False,
    settings: DemoSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the toy-street lambda study into ``out_dir`` and return the report (also written as ``demo_report.json``).

    ``quick=True`` uses :data:`QUICK` (tiny images and networks, a few steps: a smoke test, not
    a result); otherwise :data:`FULL` (under three minutes on two idle CPU cores), unless
    ``settings`` is given. Deterministic for a given seed on a given machine and thread count;
    the global random state is restored afterwards. ``progress=False`` prints nothing.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if settings is None:
        settings = QUICK if quick else FULL
    if not isinstance(settings, DemoSettings):
        raise ValueError(f"settings must be a DemoSettings, got {type(settings).__name__}")
    for name in ("lambdas", "random_encoder_lambdas"):
        values = getattr(settings, name)
        if any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v) for v in values
        ):
            raise ValueError(f"settings.{name} must be finite numbers >= 0, got {values!r}")
    if not settings.lambdas:
        raise ValueError("settings.lambdas must hold at least one value")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        return _run(out, seed, quick, settings, progress)


def _run(out: Path, seed: int, quick: bool, settings: DemoSettings, progress: bool) -> dict[str, Any]:
    say = print if progress else (lambda *args, **kwargs: None)
    started = time.perf_counter()

    encoder = build_toy_encoder(settings.size, seed=seed)
    images_a, _ = _scenes("A", settings.train_scenes, settings.size, seed)
    images_b, _ = _scenes("B", settings.train_scenes, settings.size, seed)
    eval_images, eval_labels = _scenes("A", settings.eval_scenes, settings.size, seed + EVAL_SEED_OFFSET)
    prepared = time.perf_counter()
    say(
        f"toy encoder and {2 * settings.train_scenes + settings.eval_scenes} scenes ready in {prepared - started:.1f} s"
    )

    torch.manual_seed(seed)
    start = ResnetGenerator(3, 3, width=settings.g_width, n_blocks=settings.g_blocks)
    warm_losses = _identity_warm_start(start, images_a, images_b, settings, seed)
    warm_start_seconds = time.perf_counter() - prepared
    last_l1 = warm_losses[-1] if warm_losses else math.nan
    say(f"identity warm start: {settings.warm_start_steps} steps, last L1 {last_l1:.3f}, {warm_start_seconds:.1f} s")

    ideal = paint_labels(eval_labels, PALETTE_B)
    references = {
        "input unchanged": _score(eval_images, eval_labels, eval_images, encoder),
        "warm start": _score(translate_images(start, eval_images), eval_labels, eval_images, encoder),
        "ideal": _score(ideal, eval_labels, eval_images, encoder),
    }
    plan = [("toy", lam) for lam in settings.lambdas] + [("toy-random", lam) for lam in settings.random_encoder_lambdas]
    encoders = {"toy": encoder, "toy-random": build_toy_encoder(settings.size, seed=seed, pretrained=False)}
    runs, columns, column_names = [], [eval_images[: settings.grid_rows]], ["input"]
    for kind, lambda_travel in plan:
        run_started = time.perf_counter()
        generator, losses = _train_one(
            float(lambda_travel), start, encoders[kind], images_a, images_b, settings, seed, progress
        )
        translated = translate_images(generator, eval_images)
        runs.append({
            "lambda_travel": float(lambda_travel), "encoder": kind,
            **_score(translated, eval_labels, eval_images, encoder),  # travel: always with the trained toy encoder
            **losses, "steps": settings.steps, "seconds": time.perf_counter() - run_started,
        })  # fmt: skip
        columns.append(translated[: settings.grid_rows])
        column_names.append(_run_name(runs[-1]))
        run = runs[-1]
        say(
            f"{column_names[-1]}: flip rate {run['semantic_flip_rate']:.3f}, "
            f"lane accuracy {run['lane_accuracy']:.3f} ({run['seconds']:.1f} s)"
        )
    columns.append(ideal[: settings.grid_rows])
    column_names.append("ideal")
    grid = save_image_grid(columns, out / GRID_NAME)

    report = {
        "runs": runs,
        "references": references,
        "settings": {**dataclasses.asdict(settings), "seed": seed, "quick": quick},
        "warm_start_last_l1": None if math.isnan(last_l1) else last_l1,
        "grid": grid.name,
        "grid_columns": column_names,
        "seconds": time.perf_counter() - started,
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    say(format_table(runs, references))
    say(
        f"report: {out / REPORT_NAME}; samples: {grid} ({' | '.join(report['grid_columns'])}); "
        f"{report['seconds']:.0f} s in all"
    )
    return report
