"""Checkpoint files of the reference trainer: atomic writes, keep-last-k, RNG states as plain data.

A checkpoint is a dict of tensors and plain python values only, so that it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs when a checkpoint is read).
:func:`training_state` assembles everything a bit-exact resume needs (weights, optimizer moments,
schedules, gradient scalers, the adaptive lambda, the RNG states of every rank, the data
position); :func:`restore_training_state` puts it back.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from reference.runtime import Runtime

__all__ = [
    "LATEST",
    "DamagedCheckpointError",
    "capture_rng_state",
    "finite_parts",
    "load_checkpoint",
    "looks_intact",
    "remove_stale_temporaries",
    "restore_rng_state",
    "restore_training_state",
    "save_atomic",
    "save_checkpoint",
    "step_checkpoints",
    "training_state",
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


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files that a writer killed mid-write left in ``folder``; returns them.

    Call it only while holding the folder's run lock (:class:`reference.outputs.RunFolderLock`),
    when no other process can be writing there.
    """
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp-*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # numpy's global generator is an MT19937: a legacy tuple, not a dict
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = numpy_state
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            numpy_name,
            torch.from_numpy(numpy_keys.astype(np.int64)),
            int(numpy_pos),
            int(numpy_has_gauss),
            float(numpy_gauss),
        ],
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


def training_state(
    config: dict[str, Any], step: int, runtime: Runtime, modules: dict[str, nn.Module], optimizers: dict[str, Any],
    schedulers: dict[str, Any], scalers: dict[str, Any], adaptive: Any, adaptive_structure: Any = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Everything a bit-exact resume needs; collective under DDP (RNG states of all ranks), None off rank 0.

    ``config`` is the run's configuration as a dict (``dataclasses.asdict(TrainConfig)``); ``modules``
    holds at least ``"generator"`` (a :class:`reference.models.ResnetGenerator`). Each module's
    state_dict is stored under its name: the trainer's are ``"generator"``, ``"discriminator"``,
    ``"siamese"`` (trainable encoder), ``"travel_queue"``, ``"generator_ba"`` and
    ``"discriminator_a"`` (the cycle baseline, whose optimizers, schedules and D_A's gradient scaler
    are stored under the same names), ``"nce_heads"`` (the PatchNCE baseline's MLP heads, whose
    optimizer and schedule are stored under that name too) and ``"generator_ema"`` (the moving
    average of G's weights). ``adaptive`` and ``adaptive_structure``: the adaptive lambdas of the
    travel and the structure term (or None).
    """
    rng = capture_rng_state(runtime.device if runtime.device.type == "cuda" else None)
    if runtime.xla is not None:
        rng["xla"] = int(runtime.xla.get_rng_state())
    rng_states: list[dict[str, Any] | None] = [rng]
    if runtime.distributed:
        rng_states = [None] * runtime.world_size
        dist.all_gather_object(rng_states, rng, group=runtime.control_group)
    if not runtime.is_main:
        return None
    generator = modules["generator"]
    return {
        "format": 1,
        "step": step,
        "config": dict(config),
        "generator_kwargs": dict(
            in_channels=generator.in_channels,
            out_channels=generator.out_channels,
            width=generator.width,
            n_blocks=generator.n_blocks,
        ),
        "discriminator_kwargs": dict(
            in_channels=3, width=config["d_width"], n_layers=config["d_layers"], norm=config["d_norm"]
        ),
        **{name: module.state_dict() for name, module in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "grad_scalers": {name: scaler.state_dict() for name, scaler in scalers.items()},
        "adaptive_lambda": None if adaptive is None else adaptive.state_dict(),
        "adaptive_structure": None if adaptive_structure is None else adaptive_structure.state_dict(),
        "rng": rng_states,
        "data": {"position": step * config["batch_size"] * runtime.world_size, "world_size": runtime.world_size},
    }


def finite_parts(modules: Mapping[str, nn.Module], optimizers: Mapping[str, Any]) -> dict[str, bool]:
    """Whether every floating-point tensor of each part a checkpoint stores is finite, by part:
    each module's state_dict (weights, buffers) by its name, each optimizer's state (Adam's
    moments) as ``"<name> optimizer"``. One host sync per part and device."""
    parts = {name: module.state_dict() for name, module in modules.items()}
    parts |= {f"{name} optimizer": optimizer.state_dict()["state"] for name, optimizer in optimizers.items()}
    return {name: _all_finite(list(_tensors(state))) for name, state in parts.items()}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            flags.setdefault(tensor.device, []).append(torch.isfinite(tensor.detach()).all())
    return all(bool(torch.stack(group).all()) for group in flags.values())


def restore_training_state(
    checkpoint: dict[str, Any], runtime: Runtime, modules: dict[str, nn.Module], optimizers: dict[str, Any],
    schedulers: dict[str, Any], scalers: dict[str, Any], adaptive: Any, adaptive_structure: Any = None,
) -> tuple[int, int]:  # fmt: skip
    """Load a :func:`training_state` into the given objects (in place); returns (step, data position).

    The RNG states come back only when the checkpoint has one per rank of this run (a warning
    otherwise: the random streams restart).
    """
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    for name, opt in optimizers.items():
        opt.load_state_dict(checkpoint["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(checkpoint["schedulers"][name])
    for name, scaler in scalers.items():
        if checkpoint["grad_scalers"].get(name):
            scaler.load_state_dict(checkpoint["grad_scalers"][name])
    if adaptive is not None and checkpoint["adaptive_lambda"] is not None:
        adaptive.load_state_dict(checkpoint["adaptive_lambda"])
    if adaptive_structure is not None and checkpoint.get("adaptive_structure") is not None:
        adaptive_structure.load_state_dict(checkpoint["adaptive_structure"])
    rng_states = checkpoint["rng"]
    if len(rng_states) == runtime.world_size:
        device = runtime.device
        restore_rng_state(rng_states[runtime.rank], device if device.type == "cuda" else None)
        if runtime.xla is not None and "xla" in rng_states[runtime.rank]:
            runtime.xla.set_rng_state(rng_states[runtime.rank]["xla"])
    else:
        warnings.warn(
            f"resuming {len(rng_states)} ranks' run on {runtime.world_size}: random streams restart", stacklevel=2
        )
    return int(checkpoint["step"]), int(checkpoint["data"]["position"])
