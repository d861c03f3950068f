"""Checkpoint files of the reference trainer: atomic writes, keep-last-k, RNG states as plain data.

A checkpoint is a dict of tensors and plain python values only, so that it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs when a checkpoint is read).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "LATEST",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_atomic",
    "save_checkpoint",
    "step_checkpoints",
]

LATEST = "latest.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: Any, path: str | os.PathLike[str], save: Callable[[Any, Any], None] = torch.save) -> Path:
    """Write ``obj`` to ``path`` so that a reader (or a crash) only ever sees the old or the new file.

    The object goes to a temporary file in the same folder, which is flushed and fsync'ed and
    then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows); the folder is
    fsync'ed too where the platform allows. ``save(obj, file_path)`` does the writing
    (``torch.save`` by default; ``torch_xla``'s ``xm.save`` on TPUs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save(obj, str(temporary))
        with open(temporary, "rb+") as file:
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def step_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``step_XXXXXX.pt`` files of ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    state: dict[str, Any],
    folder: str | os.PathLike[str],
    step: int,
    *,
    keep: int = 0,
    save: Callable[[Any, Any], None] = torch.save,
) -> Path:
    """Write ``state`` atomically to ``folder/latest.pt``; with ``keep > 0`` also keep it as
    ``folder/step_{step:06d}.pt`` and delete all but the ``keep`` newest step files.

    The step file is a hard link to the same data (a copy where links are not supported), so
    keeping checkpoints costs no second write.
    """
    if not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep: expected an int >= 0, got {keep!r}")
    folder = Path(folder)
    latest = save_atomic(state, folder / LATEST, save=save)
    if keep:
        kept = folder / f"step_{step:06d}.pt"
        temporary = kept.with_name(f".{kept.name}.tmp-{os.getpid()}")
        try:
            os.link(latest, temporary)
        except OSError:
            shutil.copyfile(latest, temporary)
        os.replace(temporary, kept)
        for old in step_checkpoints(folder)[:-keep]:
            old.unlink()
    return latest


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state(cuda_device: torch.device | None = None) -> dict[str, Any]:
    """The python, numpy, torch CPU (and CUDA device) generator states, as tensors and plain types."""
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [numpy_name, torch.from_numpy(numpy_keys.astype(np.int64)), int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)],
        "torch": torch.get_rng_state(),
    }
    if cuda_device is not None and cuda_device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(cuda_device)
    return state


def restore_rng_state(state: dict[str, Any], cuda_device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if cuda_device is not None and cuda_device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), cuda_device)
