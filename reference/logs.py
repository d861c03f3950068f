"""What a training run writes besides checkpoints: metrics.jsonl (and TensorBoard), sample grids, a progress bar.

A metric record is the mean over a logging interval of each running loss sum, averaged over
ranks (:func:`log_record`, the one host sync of a logging step); sample grids show
``input | translation`` rows (:func:`save_image_grid`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from reference.runtime import Runtime

__all__ = ["MetricsLog", "log_record", "progress_bar", "save_image_grid", "write_samples"]


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
    step: int, running: dict[str, Any], count: int, runtime: Runtime, optimizers: dict[str, Any]
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


class _NoBar:
    def set_postfix(self, *a: object, **k: object) -> None: ...
    def update(self, *a: object) -> None: ...
    def close(self) -> None: ...


def progress_bar(start: int, total: int, enabled: bool) -> Any:
    """A tqdm bar of training steps, or an object with the same three methods that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
