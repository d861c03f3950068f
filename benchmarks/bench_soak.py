r"""Soak test of the reference trainer: resident memory and step time over a few thousand steps.

A tiny configuration (16 px images read from a folder of PNGs, a 4-wide generator, the siamese
embedder) trains for ``--steps`` steps with everything a long run does: metric lines every
``--log-every`` steps, atomic checkpoints with kept step files, sample grids, and decode
failures (one file of the folder has corrupt compressed data, so it is skipped and counted on
every epoch). At every metric line the process's resident set size (``/proc/self/statm``) is
recorded next to the interval's step time.

Printed: RSS after the warm-up (the first ``--warmup`` steps) and at the end, the growth (it
should be within noise: a few MiB from allocator and Python caches, not a slope), and the
median step time of the first and of the last tenth of the run after the warm-up, with their
ratio (the drift; 1.0 is none), in wall time and in this process's CPU time (which other
processes on a shared machine do not inflate). The baseline for both is the run's own start.

Then ``--cycles`` kill/resume cycles of another tiny run (each in a child process that resumes
the last checkpoint): most cycles end in a ``kill -9`` at a random moment after the run has
written a new checkpoint; every third diverges instead (G's adversarial loss made NaN at a random
step ahead, injected into the child's ``reference.steps``), which must end the child with exit
status 1 and the one-line divergence message, leaving the checkpoint it had. After every cycle
each ``*.pt`` file in the run folder is read and every floating-point tensor checked: printed
are the cycles of each kind, the checkpoint files read and the non-finite tensors found (0).

    python benchmarks/bench_soak.py                 # 3000 steps, about 2-4 minutes on 2 CPU cores
    python benchmarks/bench_soak.py --steps 600     # a shortened soak
    python benchmarks/bench_soak.py --steps 0 --cycles 9    # the kill/resume/divergence cycles only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools
import multiprocessing
import random

import numpy as np
import torch
from PIL import Image

from reference import logs
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.data import UnreadableImageWarning
from reference.train import train

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def resident_mib() -> float:
    """Resident set size of this process in MiB, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * PAGE_MIB


def write_folder(root: Path, count: int) -> None:
    """root/trainA, root/trainB with ``count`` random 16 px PNGs each; trainA/0.png cannot be decoded."""
    rng = np.random.default_rng(0)
    for side in "AB":
        (root / f"train{side}").mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / f"train{side}" / f"{index}.png"
            )
    broken = root / "trainA" / "0.png"
    broken.write_bytes(scramble_png_pixels(broken.read_bytes()))


def scramble_png_pixels(data: bytes) -> bytes:
    """The PNG with its compressed pixel data (IDAT) scrambled under recomputed CRCs: it passes PIL's
    ``verify()`` at start-up and fails when decoded during training."""
    out, position = bytearray(data[:8]), 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            body = bytes(b ^ 0x5A for b in body)
        out += struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        position += 12 + length
    return bytes(out)


CYCLE_ARGUMENTS = [  # the kill/resume cycles' run: a checkpoint every 4 steps, the last 3 kept
    "--size", "16", "--batch-size", "2", "--g-width", "4", "--g-blocks", "0", "--d-width", "4", "--d-layers", "1",
    "--encoder-mode", "siamese", "--siamese-width", "4", "--siamese-dim", "4", "--lambda-travel", "1",
    "--augment", "color,translation", "--steps", "1000000", "--log-every", "2", "--sample-every", "1000000",
    "--checkpoint-every", "4", "--keep-checkpoints", "3", "--num-workers", "0",
]  # fmt: skip


def _cycle_child(argv: list[str], nan_at: int | None, log: str) -> None:
    """One cycle's trainer (``main``, as the command line runs it); ``nan_at``: the step at which G's
    adversarial loss is made NaN (read from G's learning-rate schedule, which counts the steps)."""
    sys.stdout = sys.stderr = open(log, "w", buffering=1)  # for the child's whole life
    torch.set_num_threads(1)
    from reference import steps
    from reference import train as train_module

    if nan_at is not None:
        original_step, original_loss = train_module.TrainingRun.step, steps.generator_adversarial_loss  # type: ignore[attr-defined]
        poisoned = [False]

        def step(run: Any, real_a: torch.Tensor, real_b: torch.Tensor) -> Any:
            poisoned[0] = run.schedulers["generator"].last_epoch + 1 == nan_at
            try:
                return original_step(run, real_a, real_b)
            finally:
                poisoned[0] = False

        def adversarial(logits: torch.Tensor, kind: str) -> torch.Tensor:
            loss = original_loss(logits, kind)
            return loss * float("nan") if poisoned[0] else loss

        train_module.TrainingRun.step = step  # type: ignore[method-assign,assignment]
        steps.generator_adversarial_loss = adversarial  # type: ignore[attr-defined,assignment]
    sys.exit(train_module.main(argv))


def non_finite_tensors(folder: Path) -> tuple[int, int]:
    """(checkpoint files read, floating-point tensors in them that hold NaN or inf)."""

    def tensors(value: Any) -> Iterator[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    files = sorted(folder.glob("*.pt"))
    bad = sum(
        1
        for path in files
        for tensor in tensors(load_checkpoint(path))
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    )
    return len(files), bad


def _latest_step(out: Path) -> int:
    try:
        return int(load_checkpoint(out / "latest.pt")["step"])
    except (FileNotFoundError, ValueError):
        return 0


def kill_resume_cycles(root: Path, out: Path, cycles: int, seed: int = 0) -> None:
    """``cycles`` kill/resume cycles, every third a divergence; prints what every checkpoint held."""
    rng = random.Random(seed)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "reference.train", "reference.steps"])
    argv = [*CYCLE_ARGUMENTS, "--data", str(root), "--out", str(out)]
    counts = {"killed": 0, "diverged": 0}
    files_read = non_finite = 0
    messages: list[str] = []
    for cycle in range(cycles):
        before = _latest_step(out)
        resume = ["--resume"] if before else []
        log = out.parent / f"cycle{cycle}.log"
        diverge = cycle % 3 == 2
        nan_at = before + rng.randint(1, 10) if diverge else None
        child = context.Process(target=_cycle_child, args=([*argv, *resume], nan_at, str(log)))
        child.start()
        if diverge:
            child.join(600)
            text = log.read_text()
            line = [line for line in text.splitlines() if "training diverged" in line]
            if child.exitcode != 1 or len(line) != 1:
                raise RuntimeError(f"cycle {cycle}: expected exit 1 and one divergence line, got {child.exitcode}: "
                                   f"{text[-2000:]}")  # fmt: skip
            messages.append(line[0])
            counts["diverged"] += 1
        else:
            deadline = time.monotonic() + 300
            while _latest_step(out) <= before and child.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            child.kill()
            child.join()
            counts["killed"] += 1
        read, bad = non_finite_tensors(out)
        files_read, non_finite = files_read + read, non_finite + bad
    print(
        f"kill/resume cycles: {counts['killed']} killed (kill -9), {counts['diverged']} diverged (exit 1); "
        f"reached step {_latest_step(out)}; {files_read} checkpoint files read after the cycles, "
        f"{non_finite} non-finite tensors in them"
    )
    for message in messages[:2]:
        print(f"  {message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="soak steps (0: the cycles only)")
    parser.add_argument("--cycles", type=int, default=9, help="kill/resume cycles after the soak, every third diverges")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the starting RSS is read")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--images", type=int, default=64, help="images per domain")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.steps:
        soak(args)
    if args.cycles:
        with tempfile.TemporaryDirectory() as folder:
            write_folder(Path(folder) / "data", 16)
            kill_resume_cycles(Path(folder) / "data", Path(folder) / "run", args.cycles)
    return 0


def soak(args: argparse.Namespace) -> None:
    """The soak: RSS and step time over ``args.steps`` steps (see the module docstring)."""

    rss_at_step: dict[int, float] = {}
    cpu_at_step: dict[int, float] = {}  # process CPU seconds: robust to other processes on a shared machine
    original_write = logs.MetricsLog.write

    def write_with_rss(self: logs.MetricsLog, record: dict[str, float]) -> None:
        rss_at_step[int(record["step"])] = resident_mib()
        cpu_at_step[int(record["step"])] = time.process_time()
        original_write(self, record)

    logs.MetricsLog.write = write_with_rss  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as folder:
        root, out = Path(folder) / "data", Path(folder) / "run"
        write_folder(root, args.images)
        config = TrainConfig(
            data=str(root), size=16, batch_size=4, steps=args.steps, g_width=4, g_blocks=1, d_width=4, d_layers=1,
            encoder_mode="siamese", siamese_width=4, siamese_dim=8, augment="color,translation,cutout",
            log_every=args.log_every, sample_every=500, checkpoint_every=250, keep_checkpoints=2,
            num_workers=args.workers, out=str(out), max_unreadable_fraction=0.5,
        )  # fmt: skip
        rss_before = resident_mib()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableImageWarning)
            summary = train(config, progress=False)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    images_per_step = config.batch_size
    step_seconds = {r["step"]: images_per_step / r["images_per_second"] for r in records}
    steps = sorted(s for s in step_seconds if s > args.warmup)
    tenth = max(1, len(steps) // 10)
    first = statistics.median(step_seconds[s] for s in steps[:tenth])
    last = statistics.median(step_seconds[s] for s in steps[-tenth:])
    start_step = steps[0]
    rss_start, rss_end = rss_at_step[start_step], rss_at_step[steps[-1]]
    print(
        f"soak: {summary['step']} steps in {summary['seconds']:.0f} s, unreadable images {summary['unreadable_images']}"
    )
    print(
        f"RSS before training {rss_before:.1f} MiB, at step {start_step} {rss_start:.1f} MiB, "
        f"at step {steps[-1]} {rss_end:.1f} MiB"
    )
    print(f"RSS growth after warm-up: {rss_end - rss_start:+.1f} MiB ({rss_end / rss_start:.3f}x); "
          f"max {max(rss_at_step.values()):.1f} MiB")  # fmt: skip
    print(
        f"step time (wall): first tenth {first * 1e3:.1f} ms, last tenth {last * 1e3:.1f} ms, drift {last / first:.3f}x"
    )
    logged = sorted(cpu_at_step)
    cpu_per_step = {
        b: (cpu_at_step[b] - cpu_at_step[a]) / (b - a) for a, b in itertools.pairwise(logged) if b > args.warmup
    }
    cpu_steps = sorted(cpu_per_step)
    cpu_first = statistics.median(cpu_per_step[s] for s in cpu_steps[:tenth])
    cpu_last = statistics.median(cpu_per_step[s] for s in cpu_steps[-tenth:])
    print(f"step time (CPU of this process): first tenth {cpu_first * 1e3:.1f} ms, last tenth {cpu_last * 1e3:.1f} ms, "
          f"drift {cpu_last / cpu_first:.3f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
