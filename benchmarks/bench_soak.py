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

    python benchmarks/bench_soak.py                 # 3000 steps, about 2-4 minutes on 2 CPU cores
    python benchmarks/bench_soak.py --steps 600     # a shortened soak
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import numpy as np
import torch
from PIL import Image

from reference import logs
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200, help="steps before the starting RSS is read")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--images", type=int, default=64, help="images per domain")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
