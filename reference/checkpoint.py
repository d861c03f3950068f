"""Checkpoint files of the reference trainer: atomic writes, keep-last-k, RNG states as plain data.

A checkpoint is a dict of tensors and plain python values only, so that it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs when a checkpoint is read).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "LATEST",
    "DamagedCheckpointError",
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


class DamagedCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, empty, overwritten, not a checkpoint)."""


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, advice: str = ""
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises FileNotFoundError if it is missing and :class:`DamagedCheckpointError` (a ValueError)
    if it cannot be read: the message names the file, says it is damaged, and lists the
    ``step_*.pt`` files beside it that look intact, followed by ``advice`` (e.g. which flag
    resumes from one of them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        stored = torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, KeyboardInterrupt, PermissionError):
        raise
    except Exception as error:  # truncated zip, EOFError, UnpicklingError, ...: all mean "damaged"
        raise DamagedCheckpointError(_damaged_message(path, _first_line(error), advice)) from error
    if not isinstance(stored, dict):
        raise DamagedCheckpointError(
            _damaged_message(path, f"it holds a {type(stored).__name__}, not a checkpoint dict", advice)
        )
    return stored


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _damaged_message(path: Path, reason: str, advice: str) -> str:
    intact = [p for p in step_checkpoints(path.parent) if p.resolve() != path.resolve() and looks_intact(p)]
    if intact:
        listing = f"step checkpoints beside it that could be resumed from: {', '.join(str(p) for p in intact)}"
    else:
        listing = f"no intact step_*.pt checkpoint beside it in {path.parent}"
    return f"checkpoint {path} is damaged ({reason}); {listing}" + (f"; {advice}" if advice and intact else "")


def looks_intact(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete ``torch.save`` archive, checked cheaply (its zip directory is
    read and the CRC of its small records checked; tensor data is not read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [info for info in archive.infolist() if info.filename.endswith(("data.pkl", "version"))]
            if not any(info.filename.endswith("data.pkl") for info in records):
                return False
            for info in records:
                archive.read(info)  # raises on a CRC mismatch
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        return False
    return True


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
