"""What a training run writes besides checkpoints: metrics.jsonl (and TensorBoard), sample grids, a progress bar.

A metric record is the mean over a logging interval of each running loss sum, averaged over
ranks (:func:`log_record`, the one host sync of a logging step); :class:`LogInterval` keeps those
sums and the interval's clock for the training loop and writes each record. Sample grids show
``input | translation`` rows under a header that names them (:func:`save_labelled_grid`).

:class:`NonFiniteWatch` keeps, on the device, which logged terms were NaN or infinite at some
step; :class:`LogInterval` reads it at each logging step and, with the weights' and optimizer
state's own check, before each checkpoint. A run whose check fails has diverged
(:class:`Divergence`): it stops without writing a checkpoint (:class:`TrainingDivergedError`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
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
    "GRID_HEADER_LINES",
    "GRID_LINE_PX",
    "SAMPLE_MIN_PX",
    "TERM_NAMES",
    "Divergence",
    "LogInterval",
    "MetricsLog",
    "NonFiniteWatch",
    "ProgressBar",
    "TrainingDivergedError",
    "log_record",
    "progress_bar",
    "save_image_grid",
    "save_labelled_grid",
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


GRID_HEADER_LINES = 3  # the title, then up to two lines of each column's label
GRID_LINE_PX = 13  # the header's line height


def save_labelled_grid(
    columns: Sequence[Tensor], labels: Sequence[str], title: str, path: str | Path, padding: int = 2
) -> Path:
    """:func:`save_image_grid`'s PNG of ``columns`` (each (N, 3, H, W) in [-1, 1]) under a
    white header band: ``title`` on its first line, ``labels[k]`` (up to two lines) centred over column k.
    The header is ``GRID_HEADER_LINES`` lines of ``GRID_LINE_PX``; a title or label too wide for its place is
    drawn smaller (down to 6 px)."""
    from PIL import Image, ImageDraw, ImageFont

    if len(labels) != len(columns):
        raise ValueError(f"labels: expected one per column ({len(columns)}), got {len(labels)}: {list(labels)}")
    if any(len(label.splitlines()) > GRID_HEADER_LINES - 1 for label in labels):
        raise ValueError(f"labels: expected at most {GRID_HEADER_LINES - 1} lines each, got {list(labels)}")
    grid = Image.open(save_image_grid(columns, path, padding=padding)).convert("RGB")
    line = GRID_LINE_PX
    image = Image.new("RGB", (grid.width, grid.height + GRID_HEADER_LINES * line + padding), "white")
    image.paste(grid, (0, image.height - grid.height))
    draw = ImageDraw.Draw(image)
    room = image.width - 2 * padding
    fitting = (s for s in range(11, 6, -1) if _widest(draw, title, ImageFont.load_default(size=s)) <= room)
    draw.text((padding, 0), title, fill="black", font=ImageFont.load_default(size=next(fitting, 6)))
    cell = columns[0].shape[-1] + padding
    for index, label in enumerate(labels):
        fitting = (s for s in range(11, 6, -1) if _widest(draw, label, ImageFont.load_default(size=s)) <= cell)
        font = ImageFont.load_default(size=next(fitting, 6))
        for row, text in enumerate(label.splitlines(), start=1):
            left = padding + index * cell + (cell - padding - draw.textlength(text, font=font)) / 2
            draw.text((left, row * line), text, fill="black", font=font)
    image.save(path)
    return Path(path)


def _widest(draw: Any, label: str, font: Any) -> float:
    """The width in pixels of ``label``'s longest line in ``font``."""
    return max(draw.textlength(text, font=font) for text in label.splitlines())


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


SAMPLE_MIN_PX = 64  # sample images are enlarged to at least this width


@torch.no_grad()
def write_samples(
    generator: nn.Module,
    inputs: Tensor,
    path: Path,
    autocast: Callable[[], AbstractContextManager[Any]],
    channels_last: bool,
    title: str,
) -> None:
    """Translate ``inputs`` (N, 3, H, W) under ``autocast()`` and save the ``input | translation`` grid,
    its columns named and ``title`` above; images narrower than :data:`SAMPLE_MIN_PX` are enlarged
    (nearest neighbour, an integer factor) so that the labels fit."""
    device = next(generator.parameters()).device
    batch = inputs.to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast():
        translated = generator(batch)
    columns = [inputs.float().cpu(), translated.float().cpu()]
    scale = math.ceil(SAMPLE_MIN_PX / inputs.shape[-1])
    if scale > 1:
        columns = [torch.nn.functional.interpolate(c, scale_factor=scale, mode="nearest") for c in columns]
    save_labelled_grid(columns, ["input", "translation"], title, path)


# The logged keys of each term of the objective, by the term's name in a divergence message.
TERM_NAMES: dict[str, str] = {
    "loss_adv": "adversarial", "loss_adv_ba": "adversarial", "loss_travel": "travel",
    "loss_structure": "structure", "loss_cycle": "cycle", "loss_cycle_identity": "identity",
    "loss_identity": "identity", "loss_nce": "NCE", "loss_nce_x": "NCE", "loss_nce_y": "NCE",
    "loss_d": "discriminator", "loss_d_a": "discriminator", "d_real": "discriminator", "d_fake": "discriminator",
    "d_real_a": "discriminator", "d_fake_a": "discriminator", "r1": "discriminator", "r1_a": "discriminator",
    "d_gap": "discriminator", "lambda": "adaptive lambda",
}  # fmt: skip


def _term_name(key: str) -> str:
    """The term a logged key belongs to (:data:`TERM_NAMES`; ``KEY_a`` as ``KEY``, D_A's mirror of D's)."""
    return TERM_NAMES.get(key) or TERM_NAMES.get(key.removesuffix("_a")) or key


_TERM_WEIGHTS: dict[str, tuple[str, ...]] = {  # the TrainConfig fields that weigh each term
    "travel": ("lambda_travel",), "structure": ("lambda_structure",), "cycle": ("lambda_cycle",),
    "NCE": ("lambda_nce",), "identity": ("lambda_identity", "lambda_cycle_identity"),
}  # fmt: skip


@dataclass(frozen=True)
class Divergence:
    """A failed finiteness check: every check up to step ``finite_at`` passed, the one at step
    ``found_at`` found the logged terms ``non_finite`` (keys such as ``"loss_travel"``) and the
    parts ``state`` of the training state (such as ``"generator"`` or ``"generator optimizer"``)
    NaN or infinite."""

    finite_at: int
    found_at: int
    non_finite: tuple[str, ...]
    state: tuple[str, ...] = ()

    @property
    def terms(self) -> list[str]:
        """The terms of the objective that went non-finite, by name (:data:`TERM_NAMES`, else the
        key); the generator's total ``loss_g`` is named only when none of its terms is non-finite."""
        named = {_term_name(key) for key in self.non_finite if key != "loss_g"}
        if not named and "loss_g" in self.non_finite:
            return ["generator total"]
        known = [name for name in dict.fromkeys(TERM_NAMES.values()) if name in named]  # in TERM_NAMES' order
        return known + sorted(named - set(known))


class TrainingDivergedError(RuntimeError):
    """The run stopped because a loss, the weights or the optimizer state became NaN or infinite;
    no checkpoint was written after the last finite one. The message is one line."""

    def __init__(self, message: str, rank: int = 0) -> None:
        super().__init__(message)
        self.rank = rank


def divergence_message(config: TrainConfig, divergence: Divergence, checkpoint: tuple[Path, int] | None) -> str:
    """The one line a diverged run stops with: the step window, what went non-finite, the checkpoint
    left on disk (its path and step; None when there is none) and what to try."""
    what = []
    if divergence.terms:
        terms, keys = divergence.terms, divergence.non_finite
        listed = ", ".join(terms[:-1]) + f" and {terms[-1]}" if len(terms) > 1 else terms[0]
        what.append(f"the {listed} loss{'es' if len(terms) > 1 else ''} became NaN or infinite ({', '.join(keys)})")
    if divergence.state:
        what.append(f"NaN or infinite numbers in the {', '.join(divergence.state)}")
    lower = [f"--lr (now {_shown(config.lr)})"]
    if "discriminator" in divergence.terms:
        lower.append(f"--lr-d (now {_shown(config.discriminator_lr)})")
    for term in divergence.terms:  # the weights in use of the terms that went non-finite
        for field in _TERM_WEIGHTS.get(term, ()):
            if getattr(config, field, 0):
                lower.append(f"--{field.replace('_', '-')} (now {_shown(getattr(config, field))})")
    if not divergence.terms:
        lower.append("the weight of a term (--lambda-*)")
    remedy = "try a lower " + " or ".join(lower) + (", or --amp bf16 rather than fp16" if config.amp == "fp16" else "")
    if checkpoint is None:
        kept = "no checkpoint was written (there is none to resume: a new run starts from step 0)"
    else:
        path, step = checkpoint
        resume = "--resume" if path == Path(config.out) / "latest.pt" else f"--resume-from {path}"
        kept = f"no checkpoint was written, {path} still holds step {step} ({resume} restarts from it)"
    return (
        f"training diverged between step {divergence.finite_at} and step {divergence.found_at}: "
        f"{'; '.join(what)}; {kept}; {remedy}"
    )


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


class NonFiniteWatch:
    """Which logged terms were NaN or infinite at some step since the last check.

    :meth:`add` ANDs ``isfinite`` of one step's terms into a boolean vector on the device (three
    small kernels: no host sync); :meth:`check` reads them (one sync; under DDP one all-reduce
    on the CPU control group, so every rank stops at the same check) and starts over. Steps
    that an fp16 gradient scaler skipped (its scale went down: it found inf or NaN gradients
    and did not update) are not counted: the scaler keeps skipping overflowing steps.
    """

    def __init__(self, runtime: Runtime, scalers: Sequence[Any] = ()) -> None:
        self.runtime = runtime
        self._finite: dict[tuple[str, ...], Tensor] = {}  # by the keys of a step's terms: each finite so far
        self._host: set[str] = set()  # terms that came as python numbers
        self._scalers = [scaler for scaler in scalers if scaler.is_enabled()]
        # before the first step (or after a resume's load_state_dict) get_scale() reads no device tensor
        self._scales = torch.tensor([s.get_scale() for s in self._scalers], device=runtime.device)
        self._keys: set[str] = set()

    def add(self, terms: Mapping[str, Tensor | float]) -> None:
        """Flag the non-finite ones among one step's logged terms (no host sync)."""
        tensors = {k: v for k, v in terms.items() if isinstance(v, Tensor)}
        self._keys.update(terms)
        for key, value in terms.items():
            if not isinstance(value, Tensor) and not math.isfinite(value):
                self._host.add(key)
        if not tensors:
            return
        keys, device = tuple(tensors), self.runtime.device
        values = [value if value.device == device else value.to(device) for value in tensors.values()]
        finite = torch.stack(values).isfinite()  # the terms are scalars (as log_record stacks them)
        skipped = self._skipped()
        if skipped is not None:
            finite.logical_or_(skipped)
        flags = self._finite.get(keys)
        self._finite[keys] = finite if flags is None else flags.logical_and_(finite)

    def _skipped(self) -> Tensor | None:
        """Whether a gradient scaler skipped the step just taken (its scale went down), on the device."""
        if not self._scalers:
            return None
        # GradScaler.update() halves its scale tensor (the private ``_scale``) in place after inf or NaN gradients
        current = torch.cat([s._scale.detach().reshape(1).float() for s in self._scalers])
        skipped = (current < self._scales).any()
        self._scales = current
        return skipped

    def check(self, state: Mapping[str, bool] | None = None) -> list[str]:
        """The logged keys that were non-finite since the last check and the parts of ``state``
        (name -> all finite, e.g. :func:`reference.checkpoint.finite_parts`) that are not, on any
        rank; the flags start over. A collective under DDP."""
        bad = set(self._host)
        for keys, flags in self._finite.items():
            bad.update(key for key, finite in zip(keys, flags.tolist()) if not finite)
        self._finite, self._host = {}, set()
        state = dict(state or {})
        bad.update(name for name, finite in state.items() if not finite)
        if not self.runtime.distributed:
            return sorted(bad)
        names = sorted(self._keys | set(state))  # the same on every rank
        vector = torch.tensor([int(name in bad) for name in names])
        dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self.runtime.control_group)
        return [name for name, flag in zip(names, vector.tolist()) if flag]


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

    Every logged term also goes to a :class:`NonFiniteWatch` (``scalers``: the run's gradient
    scalers, whose skipped steps it does not count), which :meth:`close_interval` reads before it
    writes anything and :meth:`finite` before each checkpoint, together with the training
    state's own check. A failed check leaves :attr:`diverged` set (and writes no record): the
    loop stops and writes no checkpoint. Under DDP every rank gets the same answer.

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
        scalers: Sequence[torch.amp.GradScaler] = (),
    ) -> None:
        self.config, self.runtime, self.optimizers, self.datasets = config, runtime, optimizers, datasets
        self.out = Path(config.out)
        self.log = MetricsLog(self.out, start_step) if runtime.is_main else None
        self.bar = progress_bar(start_step, config.steps, enabled=progress and runtime.is_main)
        self.images_per_step = config.batch_size * runtime.world_size  # source images per step, all ranks
        self.image_files = sum(len(d) for d in datasets if isinstance(d, ImageFolder))
        self.record: dict[str, float] = {}
        self.too_many_unreadable: str | None = None
        self.diverged: Divergence | None = None
        self.watch = NonFiniteWatch(runtime, scalers)
        self._finite_at = self._state_finite_at = start_step  # the last steps whose checks passed
        self._running: dict[str, Tensor | float] = {}
        self._start_step = start_step
        self._started = time.perf_counter()

    def add(self, terms: Mapping[str, Tensor | float]) -> None:
        """Add one step's logged terms to the running sums and to the watch (no host sync)."""
        for key, value in terms.items():
            self._running[key] = self._running.get(key, 0.0) + value
        self.watch.add(terms)

    def finite(self, step: int, state: Mapping[str, bool] | None = None) -> bool:
        """Whether the logged terms stayed finite since the last check and every part of ``state``
        (name -> all finite; :func:`reference.checkpoint.finite_parts`) is finite; else
        :attr:`diverged` is set. False at once after a failed check (no collective then)."""
        if self.diverged is not None:
            return False
        non_finite = self.watch.check(state)
        if non_finite:
            parts = tuple(name for name in non_finite if name in (state or {}))
            terms = tuple(name for name in non_finite if name not in parts)
            since = self._finite_at if terms else self._state_finite_at
            self.diverged = Divergence(since, step, terms, parts)
            return False
        self._finite_at = step
        if state is not None:
            self._state_finite_at = step
        return True

    def close_interval(self, step: int) -> dict[str, float]:
        """The record of the interval that ends at ``step``, written; the next interval starts.
        After a failed check (:meth:`finite`) nothing is written and the last record comes back."""
        if not self.finite(step):
            return self.record
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
        shown = ("loss_g", "loss_d", "loss_travel", "images_per_second")
        self.bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})
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
