r"""The toy-street frontier: semantic flip rate against realism, one curve per method over its weights.

Every run is a run of the toy-street study (:mod:`reference.studies.streets`: the same data, preset, seed
and budget, trained through ``reference/train.py --preset toy-demo``), with more weights per
method than the demo has:

- ``gan``: lambda = 0;
- ``travel``: the frozen palette-free layout encoder at lambda in ``TRAVEL_WEIGHTS``;
- ``travel-auto``: ``--lambda-travel auto`` (the gradient-balanced lambda of
  :mod:`travel_loss.lambdas`) at the scales in ``AUTO_SCALES`` (its weight is the scale);
- ``identity-l1``: CycleGAN's identity term alone at the weights in ``IDENTITY_WEIGHTS``;
- ``cycle``: CycleGAN's objective at cycle weights ``CYCLE_WEIGHTS`` (identity 0.5);
- ``siamese`` (TraVeLGAN, lambda 10) and ``random-encoder`` (the ablation, lambda 10).

The claim is judged the way :func:`reference.studies.streets.select_best` does: among runs whose flip rate is
at most half the GAN's, the most realistic one of each method.

Output in ``--out``: the study's ``demo_report.json`` and ``demo_grid.png``, plus ``frontier.png``
(flip rate against realism, one curve per method; the ideal translation and the unchanged input
as reference points) and ``frontier.md`` (the table)::

    python reference/studies/street_sweep.py --out runs/frontier        # 14 runs, two at a time: 33 min on 2 cores
    python reference/studies/street_sweep.py --out /tmp/smoke --quick       # tiny networks, a few steps
    python reference/studies/street_sweep.py --out runs/r1 --set r1_gamma=0.05 --set d_norm=none   # another recipe

``--set NAME=VALUE`` changes a field of the preset's recipe for every run (any ``TrainConfig``
field, the value written as on ``train.py``'s command line); the methods' own flags still apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.studies.streets import FULL, QUICK, DemoSettings, Method, car_flip_rate, run_demo, select_best

__all__ = ["frontier_settings", "frontier_table", "parse_recipe_changes", "plot_frontier", "run_sweep"]

TRAVEL_WEIGHTS = (1.0, 3.0, 10.0, 30.0, 100.0)
AUTO_SCALES = (1.0,)
IDENTITY_WEIGHTS = (1.0, 3.0, 10.0, 30.0)
CYCLE_WEIGHTS = (10.0,)
PLOT_NAME, TABLE_NAME = "frontier.png", "frontier.md"


def frontier_settings(base: DemoSettings = FULL) -> DemoSettings:
    """``base`` with the sweep's runs (see the module docstring)."""
    runs = [Method("gan", 0.0)]
    runs += [Method("travel", w) for w in TRAVEL_WEIGHTS]
    runs += [Method("travel-auto", s) for s in AUTO_SCALES]
    runs += [Method("identity-l1", w) for w in IDENTITY_WEIGHTS]
    runs += [Method("cycle", w) for w in CYCLE_WEIGHTS]
    runs += [Method("siamese", 10.0), Method("random-encoder", 10.0)]
    return replace(base, runs=tuple(runs))


def frontier_table(report: dict[str, Any]) -> str:
    """A markdown table of every run, the runs the claim is judged on marked with *."""
    runs = report["runs"]
    gan = next((r for r in runs if r["method"] == "gan"), None)
    limit = 0.5 * gan["semantic_flip_rate"] if gan else math.inf
    chosen = {id(select_best(runs, m, limit)) for m in {r["method"] for r in runs}}
    lines = ["| method | weight | flip rate | car flips | lane accuracy | realism |", "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        mark = " *" if id(run) in chosen and run["method"] != "gan" else ""
        lines.append(
            f"| {run['method']}{mark} | {run['weight']:g} | {run['semantic_flip_rate']:.3f} | "
            f"{car_flip_rate(run):.3f} | {run['lane_accuracy']:.3f} | {run['realism']:.3f} |"
        )
    for name, row in report["references"].items():
        lines.append(
            f"| ({name}) | | {row['semantic_flip_rate']:.3f} | {car_flip_rate(row):.3f} | {row['lane_accuracy']:.3f} | "
            f"{row['realism']:.3f} |"
        )
    lines.append(f"\n\\* the run of its method the claim is judged on (flip rate <= {limit:.3f}, half the GAN's).")
    return "\n".join(lines)


def plot_frontier(report: dict[str, Any], path: str | Path) -> Path:
    """Flip rate (x, lower is better) against realism (y, higher is better), one curve per method
    ordered by weight, the weights written beside the points; a dashed line at half the GAN's flip rate."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.5))
    axes = figure.add_subplot()
    runs = report["runs"]
    for method in dict.fromkeys(r["method"] for r in runs):
        points = sorted((r for r in runs if r["method"] == method), key=lambda r: r["weight"])
        xs, ys = [r["semantic_flip_rate"] for r in points], [r["realism"] for r in points]
        axes.plot(xs, ys, marker="o", label=method)
        if method != "gan":
            for r, x, y in zip(points, xs, ys):
                axes.annotate(f"{r['weight']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for name, row in report["references"].items():
        axes.scatter([row["semantic_flip_rate"]], [row["realism"]], marker="*", s=120, color="black")
        axes.annotate(name, (row["semantic_flip_rate"], row["realism"]), xytext=(5, -10), textcoords="offset points")
    gan = next((r for r in runs if r["method"] == "gan"), None)
    if gan:
        axes.axvline(0.5 * gan["semantic_flip_rate"], linestyle="--", color="grey", linewidth=1)
    axes.set_xlabel("semantic flip rate (lower keeps more of the input's layout)")
    axes.set_ylabel("realism (fraction of pixels in B's colours)")
    axes.set_xlim(-0.02, 1.0)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    settings = report["settings"]
    axes.set_title(f"toy streets, {settings['recipe']['steps']} steps, seed {settings['seed']}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def parse_recipe_changes(items: Sequence[str]) -> dict[str, Any]:
    """``["r1_gamma=0.05", "d_norm=none"]`` -> ``{"r1_gamma": 0.05, "d_norm": "none"}``, each value
    parsed and checked by ``train.py``'s own flag; ValueError naming the item otherwise."""
    from reference.train import TrainConfig, build_parser

    parser = build_parser()
    parser.exit_on_error = False  # a bad value raises ArgumentError instead of printing the usage and exiting
    names = {item.name for item in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise ValueError(f"--set: expected NAME=VALUE with NAME a TrainConfig field, got {item!r}")
        flag = "--" + name.replace("_", "-")
        if isinstance(parser.get_default(name), bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--set: {name} takes true or false, got {value!r}")
            changes[name] = value.lower() == "true"
            continue
        try:
            parsed = parser.parse_args(["--toy-streets", flag, value])
        except argparse.ArgumentError as error:
            raise ValueError(f"--set: bad value for {name}: {value!r} ({error.message})") from None
        changes[name] = getattr(parsed, name)
    return changes


def run_sweep(
    out: str | Path, *, seed: int = 0, quick: bool = False, workers: int = 2, progress: bool = True,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the frontier into ``out`` and write ``frontier.png`` and ``frontier.md`` beside the study's report.

    ``recipe``: TrainConfig fields that replace the preset's for every run (see ``--set``).
    """
    settings = frontier_settings(QUICK if quick else FULL)
    settings = replace(settings, workers=workers, overrides={**settings.overrides, **(recipe or {})})
    report = run_demo(out, seed=seed, quick=quick, settings=settings, progress=progress)
    plot_frontier(report, Path(out) / PLOT_NAME)
    (Path(out) / TABLE_NAME).write_text(frontier_table(report) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reference/studies/street_sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (a rerun continues its runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="trainer runs at once, one thread each")
    parser.add_argument("--quick", action="store_true", help="tiny networks, a few steps: a smoke test")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="change a field of the preset's recipe for every run (repeatable), e.g. --set r1_gamma=0.05",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        recipe = parse_recipe_changes(args.set)
    except ValueError as error:
        parser.error(str(error))
    run_sweep(args.out, seed=args.seed, quick=args.quick, workers=args.workers, recipe=recipe)
    print(f"frontier: {Path(args.out) / PLOT_NAME}, table: {Path(args.out) / TABLE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
