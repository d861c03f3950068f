r"""The toy-street study: does the travel loss keep semantics while translating, and beat the obvious regularisers?

``python reference/train.py --demo --out DIR`` (or :func:`run_demo`) writes toy street scenes
(:class:`reference.data.ToyStreets`, A "game" -> B "city", lane lines drawn 2.5 times wider than
the default so that a small generator can paint them) into ``DIR/data/trainA`` and ``trainB`` and
trains every method as one run of the public trainer,

    python reference/train.py --preset toy-demo --data-a DIR/data/trainA --data-b DIR/data/trainB \
        --out DIR/runs/NAME [method flags] --resume

two runs at a time, one thread each (:mod:`reference.studies.runner`). Same preset, seed, data and budget
for every method; only the flags differ:

- ``gan``: the adversarial loss alone (``--lambda-travel 0``);
- ``travel``: :math:`L_G = L_\mathrm{adv} + \lambda L_\mathrm{travel}` with the preset's frozen
  palette-free layout encoder (:func:`reference.studies.street_encoder.affinity_encoder`, pretrained on
  scenes in uniformly random palettes);
- ``travel-auto``: the same with ``--lambda-travel auto`` (weight: ``--lambda-auto-scale``);
- ``identity-l1``: CycleGAN's identity term alone, :math:`L_\mathrm{adv} + w\,\lVert G(x) - x \rVert_1`;
- ``cycle``: CycleGAN's objective (a second generator and discriminator, cycle weight 10, identity 0.5);
- ``siamese``: TraVeLGAN's cooperatively trained Siamese network instead of a frozen encoder;
- ``random-encoder``: the travel loss with the same encoder network at its random initial weights.

Each generator (its weights' moving average when the preset keeps one) translates held-out A
scenes, scored against their label maps by :func:`reference.data.score_translations`:
**semantic flip rate** (non-lane pixels whose class changed; 0 is ideal), **lane accuracy**
(lane pixels that became B's white lane; 1 is ideal) and **realism** (pixels whose colour a real
B scene can hold; 1 for real B scenes and the ideal translation, 0 for A scenes left unchanged).

Outputs in ``DIR``: ``demo_report.json`` (``{"runs": [{"method", "weight", "lambda_travel",
"semantic_flip_rate", "lane_accuracy", "realism", ...}], "references": ..., "settings": ...}``),
``demo_grid.png`` (input | GAN | travel | identity-L1 | cycle | ideal, held-out scenes), a
printed table, the data and one trainer run folder per method (``runs/NAME/train.log``).
Rerunning the same command continues interrupted runs and reuses finished ones.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.config import TRAINER_PRESETS
from reference.data import PALETTE_B, ToyStreets, paint_labels, score_translations
from reference.evaluate import translate_images
from reference.logs import save_image_grid
from reference.studies.runner import TrainerRun, finished_checkpoint, run_trainers, trainer_argv
from reference.translate import load_generator

__all__ = ["FULL", "QUICK", "DemoSettings", "Method", "car_flip_rate", "format_table", "run_demo", "select_best"]

REPORT_NAME = "demo_report.json"
GRID_NAME = "demo_grid.png"
TOY_ENCODERS = Path(__file__).resolve().with_name("street_encoder.py")
EVAL_SEED = 10_000  # ToyStreets seed of the held-out A scenes (training scenes use the run's seed)
METHODS = ("gan", "travel", "travel-auto", "identity-l1", "cycle", "siamese", "random-encoder")


@dataclass(frozen=True)
class Method:
    """One run of the study: ``method`` (one of METHODS) and ``weight`` as the report names them."""

    method: str
    weight: float

    def flags(self) -> dict[str, Any]:
        """The trainer flags of this method, beside the preset's."""
        w = self.weight
        if self.method == "gan":
            return {"lambda_travel": 0.0}
        if self.method == "travel":
            return {"lambda_travel": w}
        if self.method == "travel-auto":
            return {"lambda_travel": "auto", "lambda_auto_scale": w}
        if self.method == "identity-l1":
            return {"lambda_travel": 0.0, "lambda_identity": w}
        if self.method == "cycle":
            return {"lambda_travel": 0.0, "lambda_cycle": w, "lambda_cycle_identity": 0.5}
        if self.method == "siamese":
            return {"lambda_travel": w, "encoder_mode": "siamese", "travel_distance": "travelgan"}
        if self.method == "random-encoder":
            return {"lambda_travel": w, "encoder": f"{TOY_ENCODERS}:random_affinity_encoder"}
        raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def name(self) -> str:
        return f"{self.method}_{self.weight:g}"


@dataclass(frozen=True)
class DemoSettings:
    """What the study runs: the methods, the trainer recipe (a preset plus overrides), the data and the grid."""

    runs: tuple[Method, ...] = (
        Method("gan", 0.0),
        Method("travel", 10.0),
        Method("identity-l1", 10.0),
        Method("cycle", 10.0),
        Method("siamese", 10.0),
        Method("random-encoder", 10.0),
    )
    preset: str = "toy-demo"  # reference.config.TRAINER_PRESETS: networks, optimiser, encoder, budget
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ from the preset
    train_scenes: int = 1000  # per domain, written as PNG files
    eval_scenes: int = 128  # held-out A scenes (ToyStreets seed EVAL_SEED)
    lane_width: float = 2.5
    grid_rows: int = 8
    workers: int = 2  # trainer runs at once, one thread each


FULL = DemoSettings()
QUICK = DemoSettings(
    runs=(Method("gan", 0.0), Method("travel", 10.0), Method("identity-l1", 10.0), Method("cycle", 10.0)),
    overrides=dict(g_width=8, g_blocks=1, d_width=8, batch_size=4, steps=3, g_ema=0.0),
    train_scenes=16, eval_scenes=8, grid_rows=4,
)  # fmt: skip


def _scenes(domain: str, count: int, size: int, seed: int, lane_width: float) -> tuple[Tensor, Tensor]:
    """``count`` toy scenes as images (count, 3, size, size) and label maps (count, size, size)."""
    dataset = ToyStreets(domain, size=size, length=count, seed=seed, lane_width=lane_width)
    images, labels = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), torch.stack(labels)


def _write_folder(images: Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def select_best(results: Sequence[dict[str, Any]], method: str, flip_limit: float) -> dict[str, Any] | None:
    """The run of ``method`` the claim is judged on: the most realistic among those with flip rate
    <= ``flip_limit``; if none qualifies, the one with the lowest flip rate."""
    candidates = [r for r in results if r["method"] == method]
    qualified = [r for r in candidates if r["semantic_flip_rate"] <= flip_limit]
    if qualified:
        return max(qualified, key=lambda r: r["realism"])
    return min(candidates, key=lambda r: r["semantic_flip_rate"]) if candidates else None


def car_flip_rate(scores: dict[str, Any]) -> float:
    """The fraction of car pixels given another class: the content that differs between scenes, which
    the travel loss is built to keep (NaN without cars)."""
    value = scores.get("flip_rate_by_class", {}).get("car")
    return math.nan if value is None else float(value)


def format_table(runs: Sequence[dict[str, Any]], references: dict[str, dict[str, Any]]) -> str:
    """One row per run and per reference translation: flip rate, car flips, lane accuracy, realism, seconds."""

    def number(value: Any, width: int, digits: int = 3) -> str:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return f"{value:>{width}.{digits}f}" if ok else f"{'-':>{width}}"

    header = f"{'method':<18}{'weight':>8}{'flip rate':>11}{'car flips':>11}{'lane acc':>10}{'realism':>9}"
    header += f"{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for run in runs:
        lines.append(
            f"{run['method']:<18}{run['weight']:>8g}{number(run['semantic_flip_rate'], 11)}"
            f"{number(car_flip_rate(run), 11)}{number(run['lane_accuracy'], 10)}{number(run['realism'], 9)}"
            f"{number(run.get('seconds'), 9, 0)}"
        )
    for name, row in references.items():
        lines.append(
            f"{'(' + name + ')':<18}{'':>8}{number(row['semantic_flip_rate'], 11)}{number(car_flip_rate(row), 11)}"
            f"{number(row['lane_accuracy'], 10)}{number(row['realism'], 9)}"
        )
    lines.append(
        "flip rate: 0 ideal; car flips: car pixels lost, 0 ideal; lane acc: 1 ideal; "
        "realism: fraction of pixels in B's colours, 1 ideal"
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
    """Run the study into ``out_dir`` (see the module docstring) and return the report.

    ``quick=True`` uses :data:`QUICK` (tiny networks, a few steps: a smoke test, not a result),
    otherwise :data:`FULL`, unless ``settings`` is given. ``progress=False`` prints nothing.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    settings = settings or (QUICK if quick else FULL)
    if not isinstance(settings, DemoSettings):
        raise ValueError(f"settings must be a DemoSettings, got {type(settings).__name__}")
    if not settings.runs:
        raise ValueError("settings.runs must hold at least one Method")
    for run in settings.runs:
        run.flags()  # an unknown method fails here, before any work
    if settings.preset not in TRAINER_PRESETS:
        raise ValueError(f"settings.preset must be one of {sorted(TRAINER_PRESETS)}, got {settings.preset!r}")
    return _run_study(Path(out_dir), seed, quick, settings, progress)


def _run_study(out: Path, seed: int, quick: bool, settings: DemoSettings, progress: bool) -> dict[str, Any]:
    say = print if progress else (lambda *args, **kwargs: None)
    started = time.perf_counter()
    recipe = {**TRAINER_PRESETS[settings.preset], **settings.overrides}
    size, steps = recipe["size"], recipe["steps"]
    data = out / "data"
    if not (data / "trainB").is_dir():
        for domain in ("A", "B"):
            images, _ = _scenes(domain, settings.train_scenes, size, seed, settings.lane_width)
            _write_folder(images, data / f"train{domain}")
    test_a, test_labels = _scenes("A", settings.eval_scenes, size, EVAL_SEED + seed, settings.lane_width)

    trainer_runs = []
    for run in settings.runs:
        flags = {
            **settings.overrides, "data_a": str(data / "trainA"), "data_b": str(data / "trainB"), "seed": seed,
            "out": str(out / "runs" / run.name), "log_every": max(1, steps // 10), "sample_every": steps,
            "checkpoint_every": steps, **run.flags(),
        }  # fmt: skip
        trainer_runs.append(TrainerRun(run.name, trainer_argv(settings.preset, flags), out / "runs" / run.name))
    say(f"toy streets: training {len(trainer_runs)} runs, {settings.workers} at a time (logs: {out}/runs/*/train.log)")
    seconds = run_trainers(trainer_runs, workers=settings.workers, say=say)

    results, translations = [], {}
    for run, trainer_run in zip(settings.runs, trainer_runs):
        translated = translate_images(load_generator(finished_checkpoint(trainer_run.out, steps)), test_a)
        translations[run.name] = translated
        scores = score_translations(translated, test_labels)
        results.append({
            "method": run.method, "weight": run.weight, "lambda_travel": run.flags()["lambda_travel"], **scores,
            "flags": run.flags(), "seconds": seconds.get(run.name, 0.0), "run_dir": str(trainer_run.out),
        })  # fmt: skip

    references = {
        "input unchanged": score_translations(test_a, test_labels),
        "ideal": score_translations(paint_labels(test_labels, PALETTE_B), test_labels),
    }
    report = {
        "runs": results,
        "references": references,
        "settings": {**asdict(settings), "seed": seed, "quick": quick, "recipe": recipe,
                     "seconds": time.perf_counter() - started},
    }  # fmt: skip
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2))
    _write_grid(out / GRID_NAME, results, translations, test_a, paint_labels(test_labels, PALETTE_B), settings)
    say(format_table(results, references))
    say(f"report: {out / REPORT_NAME}; grid: {out / GRID_NAME}; {report['settings']['seconds']:.0f} s")
    return report


def _write_grid(
    path: Path, results: Sequence[dict[str, Any]], translations: dict[str, Tensor], inputs: Tensor, ideal: Tensor,
    settings: DemoSettings,
) -> None:  # fmt: skip
    """input | GAN | travel | identity-L1 | cycle | ideal (the methods that ran), upscaled 4x; the
    travel and identity-L1 columns show the run :func:`select_best` picks."""
    gan = next((r for r in results if r["method"] == "gan"), None)
    flip_limit = 0.5 * gan["semantic_flip_rate"] if gan else math.inf
    rows = list(range(min(settings.grid_rows, len(inputs))))
    columns = [inputs[rows]]
    for method in ("gan", "travel", "identity-l1", "cycle"):
        best = select_best(results, method, flip_limit)
        if best is not None:
            columns.append(translations[Method(best["method"], best["weight"]).name][rows])
    columns.append(ideal[rows])
    save_image_grid([F.interpolate(c, scale_factor=4, mode="nearest") for c in columns], path)
