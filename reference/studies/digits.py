r"""The digit study: does the travel loss keep a real digit's label while its style is translated?

``python reference/train.py --demo --out DIR`` (or :func:`run_digit_demo`) renders scikit-learn's
real handwritten digits as two unpaired domains (:mod:`reference.studies.digit_data`): A, light
ink on dark navy, every class equally often; B, dark red ink on cream paper with thick strokes
and strongly skewed class frequencies (the seed draws which classes are common). Every method is
a run of the public trainer, ``reference/train.py --preset digits-demo --g-width 8 --batch-size 16
--data-a DATA/trainA --data-b DATA/seed_S/trainB --seed S ...`` (:data:`MAIN_JOB`: the preset with a
narrower generator and a smaller batch), with the same networks, data, seed and budget:

- ``gan``: the adversarial loss alone;
- ``travel``: ``+ lambda * L_travel`` with the study's frozen stroke embedder
  (``--encoder-mode module --encoder reference/studies/digit_data.py:stroke_embedder``);
- ``identity-l1``: CycleGAN's identity term alone, ``+ w * mean|G(x) - x|`` (``--lambda-identity``);
- ``cycle``: CycleGAN's full objective at its default weights (``--lambda-cycle 10``, identity 0.5);
- ``patchnce``: CUT's PatchNCE (``--lambda-nce 1``, with the identity NCE on B; its MLP heads and
  patch count scaled down with the generator, 64 instead of 256: ``--nce-dim 64 --nce-patches 64``).

``--demo digits-full`` runs the preset's own recipe (G width 16, batch 32) and adds the lambda sweep
that chose the travel weight, the other identity weight, the structure term (:data:`STRUCTURE`:
alone, beside travel, and travel given CycleGAN's CPU time per run), TraVeLGAN's trainable Siamese
network, a randomly initialised frozen embedder and the pixel-embedder ablation (an embedder that
is *not* invariant to the style change), and travel with the embedder averaged over two shared
random views (``--travel-views 2``).

Each run translates 200 held-out A digits, scored by (``digit_data.score_digit_translations``):
**label accuracy** (an SVM judge fitted on B-style renders of other scans still reads the input's
digit), **KID** (pixel space, against B-style renders of held-out scans with every class equally
often: realism that sees speckle and collapse), **L1 to the ideal** (the same scan rendered in
B's style, known in this study) and the colour fraction (secondary). Known cases are scored the
same way: the ideal, the ideal with B-coloured speckle, the input unchanged and B-coloured noise.
The label-free flip audit (``digit_data.audit_digit_translations``) adds each run's share of flips
and how well ``travel_loss.flip_scores`` ranks them first (**audit AUROC**, with the audit embedder
no method trains against; the stroke embedder's beside it in the report).

Outputs in ``out_dir``: ``demo_report.json`` (every seed's row, the per-method summary, the
references, the settings), ``demo_grid.png`` (one held-out digit per class; input | each method |
ideal, first seed), ``demo_frontier.png`` (label accuracy against KID, one marker per method and
seed), the printed table, ``data/`` and ``runs/METHOD/seed_S/`` (the trainer's run folders;
``runs-full/`` for ``digits-full``, whose recipe differs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.evaluate import format_table as evaluate_table
from reference.evaluate import translate_images
from reference.logs import save_labelled_grid
from reference.presets import preset_config
from reference.studies.digit_data import (
    DigitDomains,
    DigitJudge,
    audit_digit_translations,
    coloured_noise,
    digit_domains,
    salt_and_pepper,
    score_digit_translations,
)
from reference.studies.runner import TrainerRun, finished_checkpoint, run_trainers, trainer_argv
from reference.translate import load_generator

__all__ = [
    "CORE", "FULL", "MAIN_JOB", "QUICK", "STRUCTURE", "DigitDemoSettings", "Method", "run_digit_demo", "summarise"
]  # fmt: skip

REPORT_NAME = "demo_report.json"
GRID_NAME = "demo_grid.png"
FRONTIER_NAME = "demo_frontier.png"
SECONDS_NAME = "study_seconds.txt"  # in each run folder: the wall seconds of the study run that trained it
_DATA = Path(__file__).with_name("digit_data.py")
EMBEDDERS = {name: f"{_DATA}:{name}_embedder" for name in ("stroke", "pixel", "random")}
TRAVEL_LAMBDA = 3.0  # chosen once by the digits-full sweep over 1, 3, 10, 30 (docs/studies.md)
IDENTITY_WEIGHT = 1.0  # the better of CycleGAN identity weights 1 and 10 in the same sweep
STRUCTURE_LAMBDA = 3.0  # weight of the structure term (self-similarity of the stroke field's 3 x 3 patches)
# CycleGAN's CPU seconds per step over travel's: 0.220 / 0.042 (one thread, (cpu(130 steps) - cpu(30 steps)) / 100)
CYCLE_COST_RATIO = 5.2
SPECKLE_DENSITY = 0.15  # the known case "ideal + speckle": a fraction of pixels set to B's ink or paper


@dataclass(frozen=True)
class Method:
    """One method of the study: the report's ``name`` and ``weight``, the trainer flags beside the
    preset, and its relative cost (for scheduling the longest runs first)."""

    name: str
    weight: float
    flags: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 1.0
    budget: float = 1.0  # the run trains for the study's steps times this (equal-compute rows)

    @property
    def key(self) -> str:
        return f"{self.name}_{self.weight:g}"


def _travel(weight: float, embedder: str = "stroke", name: str = "travel") -> Method:
    return Method(name, weight, {"lambda_travel": weight, "encoder": EMBEDDERS[embedder]})


def _structure(weight: float, travel: float = 0.0, name: str = "structure", **flags: Any) -> Method:
    """The structure term at ``weight`` (self-similarity of the stroke embedder's ``tokens``, global), with
    travel at ``travel`` (0: the structure term alone, the F-LSeSim-style baseline)."""
    return Method(
        name, weight, {"lambda_travel": travel, "lambda_structure": weight, "encoder": EMBEDDERS["stroke"], **flags}
    )


CORE: tuple[Method, ...] = (
    Method("gan", 0.0),
    _travel(TRAVEL_LAMBDA),
    Method("identity-l1", IDENTITY_WEIGHT, {"lambda_identity": IDENTITY_WEIGHT}),
    Method("cycle", 10.0, {"lambda_cycle": 10.0, "lambda_cycle_identity": 0.5}, cost=4.2),
    # CUT's objective; heads and patch count scaled with the preset's generator (width 16, CUT's 64: 256 / 4)
    Method("patchnce", 1.0, {"lambda_nce": 1.0, "nce_idt": True, "nce_dim": 64, "nce_patches": 64}, cost=2.6),
)
STRUCTURE: tuple[Method, ...] = (  # README: the structure term; in --demo digits-full
    _structure(STRUCTURE_LAMBDA),  # alone: the F-LSeSim-style baseline
    _structure(STRUCTURE_LAMBDA, TRAVEL_LAMBDA, name="travel+structure"),  # the weight is the structure term's
    Method(  # equal compute: travel for as many steps as CycleGAN's CPU time buys (its steps x cost ratio)
        "travel@cycle-cpu", TRAVEL_LAMBDA, _travel(TRAVEL_LAMBDA).flags, cost=CYCLE_COST_RATIO, budget=CYCLE_COST_RATIO
    ),
)
FULL: tuple[Method, ...] = (
    *CORE,
    *(_travel(w) for w in (1.0, 3.0, 10.0, 30.0) if w != TRAVEL_LAMBDA),
    *(Method("identity-l1", w, {"lambda_identity": w}) for w in (1.0, 10.0) if w != IDENTITY_WEIGHT),
    Method("siamese", 10.0, {"lambda_travel": 10.0, "encoder_mode": "siamese"}, cost=1.5),
    _travel(10.0, "random", name="random-embedder"),
    _travel(10.0, "pixel", name="pixel-embedder"),
    Method(  # the same travel run with E averaged over 2 shared random views (docs/views.md)
        "travel+views", TRAVEL_LAMBDA, {**_travel(TRAVEL_LAMBDA).flags, "travel_views": 2}, cost=1.3
    ),
    *STRUCTURE,
)


# The main job's recipe (``--demo``, ``--demo digits``): the digits-demo preset's 500 steps with G's
# width 8 instead of 16 and batch 16 instead of 32, about 2.2x less compute: 153-167 s on 2 cores
# where the preset's took 389 s the same day, with the same picture on seeds 0-2 and 3-5
# (docs/studies.md, "The main job's recipe").
# ``--demo digits-full`` (the sweeps and ablations) runs the preset itself.
MAIN_JOB: dict[str, Any] = {"g_width": 8, "batch_size": 16}


@dataclass(frozen=True)
class DigitDemoSettings:
    """What the study runs: the methods, the trainer recipe (a preset plus overrides), seeds, the grid."""

    methods: tuple[Method, ...] = CORE
    preset: str = "digits-demo"  # reference/presets.py: networks, optimiser, budget
    # TrainConfig fields that differ from the preset (default: the main job's)
    overrides: Mapping[str, Any] = field(default_factory=lambda: dict(MAIN_JOB))
    runs: str = "runs"  # the trainer runs' folder under the study's: one per recipe (a run resumes its own)
    seeds: int = 3  # seed, seed + 1, ...: networks' initialisation, data order, B's class order
    grid_rows: int = 10
    workers: int = 2  # trainer runs at once, one thread each

    @property
    def recipe(self) -> dict[str, Any]:
        """The preset's TrainConfig fields with the overrides applied."""
        return {**preset_config(self.preset), **self.overrides}

    @property
    def steps(self) -> int:
        return int(self.recipe["steps"])


QUICK = DigitDemoSettings(
    overrides=dict(g_width=8, g_blocks=1, d_width=8, batch_size=8, steps=4, nce_patches=16), seeds=2, grid_rows=4
)


def _write_folder(images: Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def _trainer_run(method: Method, settings: DigitDemoSettings, data: Path, out: Path, seed: int) -> TrainerRun:
    """``reference/train.py --preset digits-demo --data-a DATA/trainA --data-b DATA/seed_S/trainB
    --seed S --lambda-travel 0 [recipe and method flags] --out OUT/RUNS/METHOD/seed_S --resume``
    (RUNS: ``settings.runs``)."""
    run_dir = out / settings.runs / method.key / f"seed_{seed}"
    flags = {
        "lambda_travel": 0.0, "encoder": EMBEDDERS["stroke"], **settings.overrides, **method.flags,
        "data_a": str(data / "trainA"), "data_b": str(data / f"seed_{seed}" / "trainB"), "seed": seed,
        "out": str(run_dir), "log_every": max(1, settings.steps // 10), "sample_every": settings.steps,
        "checkpoint_every": settings.steps,
    }  # fmt: skip
    if method.budget != 1.0:
        flags["steps"] = round(settings.steps * method.budget)
    return TrainerRun(f"{method.key} seed {seed}", trainer_argv(settings.preset, flags), run_dir)


def run_digit_demo(
    out_dir: str | Path, *, seed: int = 0, quick: bool = False, full: bool = False,
    settings: DigitDemoSettings | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Run the digit study into ``out_dir`` (see the module docstring); returns the report dict.

    ``full`` runs :data:`FULL`'s methods; ``quick`` tiny networks for a few steps (a smoke test).
    """
    if settings is None:
        settings = QUICK if quick else DigitDemoSettings()
        if full:  # the preset's own recipe (the tables of docs/studies.md), or the quick one's
            settings = replace(settings, methods=FULL, overrides=settings.overrides if quick else {}, runs="runs-full")
    return _run_study(Path(out_dir), seed, settings, progress)


def _run_study(out: Path, first_seed: int, settings: DigitDemoSettings, progress: bool) -> dict[str, Any]:
    say = print if progress else (lambda *args, **kwargs: None)
    started = time.perf_counter()
    seeds = [first_seed + k for k in range(settings.seeds)]
    size = int(settings.recipe["size"])
    domains = {seed: digit_domains(seed=seed, size=size) for seed in seeds}
    data = out / "data"
    if not (data / "trainA").is_dir():
        _write_folder(domains[first_seed].a_train, data / "trainA")
    for seed in seeds:
        if not (data / f"seed_{seed}" / "trainB").is_dir():
            _write_folder(domains[seed].b, data / f"seed_{seed}" / "trainB")
    reference = domains[first_seed]
    say(
        f"digits: A-train {len(reference.a_train)}, A-test {len(reference.a_test)}, B per seed "
        + ", ".join(f"{len(domains[s].b)} (common classes {domains[s].class_order[:3]})" for s in seeds)
    )

    jobs = [(method, seed) for method in settings.methods for seed in seeds]
    runs = {(method.key, seed): _trainer_run(method, settings, data, out, seed) for method, seed in jobs}
    order = sorted(jobs, key=lambda job: -job[0].cost)  # longest first: the two workers finish together
    say(f"training {len(jobs)} runs ({len(settings.methods)} methods x {len(seeds)} seeds), {settings.workers} at once")
    finished_before = {run.name for run in runs.values() if (run.out / SECONDS_NAME).is_file()}
    seconds = run_trainers([runs[m.key, s] for m, s in order], workers=settings.workers, say=say)
    for run in runs.values():  # a rerun skips finished runs: keep the wall time of the run that trained
        if run.name in finished_before:
            seconds[run.name] = float((run.out / SECONDS_NAME).read_text())
        else:
            (run.out / SECONDS_NAME).write_text(f"{seconds.get(run.name, 0.0):.1f}\n")

    judge = DigitJudge(reference.judge, reference.judge_labels)
    rows, translations = [], {}
    for method, seed in jobs:
        run = runs[method.key, seed]
        translated = translate_images(load_generator(finished_checkpoint(run.out, settings.steps)), reference.a_test)
        if seed == first_seed:
            translations[method.key] = translated
        rows.append({
            "method": method.name, "weight": method.weight, "seed": seed, "flags": dict(method.flags),
            **score_digit_translations(translated, reference, judge),
            **audit_digit_translations(translated, reference, judge),
            "predicted_class_counts": torch.bincount(judge.predict(translated), minlength=10).tolist(),
            "seconds": seconds.get(run.name, 0.0), "run_dir": str(run.out),
        })  # fmt: skip
    references = reference_scores(reference, judge)
    summary = summarise(rows)
    report: dict[str, Any] = {
        "runs": rows,
        "summary": summary,
        "references": references,
        "settings": {
            **asdict(settings), "seeds": seeds, "b_class_order": {s: list(domains[s].class_order) for s in seeds},
            "torch": torch.__version__, "seconds": time.perf_counter() - started,
        },
    }  # fmt: skip
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2))
    rows_of_grid = _grid_rows(reference.a_test_labels, settings.grid_rows)
    columns = [reference.a_test[rows_of_grid]]
    columns += [translations[m.key][rows_of_grid] for m in settings.methods]
    columns.append(reference.a_test_ideal[rows_of_grid])
    labels = ["input (A)", *(f"{m.name}\nweight {m.weight:g}" for m in settings.methods), "ideal"]
    recipe = settings.recipe
    budget = f"{settings.steps} steps x batch {recipe['batch_size']}, G width {recipe['g_width']}"
    title = f"seed {first_seed}; {budget}: held-out A digits"
    save_labelled_grid(
        [F.interpolate(c, scale_factor=4, mode="nearest") for c in columns], labels, title, out / GRID_NAME
    )
    plot_frontier(report, out / FRONTIER_NAME, f"digit study, seeds {seeds[0]}-{seeds[-1]}; {budget}")
    say(format_table(summary, references))
    say(f"grid columns: input | {' | '.join(m.key for m in settings.methods)} | ideal")
    say(f"report: {out / REPORT_NAME}; grid: {out / GRID_NAME}; frontier: {out / FRONTIER_NAME}")
    say(f"{report['settings']['seconds']:.0f} s, torch {torch.__version__}")
    return report


def reference_scores(domains: DigitDomains, judge: DigitJudge) -> dict[str, dict[str, float]]:
    """The known cases, scored like the methods: the ideal translation, the ideal with
    ``SPECKLE_DENSITY`` B-coloured salt and pepper, the input unchanged, B-coloured noise."""
    draw = torch.Generator().manual_seed(0)
    cases = {
        "ideal": domains.a_test_ideal,
        f"ideal + {SPECKLE_DENSITY:.0%} speckle": salt_and_pepper(domains.a_test_ideal, SPECKLE_DENSITY, draw),
        "input unchanged": domains.a_test,
        "B-coloured noise": coloured_noise(len(domains.a_test), domains.a_test.shape[-1], draw),
    }
    return {name: score_digit_translations(images, domains, judge) for name, images in cases.items()}


SCORES = ("label_accuracy", "kid", "fidelity_l1", "realism", "seconds")
# the label-free flip audit (digit_data.audit_digit_translations); None where no or every digit flipped
AUDIT_SCORES = ("flip_share", "audit_auroc", "audit_top10_flips", "audit_auroc_stroke", "audit_top10_flips_stroke")


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, weight), in first-seen order: each score's mean, min and max over seeds."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["weight"]), []).append(row)
    summary = []
    for (method, weight), members in groups.items():
        entry: dict[str, Any] = {"method": method, "weight": weight, "seeds": [r["seed"] for r in members]}
        for score in SCORES:
            values = [float(r[score]) for r in members]
            entry[score] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
        for score in AUDIT_SCORES:
            known = [float(r[score]) for r in members if r.get(score) is not None]
            entry[score] = {"mean": sum(known) / len(known), "min": min(known), "max": max(known)} if known else None
        summary.append(entry)
    return summary


TABLE_COLUMNS = ("method", "weight", "label accuracy", "KID x1e3", "L1 to ideal", "colour frac", "audit AUROC", "s/run")


def format_table(summary: Sequence[Mapping[str, Any]], references: Mapping[str, Mapping[str, float]]) -> str:
    """Mean (min-max over seeds) per method; KID x 1e3; audit AUROC how well the label-free audit
    with the audit embedder ranks the judge's flips first ("-" where no digit or every digit
    flipped); s/run the mean wall seconds of a run; the known cases below, in parentheses
    (``reference.evaluate.format_table`` lays it out)."""

    def spread(score: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
        return (
            f"{score['mean'] * scale:.{digits}f} ({score['min'] * scale:.{digits}f}-{score['max'] * scale:.{digits}f})"
        )

    def cells(label: str, weight: str, scores: Sequence[str], seconds: str) -> dict[str, str]:
        return dict(zip(TABLE_COLUMNS, (label, weight, *scores, seconds)))

    rows = []
    for row in summary:
        scores = [spread(row["label_accuracy"]), spread(row["kid"], 1e3, 1)]
        scores += [spread(row["fidelity_l1"]), spread(row["realism"])]
        scores.append(spread(row["audit_auroc"], digits=2) if row.get("audit_auroc") else "-")
        rows.append(cells(row["method"], f"{row['weight']:g}", scores, f"{row['seconds']['mean']:.0f}"))
    for name, known in references.items():
        scores = [f"{known['label_accuracy']:.3f}", f"{known['kid'] * 1e3:.1f}"]
        scores += [f"{known['fidelity_l1']:.3f}", f"{known['realism']:.3f}", ""]
        rows.append(cells(f"({name})", "", scores, ""))
    return evaluate_table(rows, TABLE_COLUMNS, right=("weight", "s/run"))


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


def plot_frontier(report: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Label accuracy against KID (log scale), one marker per method and seed; the known cases marked;
    ``title`` above (the seeds and the recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    markers = "osD^vP*Xhp<>"
    keys = list(dict.fromkeys((r["method"], r["weight"]) for r in report["runs"]))
    for index, key in enumerate(keys):
        points = [r for r in report["runs"] if (r["method"], r["weight"]) == key]
        axes.scatter(
            [max(r["kid"], 1e-5) * 1e3 for r in points], [r["label_accuracy"] for r in points],
            marker=markers[index % len(markers)], s=45, label=f"{key[0]} {key[1]:g}", alpha=0.85,
        )  # fmt: skip
    for name, scores in report["references"].items():
        x, y = max(scores["kid"], 1e-5) * 1e3, scores["label_accuracy"]
        axes.scatter([x], [y], marker="x", color="black", s=40)
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("KID x 1e3 against balanced B renders (pixels; lower is more realistic)")
    axes.set_ylabel("label accuracy (judge reads the input's digit)")
    axes.set_ylim(-0.03, 1.03)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
