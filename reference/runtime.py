"""Where a training run executes: the device, the process group, seeds, signals, torch.compile.

:func:`setup_runtime` picks the device (CPU, CUDA, or an XLA device through ``torch_xla``) and
joins the process group that ``torchrun`` describes (``WORLD_SIZE > 1``); :class:`Runtime` is
what the training loop needs to know about it. :class:`StopSignal` turns SIGTERM / SIGINT into
a stop at the end of a step on which all ranks agree. :func:`check_run_inputs` and
:func:`check_datasets` find the user's mistakes (data folders, ``--out``, ``--size``, the batch
size) before any work and raise :class:`RunInputError`, whose message is one line naming the flag.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from reference.data import IMAGE_EXTENSIONS, list_images
from reference.outputs import check_writable_folder

__all__ = [
    "RunInputError",
    "Runtime",
    "SetupError",
    "StopSignal",
    "check_datasets",
    "check_encoder_input_size",
    "check_run_inputs",
    "compile_modules",
    "compiled_graph_count",
    "import_xla",
    "rank_seed",
    "seed_everything",
    "setup_runtime",
    "sync_xla",
]


class SetupError(RuntimeError):
    """The environment cannot run the requested configuration (a missing package, an unsupported feature)."""


class RunInputError(ValueError):
    """A mistake in a run's inputs (a data folder, ``--out``, ``--size``, a checkpoint), found before
    training; the message is one line that names the flag, what was expected and what was found."""


def _found(path: Path) -> str:
    return "a file" if path.is_file() else "a folder" if path.is_dir() else "nothing"


def check_run_inputs(config: Any) -> None:
    """The data folders, ``--out`` and ``--resume-from`` of a :class:`reference.config.TrainConfig`, before any work.

    Raises :class:`RunInputError` naming the flag: a missing data folder or root, a root
    without ``trainA/`` or ``trainB/``, an ``--out`` that is a file or not writable, a
    ``--resume-from`` that is not a file. (Empty or unreadable folders are found when the
    datasets are opened, see :func:`reference.data.ImageFolder`.)
    """
    if config.data is not None:
        root = Path(config.data)
        if not root.is_dir():
            raise RunInputError(
                f"--data: expected a dataset folder holding trainA/ and trainB/, found {_found(root)} at {root}"
            )
        for side in ("A", "B"):
            if not (root / f"train{side}").is_dir():
                present = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())[:6]
                raise RunInputError(
                    f"--data: expected {root} to hold train{side}/ (CycleGAN layout: trainA/, trainB/), "
                    f"found {', '.join(present) if present else 'no subfolders'}"
                )
    for flag, folder in (("--data-a", config.data_a), ("--data-b", config.data_b)):
        if folder is not None and not Path(folder).is_dir():
            raise RunInputError(f"{flag}: expected a folder of images, found {_found(Path(folder))} at {folder}")
    if config.data is not None:
        image_folders = [("--data", Path(config.data) / "trainA"), ("--data", Path(config.data) / "trainB")]
    else:
        image_folders = [(flag, Path(f)) for flag, f in (("--data-a", config.data_a), ("--data-b", config.data_b)) if f]
    for flag, folder in image_folders:
        if not list_images(folder):
            raise RunInputError(
                f"{flag}: expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}, found none "
                f"(it holds {sum(1 for _ in folder.iterdir())} other entries)"
            )
    try:
        check_writable_folder(config.out, "--out")
    except OSError as error:
        raise RunInputError(str(error)) from None
    resume_from = getattr(config, "resume_from", None)
    if resume_from is not None and not Path(resume_from).is_file():
        raise RunInputError(
            f"--resume-from: expected a checkpoint file, found {_found(Path(resume_from))} at {resume_from}"
        )


def check_encoder_name(encoder: str, *, weights_needed: bool = True) -> None:
    """RunInputError unless ``--encoder`` is an existing folder or a hub id (``owner/name``) that can be had.

    Catches a mistyped folder at once, where the hub client would first spend its retries on the
    network (about 30 s). With ``weights_needed``, a hub id must be in the local cache, or the hub
    must answer one TCP connection within 3 s (and ``HF_HUB_OFFLINE`` be unset).
    """
    path = Path(encoder)
    if path.is_dir():
        return
    parts = encoder.split("/")
    looks_like_hub_id = len(parts) == 2 and all(parts) and not encoder.startswith((".", "~"))
    if not looks_like_hub_id:
        raise RunInputError(
            f"--encoder: {encoder!r} is neither a folder nor a hub id of the form owner/name "
            f"(found {_found(path)}); pass a folder written by save_pretrained, or e.g. openai/clip-vit-large-patch14"
        )
    if not weights_needed or _cached_on_this_machine(encoder):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
        raise RunInputError(
            f"--encoder: {encoder!r} is not in the local Hugging Face cache and {why}; download it once with "
            f"network access (hf download {encoder}) or pass a local folder written by save_pretrained"
        )


def _cached_on_this_machine(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or to HF_ENDPOINT), instead of the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_datasets(datasets: dict[str, Any], batch_size: int, world_size: int) -> None:
    """Warn, before training, for each dataset smaller than one global batch (every batch then repeats images).

    ``datasets`` maps a label (e.g. "--data-a photos/") to a sized dataset.
    """
    images_per_step = batch_size * world_size
    for label, dataset in datasets.items():
        if len(dataset) < images_per_step:
            warnings.warn(
                f"--batch-size: {batch_size} x {world_size} process(es) = {images_per_step} images a step, "
                f"but {label} holds only {len(dataset)}: every batch repeats images",
                stacklevel=2,
            )


def check_encoder_input_size(encoder: nn.Module, size: int) -> None:
    """RunInputError if ``--size`` is below the input size of a CLIP encoder that crops (``--crop center``)."""
    image_size, crop = getattr(encoder, "image_size", None), getattr(encoder, "crop", None)
    if isinstance(image_size, int) and crop == "center" and size < image_size:
        raise RunInputError(
            f"--size: expected at least {image_size} (the encoder's input size; --crop center takes a "
            f"{image_size} x {image_size} crop), got {size}; use a larger --size or --crop resize / full"
        )


@dataclass
class Runtime:
    """The device of this process and its place in the process group (rank 0 of 1 without DDP)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False
    control_group: Any = None  # a gloo group for CPU-side agreement (stop flag, RNG states)
    xla: Any = None  # torch_xla.core.xla_model when on an XLA device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def import_xla() -> Any:
    """``torch_xla.core.xla_model``, or a SetupError that says how to get it."""
    try:
        import torch_xla.core.xla_model as xm
    except ImportError as error:
        raise SetupError(
            "--device xla needs torch_xla, which is not installed (pip install torch_xla, on a TPU host); "
            "use --device cpu or --device cuda on other machines"
        ) from error
    return xm


def sync_xla(xm: Any) -> None:
    """End the step's lazy XLA graph and run it: ``torch_xla.sync()`` where it exists (torch_xla >= 2.5),
    else the older ``xm.mark_step()`` of ``torch_xla.core.xla_model`` ``xm``."""
    import torch_xla

    sync = getattr(torch_xla, "sync", None)
    if sync is not None:
        sync()
    else:
        xm.mark_step()


def setup_runtime(device: str = "auto", amp: str = "off") -> Runtime:
    """Pick the device (auto | cpu | cuda | xla) and join the process group that torchrun describes (WORLD_SIZE > 1).

    ``amp`` is the run's autocast mode (off | bf16 | fp16); fp16 needs a CUDA device.
    """
    kind = device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if amp == "fp16" and kind != "cuda":
        raise ValueError(f"amp: 'fp16' needs a CUDA device, but the run uses {kind!r}; use --amp bf16 or --amp off")
    xm = import_xla() if kind == "xla" else None

    wants_group = int(os.environ.get("WORLD_SIZE", "1")) > 1
    owns = False
    if wants_group and not dist.is_initialized():
        if xm is not None:
            raise SetupError("--device xla: this trainer runs one XLA device per process without torchrun")
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    elif kind == "xla":
        assert xm is not None  # imported above for kind == "xla"
        chosen = xm.xla_device()
    else:
        chosen = torch.device("cpu")
    control = None
    if world > 1:
        control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Runtime(device=chosen, rank=rank, world_size=world, owns_process_group=owns, control_group=control, xla=xm)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class StopSignal:
    """SIGTERM or SIGINT asks the loop to save a checkpoint and stop at the end of the step.

    A second SIGINT raises KeyboardInterrupt at once. Under DDP the ranks agree on the step
    to stop at through an asynchronous all-reduce of the flag on a CPU group: the flag raised
    during step t is seen by every rank at the end of step t + 1, without stalling a GPU.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.received: str | None = None
        self._runtime = runtime
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, Tensor] | None = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        if not self._runtime.distributed:
            return self.received is not None
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.received is not None)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._runtime.control_group, async_op=True)
        self._pending = (work, flag)
        return agreed

    def wait(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def compile_modules(modules: list[nn.Module], backend: str) -> list[nn.Module]:
    """``torch.compile`` each distinct module once; a module listed twice comes back as the same compiled object."""
    from torch._dynamo.eval_frame import is_dynamo_supported  # what torch._dynamo re-exports

    if not is_dynamo_supported():
        raise SetupError(
            f"--compile: torch.compile is not supported here "
            f"(Python {sys.version.split()[0]}, torch {torch.__version__}); run without --compile"
        )
    compiled: dict[int, nn.Module] = {}
    for module in modules:
        if id(module) not in compiled:
            # torch.compile of a Module returns an OptimizedModule (a Module); its stub says Callable
            compiled[id(module)] = torch.compile(module, backend=backend)  # type: ignore[assignment]
    return [compiled[id(module)] for module in modules]


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled so far in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
