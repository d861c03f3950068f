"""Run a study's trainer runs through the public command line, several at a time.

Each run of a study is ``python reference/train.py --preset NAME --flag value ... --resume`` in
its own process (one thread each: the studies' networks are tiny and the runs are independent),
so a study trains exactly what a user's command line would, and never imports the trainer.
``--resume`` makes a rerun of the study continue interrupted runs and skip finished ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TRAIN_SCRIPT", "TrainerRun", "run_trainers", "trainer_argv"]

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
LOG_NAME = "train.log"


def trainer_argv(preset: str, flags: Mapping[str, Any]) -> list[str]:
    """``reference/train.py --preset PRESET`` plus one flag per item of ``flags`` (TrainConfig field
    names; ``True``/``False`` become ``--name``/``--no-name``; ``None`` is left out), and ``--resume``."""
    argv = [sys.executable, str(TRAIN_SCRIPT), "--preset", preset]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return [*argv, "--resume"]


@dataclass(frozen=True)
class TrainerRun:
    """One trainer run of a study: a name, the command line and the run folder (``--out``)."""

    name: str
    argv: list[str]
    out: Path


def run_trainers(
    runs: Sequence[TrainerRun], *, workers: int = 2, say: Callable[[str], Any] = print
) -> dict[str, float]:
    """Run ``runs`` with at most ``workers`` at once; returns each run's wall seconds by name.

    Each run's output goes to ``OUT/train.log``. A run that fails raises :class:`RuntimeError` with
    the end of its log, after the others have been stopped. On KeyboardInterrupt (or SIGTERM
    turned into one by the caller) the running trainers get SIGTERM, save a checkpoint and exit;
    rerunning the study continues them.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(runs)
    running: dict[str, tuple[subprocess.Popen[bytes], float, TrainerRun]] = {}
    seconds: dict[str, float] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                run = pending.pop(0)
                run.out.mkdir(parents=True, exist_ok=True)
                with open(run.out / LOG_NAME, "ab") as log:
                    process = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[run.name] = (process, time.perf_counter(), run)
            time.sleep(0.2)
            for name, (process, started, run) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    tail = (run.out / LOG_NAME).read_text(errors="replace").strip().splitlines()[-15:]
                    raise RuntimeError(f"trainer run {name!r} exited with {code}; end of its log:\n" + "\n".join(tail))
                seconds[name] = time.perf_counter() - started
                say(f"    {name}: done in {seconds[name]:.0f} s")
    finally:
        for process, _, _ in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _, _ in running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    return seconds


def finished_checkpoint(out: Path, steps: int) -> Path:
    """``OUT/latest.pt`` of a run that reached ``steps``; KeyboardInterrupt if the run stopped early
    (it was interrupted: rerunning the study continues it)."""
    from reference.checkpoint import LATEST, load_checkpoint

    path = out / LATEST
    reached = int(load_checkpoint(path)["step"]) if path.is_file() else 0
    if reached < steps:
        raise KeyboardInterrupt(f"{out} stopped at step {reached} of {steps}; rerun the same command to continue")
    return path
