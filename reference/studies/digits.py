r"""The digit study: does the travel loss keep a real digit's label while its style is translated?

``python reference/train.py --demo digits --out DIR`` (or :func:`run_digit_demo`) renders
scikit-learn's real handwritten digits as two unpaired domains (``reference.studies.digit_data``): A, light
ink on dark navy, every class equally often; B, dark red ink on cream paper with thick strokes
and strongly skewed class frequencies. Each method is one run of the public trainer
(:func:`reference.train.train`, i.e. ``reference/train.py --data-a .../trainA --data-b
.../trainB``) with the same seed, data, networks and budget:

- ``gan``: the adversarial loss alone (lambda = 0);
- ``travel``: ``+ lambda * L_travel`` with the study's frozen embedder, loaded through
  ``--encoder-mode module --encoder reference/studies/digit_data.py:stroke_embedder`` (principal components
  of colour-invariant stroke maps, fitted without labels on A only);
- ``identity-l1``: CycleGAN's identity term ``+ w * mean|G(x) - x|`` instead (``--lambda-identity``);
- ``travel-pixel-embedder``: the ablation, travel with an embedder fitted the same way on raw
  pixels, which is *not* invariant to the style change (B's polarity is the opposite of A's).

Each run is scored on 200 held-out A digits by a judge (an SVM fitted on B-style renders of a
third disjoint set of scans): **label accuracy** (the judge still reads the input's digit; 1 is
ideal) and **realism** (fraction of pixels in B's colours; 1 is ideal).

Outputs in ``out_dir``: ``demo_report.json`` (``{"runs": [{"method", "weight", "lambda_travel",
"lambda_identity", "label_accuracy", "realism", ...}], "references": ..., "settings": ...}``),
``demo_grid.png`` (rows: held-out digits, one per class; columns: input | GAN only | travel |
identity-L1 | travel with the pixel embedder | ideal), a printed table, ``data/`` (the rendered
training folders) and ``runs/`` (one trainer run folder per method).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.config import TRAINER_PRESETS
from reference.evaluate import translate_images
from reference.logs import save_image_grid
from reference.studies.digit_data import DigitJudge, digit_domains, score_digit_translations
from reference.studies.runner import TrainerRun, finished_checkpoint, run_trainers, trainer_argv
from reference.translate import load_generator

__all__ = ["FULL", "QUICK", "DigitDemoSettings", "Run", "run_digit_demo"]

REPORT_NAME = "demo_report.json"
GRID_NAME = "demo_grid.png"
EMBEDDERS = {
    "stroke": str(Path(__file__).with_name("digit_data.py")) + ":stroke_embedder",
    "pixel": str(Path(__file__).with_name("digit_data.py")) + ":pixel_embedder",
}


@dataclass(frozen=True)
class Run:
    """One method of the study: ``method`` and ``weight`` as the report names them, and the trainer flags."""

    method: str
    weight: float
    lambda_travel: float | str = 0.0
    lambda_identity: float = 0.0
    embedder: str = "stroke"


@dataclass(frozen=True)
class DigitDemoSettings:
    """What the study runs: the methods, the trainer recipe (a preset plus overrides) and the grid."""

    runs: tuple[Run, ...] = (
        Run("gan", 0.0),
        Run("travel", 3.0, lambda_travel=3.0),
        Run("travel", 10.0, lambda_travel=10.0),
        Run("identity-l1", 1.0, lambda_identity=1.0),
        Run("identity-l1", 10.0, lambda_identity=10.0),
        Run("travel-pixel-embedder", 10.0, lambda_travel=10.0, embedder="pixel"),
    )
    preset: str = "digits-demo"  # reference.config.TRAINER_PRESETS: networks, optimiser, budget
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ from the preset
    grid_rows: int = 10
    workers: int = 2  # trainer runs at once, one thread each


FULL = DigitDemoSettings()
QUICK = DigitDemoSettings(
    runs=(
        Run("gan", 0.0),
        Run("travel", 10.0, lambda_travel=10.0),
        Run("identity-l1", 10.0, lambda_identity=10.0),
        Run("travel-pixel-embedder", 10.0, lambda_travel=10.0, embedder="pixel"),
    ),
    overrides=dict(g_width=8, g_blocks=1, d_width=8, batch_size=8, steps=4),
    grid_rows=4,
)


def _write_folder(images: Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def _run_name(run: Run) -> str:
    return f"{run.method}_{run.weight:g}"


def trainer_flags(run: Run, settings: DigitDemoSettings, data: Path, out: Path, seed: int) -> dict[str, Any]:
    """The flags of one run beside ``--preset``: ``reference/train.py --preset digits-demo --data-a
    DATA/trainA --data-b DATA/trainB --lambda-travel ... --out OUT/runs/NAME``."""
    steps = {**TRAINER_PRESETS[settings.preset], **settings.overrides}["steps"]
    return {
        **settings.overrides, "data_a": str(data / "trainA"), "data_b": str(data / "trainB"), "seed": seed,
        "out": str(out / "runs" / _run_name(run)), "lambda_travel": run.lambda_travel,
        "lambda_identity": run.lambda_identity, "encoder": EMBEDDERS[run.embedder],
        "log_every": max(1, steps // 10), "sample_every": steps, "checkpoint_every": steps,
    }  # fmt: skip


def _grid_rows(labels: Tensor, count: int) -> list[int]:
    """Indices of ``count`` test digits, one per class in turn (0, 1, ..., 9, 0, ...)."""
    rows: list[int] = []
    used: set[int] = set()
    while len(rows) < min(count, len(labels)):
        before = len(rows)
        for digit in range(10):
            candidates = [i for i in (labels == digit).nonzero().flatten().tolist() if i not in used]
            if candidates and len(rows) < count:
                rows.append(candidates[0])
                used.add(candidates[0])
        if len(rows) == before:
            break
    return rows


def format_table(runs: Sequence[dict[str, Any]], references: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'method':<24}{'weight':>8}{'label acc':>11}{'realism':>9}{'seconds':>9}"]
    for run in runs:
        lines.append(
            f"{run['method']:<24}{run['weight']:>8g}{run['label_accuracy']:>11.3f}{run['realism']:>9.3f}{run['seconds']:>9.1f}"
        )
    for name, scores in references.items():
        lines.append(f"{'(' + name + ')':<24}{'':>8}{scores['label_accuracy']:>11.3f}{scores['realism']:>9.3f}")
    return "\n".join(lines)


def run_digit_demo(
    out_dir: str | Path, *, seed: int = 0, quick: bool = False, settings: DigitDemoSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Run the digit study into ``out_dir`` (see the module docstring); returns the report dict."""
    return _run_study(Path(out_dir), seed, quick, settings or (QUICK if quick else FULL), progress)


def _run_study(out: Path, seed: int, quick: bool, settings: DigitDemoSettings, progress: bool) -> dict[str, Any]:
    say = print if progress else (lambda *args, **kwargs: None)
    started = time.perf_counter()
    domains = digit_domains(size=TRAINER_PRESETS[settings.preset]["size"])
    judge = DigitJudge(domains.judge, domains.judge_labels)
    data = out / "data"
    if not (data / "trainB").is_dir():
        _write_folder(domains.a_train, data / "trainA")
        _write_folder(domains.b, data / "trainB")
    b_counts = torch.bincount(domains.b_labels, minlength=10).tolist()
    say(
        f"digits: A-train {len(domains.a_train)}, B {len(domains.b)} (class counts {b_counts}), "
        f"A-test {len(domains.a_test)}"
    )

    trainer_runs = [
        TrainerRun(_run_name(run), trainer_argv(settings.preset, trainer_flags(run, settings, data, out, seed)),
                   out / "runs" / _run_name(run))
        for run in settings.runs
    ]  # fmt: skip
    say(f"training {len(trainer_runs)} runs, {settings.workers} at a time (logs: RUN/train.log)")
    seconds = run_trainers(trainer_runs, workers=settings.workers, say=say)

    results, translations = [], {}
    steps = {**TRAINER_PRESETS[settings.preset], **settings.overrides}["steps"]
    for run, trainer_run in zip(settings.runs, trainer_runs):
        name = trainer_run.name
        generator = load_generator(finished_checkpoint(trainer_run.out, steps))
        translated = translate_images(generator, domains.a_test)
        translations[name] = translated
        scores = score_digit_translations(translated, domains.a_test_labels, judge)
        predicted = judge.predict(translated)
        per_class = {str(d): float((predicted[domains.a_test_labels == d] == d).float().mean()) for d in range(10)}
        results.append({
            "method": run.method, "weight": run.weight, "lambda_travel": run.lambda_travel,
            "lambda_identity": run.lambda_identity, "embedder": run.embedder, **scores,
            "label_accuracy_by_class": per_class,
            "predicted_class_counts": torch.bincount(predicted, minlength=10).tolist(),
            "seconds": seconds.get(name, 0.0), "run_dir": str(trainer_run.out),
        })  # fmt: skip

    references = {
        "input unchanged": score_digit_translations(domains.a_test, domains.a_test_labels, judge),
        "ideal": score_digit_translations(domains.a_test_ideal, domains.a_test_labels, judge),
    }
    report = {
        "runs": results,
        "references": references,
        "settings": {**asdict(settings), "seed": seed, "quick": quick, "b_class_counts": b_counts,
                     "b_class_order": list(domains.class_order), "seconds": time.perf_counter() - started},
    }  # fmt: skip
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2))
    _write_grid(
        out / GRID_NAME, results, translations, domains.a_test, domains.a_test_ideal, domains.a_test_labels, settings
    )
    say(format_table(results, references))
    say(f"report: {out / REPORT_NAME}; grid: {out / GRID_NAME}; {report['settings']['seconds']:.0f} s")
    return report


def _best(results: Sequence[dict[str, Any]], method: str) -> dict[str, Any] | None:
    candidates = [r for r in results if r["method"] == method]
    return max(candidates, key=lambda r: (r["label_accuracy"], r["realism"])) if candidates else None


def _write_grid(
    path: Path, results: Sequence[dict[str, Any]], translations: dict[str, Tensor], inputs: Tensor, ideal: Tensor,
    labels: Tensor, settings: DigitDemoSettings,
) -> None:  # fmt: skip
    """input | GAN only | best travel | best identity-L1 | travel with the pixel embedder | ideal, upscaled 4x."""
    rows = _grid_rows(labels, settings.grid_rows)
    columns = [inputs[rows]]
    for method in ("gan", "travel", "identity-l1", "travel-pixel-embedder"):
        best = _best(results, method)
        if best is not None:
            columns.append(translations[_run_name(Run(best["method"], best["weight"]))][rows])
    columns.append(ideal[rows])
    save_image_grid([F.interpolate(c, scale_factor=4, mode="nearest") for c in columns], path)
