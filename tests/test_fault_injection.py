"""kill -9 a small CPU training run at seeded random moments, including inside checkpoint writes: every
time the folder holds a loadable checkpoint, and --resume ends with weights bit-identical to an
uninterrupted run.

Moments are of four kinds: a SIGKILL from outside after a random delay, and a SIGKILL the run sends
itself (a real kill -9, at a chosen place) half-way through writing a checkpoint, just before the
atomic rename of a checkpoint, or just after it (between latest.pt and its step_*.pt link). The
default suite runs 3 moments; ``python -m pytest -m slow tests/test_fault_injection.py`` runs 20.

The runs are processes forked from one ``forkserver`` that has imported the trainer once, so a
run starts in a fraction of a second instead of importing torch each time.
"""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from reference.checkpoint import load_checkpoint

STEPS = 24
ARGUMENTS = [  # with --data DATA, the tiny_folders fixture
    "--size", "16", "--d-layers", "1", "--batch-size", "2",
    "--g-width", "4", "--g-blocks", "0", "--d-width", "4", "--encoder-mode", "siamese", "--siamese-width", "4",
    "--siamese-dim", "4", "--augment", "color,translation,cutout", "--steps", str(STEPS), "--log-every", "1",
    "--sample-every", "100000", "--num-workers", "0", "--checkpoint-every", "1", "--keep-checkpoints", "2",
]  # fmt: skip
COMPARED = ("generator", "discriminator", "siamese", "optimizers", "schedulers", "step")
KINDS = ("timed", "mid-write", "before-rename", "after-rename")


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _run(argv: list[str], fault: tuple[str, int] | None) -> None:
    """A training run in a child process; ``fault`` = (kind, n) kills it at the n-th checkpoint write or rename."""
    sys.stdout = sys.stderr = open(os.devnull, "w")  # no progress bars in the test output
    torch.set_num_threads(1)
    if fault is not None:
        kind, nth = fault
        calls = {"save": 0, "rename": 0}
        real_save, real_replace = torch.save, os.replace

        def save(obj: object, path: str) -> None:
            calls["save"] += 1
            if kind == "mid-write" and calls["save"] == nth:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                with open(path, "wb") as file:
                    file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    file.flush()
                _kill_self()
            real_save(obj, path)

        def replace(source: str, target: str) -> None:
            calls["rename"] += 1
            if kind == "before-rename" and calls["rename"] == nth:
                _kill_self()
            real_replace(source, target)
            if kind == "after-rename" and calls["rename"] == nth:
                _kill_self()

        torch.save, os.replace = save, replace  # type: ignore[assignment]
    from reference.train import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def context() -> multiprocessing.context.BaseContext:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = multiprocessing.get_context("forkserver")
    preload = [
        "torch",
        "torch._dynamo",
        "reference.train",
        "reference.data",
        "reference.stream",
        "test_fault_injection",
    ]
    if importlib.util.find_spec("tensorboard") is not None:  # imported by the metrics log
        preload.append("torch.utils.tensorboard")
    context.set_forkserver_preload(preload)
    return context


def _start(context, data: Path, out: Path, fault: tuple[str, int] | None = None, *extra: str):
    process = context.Process(target=_run, args=([*ARGUMENTS, "--data", str(data), "--out", str(out), *extra], fault))
    process.start()
    return process


@dataclass(frozen=True)
class Uninterrupted:
    checkpoint: dict  # the final checkpoint of a run that nobody killed
    seconds: float  # from its first checkpoint to its end: the window a timed kill must fall in


@pytest.fixture(scope="module")
def uninterrupted(context, tiny_folders: Path, tmp_path_factory: pytest.TempPathFactory) -> Uninterrupted:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    process = _start(context, tiny_folders, out)
    _wait_for_first_checkpoint(process, out)
    first_checkpoint = time.monotonic()
    process.join(300)
    assert process.exitcode == 0
    return Uninterrupted(load_checkpoint(out / "latest.pt"), time.monotonic() - first_checkpoint)


def _wait_for_first_checkpoint(process, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not (out / "latest.pt").exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)


def _moments(count: int, seed: int = 11) -> list[tuple[str, float | int]]:
    """``count`` seeded moments, the kinds in turn: (timed, fraction of the time from the first checkpoint
    to the end of an uninterrupted run) or (kind, n)."""
    rng = random.Random(seed)
    moments: list[tuple[str, float | int]] = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)] if count >= len(KINDS) else ("timed", "mid-write", "after-rename")[index]
        if kind == "timed":
            moments.append((kind, rng.uniform(0.0, 0.8)))
        elif kind == "mid-write":
            moments.append((kind, rng.randint(2, STEPS - 1)))  # the n-th checkpoint write (one per step)
        else:
            moments.append((kind, rng.randint(3, 2 * STEPS - 2)))  # renames: latest.pt, then step_*.pt, per step
    return moments


def assert_equal(a: object, b: object, where: str) -> None:
    """``a`` and ``b`` (nested dicts, lists and tuples of tensors and plain values) are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{index}]")
    else:
        assert a == b, (where, a, b)


def _kill_and_resume(
    context, data: Path, out: Path, moment: tuple[str, float | int], uninterrupted: Uninterrupted
) -> int:
    kind, value = moment
    if kind == "timed":
        process = _start(context, data, out)
        _wait_for_first_checkpoint(process, out)
        time.sleep(float(value) * uninterrupted.seconds)
        process.kill()
    else:
        process = _start(context, data, out, (kind, int(value)))
    process.join(300)
    if process.exitcode == 0:
        pytest.fail(f"{moment}: the run ended before the kill; shorten the delays")
    assert process.exitcode == -signal.SIGKILL, (moment, process.exitcode)
    step = load_checkpoint(out / "latest.pt")["step"]  # a loadable checkpoint, every time
    resumed = _start(context, data, out, None, "--resume")
    resumed.join(300)
    assert resumed.exitcode == 0, moment
    assert not list(out.glob(".*.tmp-*")), "a half-written temporary file was left behind"
    final = load_checkpoint(out / "latest.pt")
    for key in COMPARED:
        assert_equal(final[key], uninterrupted.checkpoint[key], f"{moment}: {key}")
    return step


def test_kill_at_three_moments_then_resume_bit_exactly(context, uninterrupted, tiny_folders, tmp_path: Path) -> None:
    steps = [
        _kill_and_resume(context, tiny_folders, tmp_path / f"m{i}", m, uninterrupted) for i, m in enumerate(_moments(3))
    ]
    assert all(1 <= s < STEPS for s in steps)


@pytest.mark.slow
def test_kill_at_twenty_moments_then_resume_bit_exactly(
    context, uninterrupted, tiny_folders, tmp_path: Path, request
) -> None:
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("20 kills take about a minute: run with -m slow")
    steps = [
        _kill_and_resume(context, tiny_folders, tmp_path / f"m{i}", m, uninterrupted)
        for i, m in enumerate(_moments(20))
    ]
    assert all(1 <= s < STEPS for s in steps)
