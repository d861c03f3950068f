"""Where the digit study's CPU time goes: one trainer run per method, its CPU seconds against travel's.

Each method of the study runs once (seed 0, the main job's recipe and flags from
``reference.studies.digits``, ``--steps`` steps; ``--set`` changes the recipe) through
``reference.train.main`` in a fresh process with one thread, as the study's workers run it.
Printed per run: the CPU seconds (user + sys) of ``main``, the ratio to the travel run measured in
the same call, and with ``--profile`` the share of cProfile's time in autograd's backward,
convolutions (forward), instance norms, reflection pads, linear layers (the PatchNCE heads), the
optimizers and the rest (cProfile slows Python-heavy parts, so the shares are indicative; the CPU
column is from the same profiled run then).

    python benchmarks/profile_digit_runs.py --steps 100      # fixed costs included: imports, data checks (about 4 s)
    python benchmarks/profile_digit_runs.py --methods travel cycle patchnce --steps 500 --profile
    python benchmarks/profile_digit_runs.py --set g_width=16 batch_size=32    # the preset's recipe (digits-full)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import cProfile, json, pstats, sys, time
import torch
torch.set_num_threads(1)
from reference.train import main
argv, profile = json.loads(sys.argv[1]), sys.argv[2] == "1"
profiler = cProfile.Profile() if profile else None
start = time.process_time()
if profiler:
    profiler.enable()
code = main(argv)
if profiler:
    profiler.disable()
cpu = time.process_time() - start
shares = {}
if profiler:
    stats = pstats.Stats(profiler).stats
    total = sum(entry[2] for entry in stats.values())  # tottime of every function
    kinds = {  # substrings of cProfile's function names: autograd's engine, torch's built-in ops, Adam
        "backward": ("'run_backward'",), "conv": ("torch.conv2d>", "torch.conv_transpose2d>"),
        "norm": ("torch.instance_norm>",), "pad": ("_nn.pad>",), "linear": ("_nn.linear>",),
        "optimizer": ("(_single_tensor_adam)", "(_multi_tensor_adam)"),
    }
    for kind, names in kinds.items():
        shares[kind] = sum(
            entry[2] for (_, _, name), entry in stats.items() if any(n in f"({name})" for n in names)
        ) / total
    shares["rest"] = 1 - sum(shares.values())
print("RESULT " + json.dumps({"code": code, "cpu": cpu, "shares": shares}))
"""
KINDS = ("backward", "conv", "norm", "pad", "linear", "optimizer", "rest")


def measure(argv: list[str], profile: bool) -> dict[str, Any]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(argv), "1" if profile else "0"],
        cwd=ROOT, env=environment, capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def _override(item: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> (field, value), the value read as JSON where it parses (``true``, ``16``), else a string."""
    name, separator, text = item.partition("=")
    if not separator:
        raise SystemExit(f"--set: expected FIELD=VALUE, got {item!r}")
    try:
        return name, json.loads(text)
    except json.JSONDecodeError:
        return name, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="method names of the study (default: CORE's)")
    parser.add_argument("--steps", type=int, default=100, help="steps per run (the study trains 500)")
    parser.add_argument("--profile", action="store_true", help="also the shares of cProfile's time")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE",
        help="TrainConfig fields to override in every run (beside the main job's), e.g. batch_size=32 g_width=16",
    )  # fmt: skip
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from reference.studies.digit_data import digit_domains
    from reference.studies.digits import CORE, MAIN_JOB, DigitDemoSettings, _trainer_run, _write_folder

    methods = [m for m in CORE if args.methods is None or m.name in args.methods]
    if not any(m.name == "travel" for m in methods):
        methods.insert(0, next(m for m in CORE if m.name == "travel"))  # the baseline of the ratios
    overrides = {**MAIN_JOB, "steps": args.steps, **dict(_override(item) for item in args.set)}
    settings = DigitDemoSettings(overrides=overrides)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        domains = digit_domains(seed=0, size=int(settings.recipe["size"]))
        _write_folder(domains.a_train, out / "data" / "trainA")
        _write_folder(domains.b, out / "data" / "seed_0" / "trainB")
        results = {}
        for method in methods:
            run = _trainer_run(method, settings, out / "data", out, seed=0)
            results[method.key] = measure([a for a in run.argv if a != "--resume"], args.profile)
            print(f"  {method.key}: {results[method.key]['cpu']:.1f} s CPU", file=sys.stderr, flush=True)
    travel = next(r for key, r in results.items() if key.startswith("travel_"))["cpu"]
    print(f"digit study runs, {args.steps} steps, one thread each; torch {torch.__version__}")
    header = f"{'method':<16} {'CPU s':>7} {'vs travel':>9}"
    if args.profile:
        header += "".join(f" {kind:>9}" for kind in KINDS)
    print(header + "\n" + "-" * len(header))
    for key, result in results.items():
        line = f"{key:<16} {result['cpu']:7.1f} {result['cpu'] / travel:8.2f}x"
        if args.profile:
            line += "".join(f" {result['shares'][kind]:9.0%}" for kind in KINDS)
        print(line)


if __name__ == "__main__":
    main()
