"""What a training run writes besides checkpoints: metrics.jsonl (and TensorBoard), sample grids, a progress bar.

A metric record is the mean over a logging interval of each running loss sum, averaged over
ranks (:func:`log_record`, the one host sync of a logging step); :class:`LogInterval` keeps those
sums and the interval's clock for the training loop and writes each record. Sample grids show
``input | translation`` rows (:func:`save_image_grid`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from reference.config import TrainConfig
from reference.data import ImageFolder, unreadable_count
from reference.runtime import Runtime

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter  # optional: imported at run time when tensorboard is there

__all__ = [
    "LogInterval",
    "MetricsLog",
    "ProgressBar",
    "log_record",
    "progress_bar",
    "save_image_grid",
    "write_samples",
]


def _to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def save_image_grid(columns: Sequence[Tensor], path: str | os.PathLike[str], padding: int = 2) -> Path:
    """Write a PNG whose row i shows ``columns[0][i] | columns[1][i] | ...`` (e.g. input | translation).

    Every column is (N, 3, H, W) in [-1, 1] with the same N, H, W; cells are separated by
    ``padding`` white pixels.
    """
    from PIL import Image

    if not columns or any(c.shape != columns[0].shape or c.dim() != 4 or c.shape[1] != 3 for c in columns):
        raise ValueError(
            f"columns: expected equally shaped (N, 3, H, W) tensors, got {[tuple(c.shape) for c in columns]}"
        )
    n, _, h, w = columns[0].shape
    cells = [_to_uint8(c) for c in columns]
    grid = np.full((n * (h + padding) + padding, len(cells) * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for column, images in enumerate(cells):
        for row in range(n):
            top, left = padding + row * (h + padding), padding + column * (w + padding)
            grid[top : top + h, left : left + w] = images[row]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class MetricsLog:
    """One JSON object per line in OUT/metrics.jsonl, and TensorBoard scalars when it is installed.

    The file is only ever appended to, never truncated: a resumed run adds its lines after the
    earlier ones. After a crash, the steps between the last checkpoint and the crash appear
    twice, the earlier line from the crashed run and the later one from the resumed run (their
    losses are equal: resuming is bit-exact); readers should keep the last line of each step.
    """

    def __init__(self, out: Path, resume_step: int) -> None:
        self.path = out / "metrics.jsonl"
        self.path.touch()
        self.tensorboard: SummaryWriter | None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(out / "tensorboard", purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict[str, float]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def log_record(
    step: int,
    running: Mapping[str, Tensor | float],
    count: int,
    runtime: Runtime,
    optimizers: Mapping[str, Optimizer],
) -> dict[str, float]:
    """Mean of each running sum over the interval (averaged over ranks): the one host sync of a log step."""
    keys = sorted(running)
    values = torch.stack([torch.as_tensor(running[k], dtype=torch.float32, device=runtime.device) for k in keys]) / max(
        count, 1
    )
    if runtime.distributed:
        values = values.cpu()
        dist.all_reduce(values, group=runtime.control_group)
        values = values / runtime.world_size
    record = {"step": step, **dict(zip(keys, values.tolist()))}
    record["lr"] = optimizers["generator"].param_groups[0]["lr"]
    return record


@torch.no_grad()
def write_samples(
    generator: nn.Module,
    inputs: Tensor,
    path: Path,
    autocast: Callable[[], AbstractContextManager[Any]],
    channels_last: bool,
) -> None:
    """Translate ``inputs`` (N, 3, H, W) under ``autocast()`` and save the ``input | translation`` grid."""
    device = next(generator.parameters()).device
    batch = inputs.to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast():
        translated = generator(batch)
    save_image_grid([inputs, translated.float().cpu()], path)


class ProgressBar(Protocol):
    """What the loop uses of a tqdm bar."""

    def set_postfix(self, *a: Any, **k: Any) -> Any: ...
    def update(self, n: float | None = 1) -> Any: ...
    def close(self) -> None: ...


class _NoBar:
    def set_postfix(self, *a: object, **k: object) -> None: ...
    def update(self, n: float | None = 1) -> None: ...
    def close(self) -> None: ...


def progress_bar(start: int, total: int, enabled: bool) -> ProgressBar:
    """A tqdm bar of training steps, or an object with the same three methods that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


class LogInterval:
    """The training loop's logging, one interval (the steps between two log steps) at a time.

    :meth:`add` keeps a running sum of each logged term (tensors stay on the device: no host
    sync); :meth:`close_interval` turns the sums into the interval's record (:func:`log_record`:
    each mean, averaged over ranks, and G's learning rate) with ``images_per_second`` (source
    images translated per second over the interval, all ranks) and, for a run on image folders,
    ``unreadable_images`` (files that failed to decode so far, the largest count of any rank),
    writes it to OUT/metrics.jsonl (rank 0) and to the progress bar's postfix, and starts the
    next interval. Once more than ``config.max_unreadable_fraction`` of the image files failed to
    decode, :attr:`too_many_unreadable` holds the message the run stops with (after saving).

    ``bar`` is the run's progress bar (tqdm on rank 0 with ``progress``, else a silent stand-in);
    ``record`` the last record written (empty before the first log step).
    """

    def __init__(
        self,
        config: TrainConfig,
        runtime: Runtime,
        optimizers: Mapping[str, Optimizer],
        datasets: Sequence[Dataset[Tensor]],
        *,
        start_step: int,
        progress: bool,
    ) -> None:
        self.config, self.runtime, self.optimizers, self.datasets = config, runtime, optimizers, datasets
        self.out = Path(config.out)
        self.log = MetricsLog(self.out, start_step) if runtime.is_main else None
        self.bar = progress_bar(start_step, config.steps, enabled=progress and runtime.is_main)
        self.images_per_step = config.batch_size * runtime.world_size  # source images per step, all ranks
        self.image_files = sum(len(d) for d in datasets if isinstance(d, ImageFolder))
        self.record: dict[str, float] = {}
        self.too_many_unreadable: str | None = None
        self._running: dict[str, Tensor | float] = {}
        self._start_step = start_step
        self._started = time.perf_counter()

    def add(self, terms: Mapping[str, Tensor | float]) -> None:
        """Add one step's logged terms to the running sums (no host sync)."""
        for key, value in terms.items():
            self._running[key] = self._running.get(key, 0.0) + value

    def close_interval(self, step: int) -> dict[str, float]:
        """The record of the interval that ends at ``step``, written; the next interval starts."""
        steps = step - self._start_step
        record = log_record(step, self._running, steps, self.runtime, self.optimizers)
        record["images_per_second"] = self.images_per_step * steps / (time.perf_counter() - self._started)
        self._running, self._started, self._start_step = {}, time.perf_counter(), step
        if self.image_files:
            unreadable = record["unreadable_images"] = self.unreadable_images()
            if unreadable > self.config.max_unreadable_fraction * self.image_files:
                self.too_many_unreadable = (
                    f"stopped at step {step}: {unreadable} of {self.image_files} image files "
                    f"failed to decode, more than "
                    f"--max-unreadable-fraction {self.config.max_unreadable_fraction}; "
                    f"a checkpoint was saved in {self.out}: "
                    "fix or remove the files (named in the warnings above) and continue with --resume"
                )
        if self.log is not None:
            self.log.write(record)
        self.bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss_g", "loss_d", "loss_travel", "images_per_second")})
        self.record = record
        return record

    def unreadable_images(self) -> int:
        """Image files that failed to decode so far (0 without image folders); a collective under DDP."""
        if not self.image_files:
            return 0
        group = self.runtime.control_group if self.runtime.distributed else None
        return unreadable_count(*self.datasets, group=group)

    def close(self) -> None:
        """Close the metrics file's TensorBoard writer (the bar is closed by the loop)."""
        if self.log is not None:
            self.log.close()
