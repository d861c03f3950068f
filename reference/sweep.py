r"""The lambda sweep on toy streets, on CPU: how much does the travel loss preserve semantics, at what cost.

Every run uses the recipe of the toy-street study :mod:`reference.demo` (its functions, not a
copy): the same identity warm start of a small generator, the same discriminator
initialisation, the same batches, ``settings.steps`` updates of
:func:`reference.train.generator_step` then :func:`reference.train.discriminator_step`, and the
same 128 held-out A scenes to score. Runs:

- ``lambda X`` for X in ``--lambdas``: :math:`L_G = L_\mathrm{adv} + \lambda L_\mathrm{travel}`
  with the frozen toy layout encoder (:func:`reference.toy_encoder.build_toy_encoder`), cosine
  distance averaged over pairs;
- ``lambda auto``: the gradient-balanced lambda of :mod:`reference.adaptive_lambda` at the
  generator's last convolution weight :math:`\theta`,
  :math:`r_t = s\,\|\nabla_\theta L_\mathrm{adv}\| / \|\nabla_\theta L_\mathrm{travel}\|`,
  :math:`\lambda_t` = the bias-corrected moving average of :math:`r_t` (momentum 0.9), scale
  :math:`s` = ``--auto-scale`` (1: both terms pull on the last layer equally hard); the row
  reports where :math:`\lambda_t` ended (``lambda_final``);
- ``TraVeLGAN (Siamese)``: the baseline, as ``reference.train``'s ``siamese`` mode: a trainable
  :class:`reference.train.SiameseEmbedder` updated with its own Adam optimizer, TraVeLGAN's
  distance (``"travelgan"``: squared Euclidean plus cosine), its margin loss, lambda 10;
- ``random encoder (ablation)``: the toy encoder at its random initial weights, lambda 100.

Columns: the toy-street scores of :func:`reference.data.score_translations` (flip rate, lane
accuracy, realism, palette distance), and two measures in a *judge* space that no run trains
with (:class:`PooledPixels`, the image average-pooled to 4 x 4 pixels: 48 numbers, fewer than
the 128 scored scenes, so the covariances are full rank): the Fréchet distance between the
translations and 128 held-out real B scenes (:func:`reference.evaluate.frechet_distance`) and
the travel consistency, the mean cosine between :math:`J(x_i) - J(x_j)` and
:math:`J(G(x_i)) - J(G(x_j))` (:func:`reference.evaluate.travel_consistency`). ``toy_travel``
is the travel loss with the training toy encoder (the lambda runs' own teacher). Reference rows
(input unchanged, warm start, ideal translation) give the scale of every column.

Output in ``--out``: ``sweep.json``, ``sweep.md`` (a markdown table) and ``sweep.png`` (flip
rate, lane accuracy and realism against lambda)::

    # 9 runs of about 30 s each, plus the encoder pretraining and warm start
    python reference/sweep.py --out runs/sweep
    python reference/sweep.py --out /tmp/smoke --steps 20 --lambdas 0 100
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor, nn

from reference import demo
from reference.data import PALETTE_B, paint_labels
from reference.evaluate import format_table, frechet_distance, plot_lambda_sweep, translate_images, travel_consistency
from reference.models import ResnetGenerator
from reference.toy_encoder import build_toy_encoder
from reference.train import SiameseEmbedder

__all__ = ["DEFAULT_LAMBDAS", "SWEEP_COLUMNS", "PooledPixels", "run_sweep", "sweep_settings"]

DEFAULT_LAMBDAS = (0.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
SIAMESE_LAMBDA = 10.0  # TraVeLGAN's weight of its travel and margin terms
RANDOM_ENCODER_LAMBDA = 100.0  # the demo's ablation
JUDGE_SIDE = 4

SWEEP_COLUMNS = (
    "name", "lambda_travel", "lambda_final", "semantic_flip_rate", "lane_accuracy", "realism", "palette_distance",
    "judge_frechet_distance", "judge_travel_consistency", "toy_travel", "seconds",
)  # fmt: skip
REPORT_NAME, TABLE_NAME, PLOT_NAME = "sweep.json", "sweep.md", "sweep.png"


class PooledPixels(nn.Module):
    """The judge: (N, 3, H, W) -> (N, 3 * side * side), the image average-pooled to side x side."""

    def __init__(self, side: int = JUDGE_SIDE) -> None:
        super().__init__()
        if not isinstance(side, int) or isinstance(side, bool) or side < 1:
            raise ValueError(f"side: expected an int >= 1, got {side!r}")
        self.side = side

    def forward(self, images: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(images, self.side).flatten(1)

    def extra_repr(self) -> str:
        return f"side={self.side}"


def sweep_settings(lambdas: Sequence[float], *, auto: bool = True, baselines: bool = True) -> list[dict[str, Any]]:
    """The plan: one dict per run with ``name``, ``lambda_travel`` (a number or ``"auto"``) and ``encoder``
    (``"toy"``, ``"siamese"`` or ``"toy-random"``)."""
    runs: list[dict[str, Any]] = []
    for lam in lambdas:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or not math.isfinite(lam):
            raise ValueError(f"lambdas: expected finite numbers >= 0, got {lam!r}")
        runs.append({"name": f"lambda {lam:g}", "lambda_travel": float(lam), "encoder": "toy"})
    if auto:
        runs.append({"name": "lambda auto", "lambda_travel": "auto", "encoder": "toy"})
    if baselines:
        runs.append({"name": "TraVeLGAN (Siamese)", "lambda_travel": SIAMESE_LAMBDA, "encoder": "siamese"})
        runs.append(
            {"name": "random encoder (ablation)", "lambda_travel": RANDOM_ENCODER_LAMBDA, "encoder": "toy-random"}
        )
    return runs


def run_sweep(
    out: str | Path,
    *,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    steps: int | None = None,
    seed: int = 0,
    settings: demo.DemoSettings | None = None,
    auto: bool = True,
    auto_scale: float = 1.0,
    baselines: bool = True,
    judge: nn.Module | None = None,
    encoder: nn.Module | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and score every run of :func:`sweep_settings`; write sweep.json, sweep.md, sweep.png under ``out``.

    ``settings``: the recipe (default :data:`reference.demo.FULL`); ``steps`` overrides its GAN
    updates per run. ``judge``: the embedder of the Fréchet distance and the travel consistency
    (default :class:`PooledPixels`). ``encoder``: the frozen training encoder of the lambda runs
    and of ``toy_travel`` (default :func:`reference.toy_encoder.build_toy_encoder` for the seed,
    which pretrains on first use). Deterministic for a seed on a given machine and thread
    count; the global random state is restored afterwards. Returns the report also written
    as ``sweep.json``: ``{"rows": [...], "references": [...], "settings": ..., "judge": ...}``.
    """
    plan = sweep_settings(lambdas, auto=auto, baselines=baselines)
    if not plan:
        raise ValueError("lambdas: expected at least one run (give lambdas, or leave auto or baselines on)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if (
        isinstance(auto_scale, bool)
        or not isinstance(auto_scale, (int, float))
        or not auto_scale > 0
        or not math.isfinite(auto_scale)
    ):
        raise ValueError(f"auto_scale: expected a finite number > 0, got {auto_scale!r}")
    settings = demo.FULL if settings is None else settings
    if not isinstance(settings, demo.DemoSettings):
        raise ValueError(f"settings: expected a reference.demo.DemoSettings, got {type(settings).__name__}")
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        settings = dataclasses.replace(settings, steps=steps)
    judge = PooledPixels() if judge is None else judge
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        if encoder is None:
            encoder = build_toy_encoder(settings.size, seed=seed)
        return _run(out, plan, seed, settings, float(auto_scale), judge, encoder, progress)


def _run(
    out: Path,
    plan: list[dict[str, Any]],
    seed: int,
    settings: demo.DemoSettings,
    auto_scale: float,
    judge: nn.Module,
    encoder: nn.Module,
    progress: bool,
) -> dict[str, Any]:
    say = functools.partial(print, flush=True) if progress else (lambda *args, **kwargs: None)
    started = time.perf_counter()
    size = settings.size
    images_a, _ = demo._scenes("A", settings.train_scenes, size, seed)
    images_b, _ = demo._scenes("B", settings.train_scenes, size, seed)
    eval_images, eval_labels = demo._scenes("A", settings.eval_scenes, size, seed + demo.EVAL_SEED_OFFSET)
    eval_targets, _ = demo._scenes("B", settings.eval_scenes, size, seed + demo.EVAL_SEED_OFFSET)
    with torch.no_grad():
        target_features = judge(eval_targets)

    def score(translated: Tensor) -> dict[str, Any]:
        scores = demo._score(translated, eval_labels, eval_images, encoder)
        with torch.no_grad():
            features = judge(translated)
        return {
            "semantic_flip_rate": scores["semantic_flip_rate"],
            "lane_accuracy": scores["lane_accuracy"],
            "realism": scores["realism"],
            "palette_distance": scores["palette_distance"],
            "judge_frechet_distance": frechet_distance(features, target_features),
            "judge_travel_consistency": travel_consistency(judge, eval_images, translated),
            "toy_travel": scores["travel"],
        }

    torch.manual_seed(seed)
    start = ResnetGenerator(3, 3, width=settings.g_width, n_blocks=settings.g_blocks)
    warm_losses = demo._identity_warm_start(start, images_a, images_b, settings, seed)
    say(
        f"identity warm start: {settings.warm_start_steps} steps, "
        f"last L1 {warm_losses[-1] if warm_losses else math.nan:.3f}"
    )
    references = [
        {"name": "input unchanged", **score(eval_images)},
        {"name": "warm start", **score(translate_images(start, eval_images))},
        {"name": "ideal translation", **score(paint_labels(eval_labels, PALETTE_B))},
    ]
    payload = {
        "settings": {**dataclasses.asdict(settings), "seed": seed, "auto_scale": auto_scale, "auto_momentum": 0.9},
        "judge": repr(judge),
        "rows": [],
        "references": references,
    }
    bar = demo._progress(len(plan), "sweep", progress)
    for run in plan:
        bar.set_description(run["name"])
        run_started = time.perf_counter()
        train_encoder, extra = _training_encoder(run["encoder"], encoder, settings, seed)
        lam = run["lambda_travel"]
        generator, losses = demo._train_one(
            0.0 if lam == "auto" else lam, start, train_encoder, images_a, images_b, settings, seed, progress,
            adaptive_lambda_scale=auto_scale if lam == "auto" else None, **extra,
        )  # fmt: skip
        row = {
            **run,
            "lambda_final": losses.pop("lambda_final", None),
            **score(translate_images(generator, eval_images)),
            **losses,
            "steps": settings.steps,
            "seconds": time.perf_counter() - run_started,
        }
        payload["rows"].append(row)
        _write_tables(out, payload)  # after every run: a partial sweep is readable
        bar.update(1)
        if progress:
            bar.write(
                f"{row['name']}: flip rate {row['semantic_flip_rate']:.3f}, realism {row['realism']:.3f} "
                f"({row['seconds']:.0f} s)"
            )
    bar.close()
    payload["seconds"] = time.perf_counter() - started
    _write_tables(out, payload)
    _write_plot(out, payload["rows"], progress=progress)
    say(format_table(payload["rows"] + references, SWEEP_COLUMNS))
    say(f"wrote {out / REPORT_NAME}, {out / TABLE_NAME}, {out / PLOT_NAME} in {payload['seconds']:.0f} s")
    return payload


def _training_encoder(
    kind: str, toy_encoder: nn.Module, settings: demo.DemoSettings, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder a run trains with, and the extra keyword arguments of ``demo._train_one`` it needs."""
    if kind == "toy":
        return toy_encoder, {}
    if kind == "toy-random":
        return build_toy_encoder(settings.size, seed=seed, pretrained=False), {}
    if kind == "siamese":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 3)
            siamese = SiameseEmbedder(settings.size)
        optimizer = torch.optim.Adam(siamese.parameters(), lr=settings.lr, betas=(0.5, 0.999))
        return siamese, {"encoder_optimizer": optimizer, "travel_distance": "travelgan"}
    raise ValueError(f"encoder: expected 'toy', 'toy-random' or 'siamese', got {kind!r}")


def _write_tables(out: Path, payload: dict[str, Any]) -> None:
    (out / REPORT_NAME).write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    table = format_table(payload["rows"] + payload["references"], SWEEP_COLUMNS, markdown=True)
    (out / TABLE_NAME).write_text(table + "\n")


def _write_plot(out: Path, rows: list[dict[str, Any]], *, progress: bool) -> None:
    # baselines are drawn as horizontal lines, not as points of the lambda curve
    plotted = [row if row["encoder"] == "toy" else {**row, "lambda_travel": None} for row in rows]
    try:
        plot_lambda_sweep(plotted, out / PLOT_NAME)
    except ImportError as error:
        if progress:
            print(f"note: no plot: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reference/sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for sweep.json, sweep.md and sweep.png")
    parser.add_argument("--lambdas", type=float, nargs="*", default=list(DEFAULT_LAMBDAS))
    parser.add_argument("--steps", type=int, default=demo.FULL.steps, help="GAN updates per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--auto-scale", type=float, default=1.0, help="s of the adaptive lambda (travel / adversarial gradient norm)"
    )
    parser.add_argument("--no-auto", action="store_true", help="skip the adaptive-lambda run")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the Siamese baseline and the random-encoder ablation"
    )
    args = parser.parse_args(argv)
    run_sweep(
        args.out, lambdas=args.lambdas, steps=args.steps, seed=args.seed, auto=not args.no_auto,
        auto_scale=args.auto_scale, baselines=not args.no_baselines,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
