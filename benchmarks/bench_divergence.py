r"""Cost of the trainer's divergence checks (``reference.logs.NonFiniteWatch``), per step.

Each training step hands its logged terms (about ten scalar tensors on the device) to the
watch, which ORs ``~isfinite`` of them into a flag vector on the device, with no host sync; the
flags are read at logging steps and before checkpoints, with the weights' and optimizer state's
check (``reference.checkpoint.finite_parts``).

Printed, on the chosen device:

1. the watch's per-step work alone, against what the loop does with the same terms anyway (the
   running sums of ``LogInterval.add``) and against a straightforward check that reads every
   term on the host each step (one sync per step): microseconds per step and ratios;
2. one check (the flags read, plus the state check of a tiny run's networks and optimizers);
3. whole training steps of a tiny run (``reference.train.train``, the siamese embedder, a log
   line every 10 steps, no checkpoints in the timed part) with the watch and with it disabled,
   interleaved rounds, as process CPU time and wall time per step, and their ratio.

    python benchmarks/bench_divergence.py                 # CPU, about a minute
    python benchmarks/bench_divergence.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from reference.checkpoint import finite_parts
from reference.config import TrainConfig
from reference.logs import NonFiniteWatch
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.runtime import Runtime
from reference.train import train

KEYS = ("loss_g", "loss_adv", "loss_travel", "loss_d", "d_real", "d_fake", "loss_cycle", "loss_adv_ba", "loss_nce")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(function: Callable[[], None], calls: int, device: torch.device) -> float:
    for _ in range(20):
        function()
    _sync(device)
    started = time.perf_counter()
    for _ in range(calls):
        function()
    _sync(device)
    return (time.perf_counter() - started) / calls * 1e6


def step_terms(device: torch.device) -> dict[str, torch.Tensor | float]:
    terms: dict[str, torch.Tensor | float] = {key: torch.rand((), device=device) for key in KEYS}
    terms["lambda"] = 0.5
    return terms


def isolated(device: torch.device, calls: int) -> None:
    terms = step_terms(device)
    watch = NonFiniteWatch(Runtime(device))
    running: dict[str, torch.Tensor | float] = {}

    def sums() -> None:  # what LogInterval.add does with the terms anyway
        for key, value in terms.items():
            running[key] = running.get(key, 0.0) + value

    def host_check() -> None:  # the straightforward check: every term read on the host, each step
        if not all(math.isfinite(float(value)) for value in terms.values()):
            raise AssertionError

    watch_us = per_call_us(lambda: watch.add(terms), calls, device)
    sums_us = per_call_us(sums, calls, device)
    host_us = per_call_us(host_check, calls, device)
    print(f"per step, {len(terms)} terms on {device}: watch.add {watch_us:.1f} us, running sums {sums_us:.1f} us "
          f"(watch / sums {watch_us / sums_us:.2f}x), host read of every term {host_us:.1f} us "
          f"(watch / host read {watch_us / host_us:.2f}x)")  # fmt: skip

    generator, discriminator = ResnetGenerator(3, 3, width=16, n_blocks=3), PatchDiscriminator(3, width=16)
    modules = {"generator": generator.to(device), "discriminator": discriminator.to(device)}
    optimizers = {name: torch.optim.Adam(module.parameters()) for name, module in modules.items()}
    for name, module in modules.items():
        module(torch.rand(1, 3, 32, 32, device=device)).float().mean().backward()
        optimizers[name].step()

    def check() -> None:  # a step's terms, then the check before a checkpoint
        watch.add(terms)
        watch.check(finite_parts(modules, optimizers))

    check_us = per_call_us(check, 50, device)
    tensors = sum(len(m.state_dict()) for m in modules.values())
    print(f"one check before a checkpoint (flags + state of G and D, {tensors} tensors and Adam moments): "
          f"{check_us / 1e3:.2f} ms")  # fmt: skip


def write_folder(root: Path, count: int = 16, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for side in "AB":
        (root / f"train{side}").mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / f"train{side}" / f"{index}.png"
            )


def whole_steps(device: torch.device, steps: int, rounds: int) -> None:
    timed: dict[str, list[tuple[float, float]]] = {"with checks": [], "without": []}
    original_add, original_check = NonFiniteWatch.add, NonFiniteWatch.check
    with tempfile.TemporaryDirectory() as folder:
        write_folder(Path(folder) / "data")
        for round_index in range(rounds):
            for label in ("with checks", "without") if round_index % 2 == 0 else ("without", "with checks"):
                if label == "without":
                    NonFiniteWatch.add = lambda self, terms: None  # type: ignore[method-assign]
                    NonFiniteWatch.check = lambda self, state=None: []  # type: ignore[method-assign]
                config = TrainConfig(
                    data=str(Path(folder) / "data"), size=32, batch_size=4, steps=steps, g_width=8, g_blocks=1,
                    d_width=8, d_layers=2, encoder_mode="siamese", siamese_width=8, siamese_dim=16,
                    lambda_travel=1.0, log_every=10, sample_every=10**6, checkpoint_every=10**6, num_workers=0,
                    device=device.type, out=str(Path(folder) / f"run{round_index}{label}"),
                )  # fmt: skip
                cpu = time.process_time()
                summary = train(config, progress=False)
                timed[label].append(((time.process_time() - cpu) / steps, summary["seconds"] / steps))
                NonFiniteWatch.add, NonFiniteWatch.check = original_add, original_check  # type: ignore[method-assign]
    with_cpu, with_wall = (statistics.median(t[i] for t in timed["with checks"]) for i in (0, 1))
    without_cpu, without_wall = (statistics.median(t[i] for t in timed["without"]) for i in (0, 1))
    print(f"whole training step ({steps} steps x {rounds} rounds, medians): with checks {with_cpu * 1e3:.2f} ms CPU / "
          f"{with_wall * 1e3:.2f} ms wall, without {without_cpu * 1e3:.2f} ms CPU / {without_wall * 1e3:.2f} ms wall; "
          f"ratio {with_cpu / without_cpu:.3f}x CPU, {with_wall / without_wall:.3f}x wall")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=5000, help="calls per isolated timing")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved runs with and without the checks, each")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    isolated(device, args.calls)
    whole_steps(device, args.steps, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
