"""Run a study's trainer runs through the public command line, several at a time.

Each run of a study is the command line ``reference/train.py --preset NAME --flag value ...
--resume``: a run trains exactly what a user's command line would. ``--resume`` makes a rerun of
the study continue interrupted runs and skip finished ones.

The runs are tiny (16-32 px, a few hundred steps), so starting a Python process with torch for
each one would cost as much as a tenth of the run. :func:`run_trainers` therefore starts
``workers`` long-lived worker processes (one thread each) and hands them the runs one at a time;
a worker calls :func:`reference.train.main` with the run's arguments, the same function the
command line calls, and writes the run's output to ``OUT/train.log``. Every run starts by seeding
every generator from its ``--seed`` (``reference.runtime.seed_everything``), so a run in a worker
gives bit-identical weights to the same command line in a fresh process (tested).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference.config import command_line_flags

__all__ = ["TRAIN_SCRIPT", "TrainerRun", "finished_checkpoint", "run_trainers", "trainer_argv"]

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
REPOSITORY = TRAIN_SCRIPT.parent.parent
LOG_NAME = "train.log"


def trainer_argv(preset: str, flags: Mapping[str, Any]) -> list[str]:
    """``--preset PRESET`` plus one flag per item of ``flags`` (TrainConfig field names;
    ``True``/``False`` become ``--name``/``--no-name``; ``None`` is left out), and ``--resume``:
    the arguments of ``reference/train.py``."""
    return ["--preset", preset, *command_line_flags(flags), "--resume"]


@dataclass(frozen=True)
class TrainerRun:
    """One trainer run of a study: a name, the arguments of ``reference/train.py`` and the run folder (``--out``)."""

    name: str
    argv: list[str]
    out: Path

    @property
    def command(self) -> list[str]:
        """The same run as a command line of its own."""
        return [sys.executable, str(TRAIN_SCRIPT), *self.argv]


def run_trainers(
    runs: Sequence[TrainerRun], *, workers: int = 2, say: Callable[[str], Any] = print
) -> dict[str, float]:
    """Run ``runs`` in ``workers`` worker processes, in order; returns each run's wall seconds by name.

    A run that fails raises :class:`RuntimeError` with the end of its log, after the workers have
    been stopped. On KeyboardInterrupt (or SIGTERM turned into one by the caller) the workers get
    SIGTERM: their trainers save a checkpoint and exit, and rerunning the study continues them.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    pending = list(runs)
    command = [sys.executable, "-m", "reference.studies.runner"]
    pool = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPOSITORY, text=True)
        for _ in range(min(workers, len(runs)))
    ]
    busy: dict[int, tuple[TrainerRun, float]] = {}
    seconds: dict[str, float] = {}
    try:
        for index in range(len(pool)):
            _hand_out(pool, index, pending, busy)
        while busy:
            index = _next_finished(pool, busy)
            run, started = busy.pop(index)
            stdout = pool[index].stdout
            line = stdout.readline() if stdout else ""
            code = int(json.loads(line)["code"]) if line.strip() else -1
            if code != 0:
                tail = (run.out / LOG_NAME).read_text(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError(f"trainer run {run.name!r} exited with {code}; end of its log:\n" + "\n".join(tail))
            seconds[run.name] = time.perf_counter() - started
            say(f"    {run.name}: done in {seconds[run.name]:.0f} s ({len(seconds)}/{len(runs)})")
            _hand_out(pool, index, pending, busy)
    finally:
        for process in pool:
            if process.poll() is None and busy:
                process.send_signal(signal.SIGTERM)
            if process.stdin:
                process.stdin.close()
        for process in pool:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stdout:
                process.stdout.close()
    return seconds


def _hand_out(
    pool: list[subprocess.Popen[str]], index: int, pending: list[TrainerRun], busy: dict[int, tuple[TrainerRun, float]]
) -> None:
    if not pending:
        return
    run = pending.pop(0)
    run.out.mkdir(parents=True, exist_ok=True)
    stdin = pool[index].stdin
    assert stdin is not None
    stdin.write(json.dumps({"argv": run.argv, "log": str(run.out / LOG_NAME)}) + "\n")
    stdin.flush()
    busy[index] = (run, time.perf_counter())


def _next_finished(pool: list[subprocess.Popen[str]], busy: dict[int, tuple[TrainerRun, float]]) -> int:
    """The index of a busy worker whose answer can be read (or that died)."""
    with selectors.DefaultSelector() as selector:
        for index in busy:
            selector.register(pool[index].stdout, selectors.EVENT_READ, index)  # type: ignore[arg-type]
        return int(selector.select()[0][0].data)


def finished_checkpoint(out: Path, steps: int) -> Path:
    """``OUT/latest.pt`` of a run that reached ``steps``; KeyboardInterrupt if the run stopped early
    (it was interrupted: rerunning the study continues it)."""
    from reference.checkpoint import LATEST, load_checkpoint

    path = out / LATEST
    reached = int(load_checkpoint(path)["step"]) if path.is_file() else 0
    if reached < steps:
        raise KeyboardInterrupt(f"{out} stopped at step {reached} of {steps}; rerun the same command to continue")
    return path


def _worker() -> None:
    """Read ``{"argv": [...], "log": PATH}`` lines from stdin; run each through ``reference.train.main``
    with stdout and stderr in the log; answer ``{"code": N}`` on stdout."""
    import torch

    from reference.train import main

    torch.set_num_threads(1)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        task = json.loads(line)
        with open(task["log"], "ab") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                code = main(task["argv"])
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        answers.write(json.dumps({"code": code}) + "\n")


if __name__ == "__main__":
    _worker()
