r"""Images per second of one full training iteration, and what each optimisation buys.

One iteration is what ``reference/train.py`` runs per step: :func:`reference.train.generator_step`
(G forward, D on G(x), E(x) without gradient, E(G(x)), the travel and adversarial losses, backward
into G, Adam) followed by :func:`reference.train.discriminator_step` (D on real and detached fake
images, backward into D, Adam). Data loading is left out: the batches already sit on the device.

Each row of the table switches on a set of changes against the baseline (float32, eager,
contiguous NCHW tensors, E(x) recomputed every step, frozen encoder):

================  ============================================================================
``bf16``/``amp``  ``torch.autocast`` in bfloat16 for G, D and E (the travel loss stays float32)
``fp16``          autocast in float16 with a ``GradScaler`` per optimizer (CUDA only)
``compile``       ``torch.compile`` of G, D and the encoder (as ``--compile`` of the trainer)
``channels-last`` G, D, E and the input batches in ``torch.channels_last`` memory format
``cached``        E(x) of the source images computed once for the dataset (outside the timed
                  loop), so the step skips the no-grad source forward (``generator_step(..., emb_src=...)``)
``trainable``     the encoder's weights are trained: the trainer's trainable-embedder path of
                  ``generator_step`` (``encoder_optimizer``), i.e. E(x) and E(G(x)) both with
                  autograd, weight gradients for every encoder layer, and an Adam update of E.
                  What freezing CLIP saves; not combinable with ``cached``.
``bf16-weights``  the frozen encoder's weights stored in bfloat16 (not autocast); its input too
``fused-adam``    ``torch.optim.Adam(..., fused=True)`` for G, D (and a trainable E)
``autotune``      ``torch.compile(mode="max-autotune-no-cudagraphs")`` (implies ``compile``)
``cudagraphs``    ``torch.compile(mode="reduce-overhead")``: CUDA graphs (implies ``compile``)
``mb<M>``         exact micro-batching (``--micro-batch M`` of the trainer): embeddings of the
                  whole batch in chunks of M without graphs, then G, D and E re-run chunk by
                  chunk with the cached travel-loss gradient (same gradient, about one extra
                  forward of G and E, activation memory of M images), e.g. ``bf16+mb16``
``all``           bf16 + compile + channels-last + cached
================  ============================================================================

A row is a ``+``-joined list, e.g. ``bf16+compile+channels-last``; ``baseline`` is the empty list.
All rows run in one process on the same models. Per row: ``--warmup`` steps (``--compile-warmup``
for compiled rows; their time is the "warm-up s" column, compilation included), then up to
``--steps`` timed steps (fewer once ``--row-seconds`` have passed), each timed alone with the device
synchronised before the clock is read; the table shows the median. On CUDA (``--rounds 1``) the
rows run one after the other, each freed before the next, so "peak GiB" is the row's own. On a
shared CPU (``--rounds 3``) every row is warmed up first and the timed steps then go round the
rows in turns, so that a load that drifts hits every row alike. An out-of-memory error halves
the row's batch until it fits; the column "batch" says what ran.

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one eager
float32 step at a small batch, then scaled to the row's batch (every term is linear in the
batch except the N x N Gram matrices of the travel loss, which are negligible). The count
covers matmuls, convolutions and (on CUDA) attention; elementwise work and the optimizers are
not counted. On CUDA the table adds TFLOP/s and the fraction of the card's dense bf16 peak.

The encoder is a ``FrozenCLIPEncoder.from_config`` with random weights (no file, no download):
speed depends on shapes, not values.

    python benchmarks/bench_train.py                                   # CPU, tiny configuration
    python benchmarks/bench_train.py --device cuda                     # the paper's configuration
    python benchmarks/bench_train.py --device cuda --rows baseline bf16 bf16+compile all
    python benchmarks/bench_train.py --device cuda --rows bf16 bf16+mb32 bf16+mb16 --memory-fraction-gib 24

``--memory M [M ...]`` measures memory instead: one child process per micro-batch size M (0 or
the batch size: off) runs one step at ``--batch-size`` and reports the growth of its peak
resident memory (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA) over what it held before
the step, and the best time of a few more steps:

    python benchmarks/bench_train.py --memory 32 8 2 --batch-size 32   # CPU, tiny models
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `reference` and `travel_loss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch._dynamo
from torch import Tensor, nn

from reference.models import PatchDiscriminator, ResnetGenerator
from reference.train import StepOptions, discriminator_step, generator_step
from travel_loss.encoder import FrozenCLIPEncoder

# CLIPVisionConfig arguments of the encoder presets (OpenAI's CLIP shapes, and a tiny one).
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 image_size=48, patch_size=8, projection_dim=32, hidden_act="quick_gelu"),
    "vit-b-32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu"),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
}  # fmt: skip

# Whole-run presets; any flag given on the command line overrides its value.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(size=64, batch_size=8, g_width=16, g_blocks=2, d_width=16, d_layers=3, encoder_size="tiny"),
    "paper": dict(size=256, batch_size=128, g_width=64, g_blocks=9, d_width=64, d_layers=3, encoder_size="vit-l-14"),
}

FEATURES = (
    "bf16",
    "fp16",
    "compile",
    "channels-last",
    "cached",
    "trainable",
    "bf16-weights",
    "fused-adam",
    "autotune",
    "cudagraphs",
)
ALIASES = {"baseline": (), "amp": ("bf16",), "all": ("bf16", "compile", "channels-last", "cached")}
DEFAULT_ROWS = ("baseline", "bf16", "compile", "channels-last", "cached", "trainable", "all")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of the device name.
BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One set of switched-on changes."""

    label: str
    amp: str | None = None  # None | "bf16" | "fp16"
    compile: bool = False
    channels_last: bool = False
    cached: bool = False
    trainable: bool = False
    micro_batch: int = 0  # 0: off
    bf16_weights: bool = False
    fused_adam: bool = False
    compile_mode: str | None = None  # torch.compile's mode


def parse_row(spec: str, device: str) -> Row:
    """``"bf16+compile"`` -> Row(amp="bf16", compile=True); ValueError naming the bad part."""
    names: list[str] = []
    micro_batch = 0
    for part in spec.split("+"):
        part = part.strip()
        if part.startswith("mb") and part[2:].isdigit() and int(part[2:]) >= 1:
            micro_batch = int(part[2:])
        elif part in ALIASES:
            names += ALIASES[part]
        elif part in FEATURES:
            names.append(part)
        else:
            raise ValueError(
                f"rows: {spec!r}: expected '+'-joined names from {sorted([*FEATURES, *ALIASES])} or mb<M> "
                f"(M >= 1), got {part!r}"
            )
    if "bf16" in names and "fp16" in names:
        raise ValueError(f"rows: {spec!r}: choose one of bf16 and fp16")
    if "fp16" in names and device != "cuda":
        raise ValueError(f"rows: {spec!r}: fp16 autocast needs --device cuda (use bf16 on {device})")
    if "autotune" in names and "cudagraphs" in names:
        raise ValueError(f"rows: {spec!r}: choose one of autotune and cudagraphs (compile modes)")
    if "bf16-weights" in names and "trainable" in names:
        raise ValueError(f"rows: {spec!r}: bf16-weights is for the frozen encoder, not a trainable one")
    if "cached" in names and "trainable" in names:
        raise ValueError(
            f"rows: {spec!r}: a trainable encoder's source embeddings change every step and cannot be cached"
        )
    amp = "bf16" if "bf16" in names else "fp16" if "fp16" in names else None
    mode = "max-autotune-no-cudagraphs" if "autotune" in names else "reduce-overhead" if "cudagraphs" in names else None
    return Row(
        spec, amp, "compile" in names or mode is not None, "channels-last" in names, "cached" in names,
        "trainable" in names, micro_batch, "bf16-weights" in names, "fused-adam" in names, mode,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    batch: int | None = None
    warmup_seconds: float | None = None
    step_seconds: float | None = None  # median of the timed steps
    timed_steps: int = 0
    flops_per_image: float | None = None
    peak_gib: float | None = None  # CUDA only
    error: str | None = None

    @property
    def images_per_second(self) -> float | None:
        return None if self.step_seconds is None else self.batch / self.step_seconds


@dataclass
class Models:
    generator: nn.Module
    discriminator: nn.Module
    encoder: FrozenCLIPEncoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


def _batches(batch: int, size: int, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Two random batches (source A, target B) in [-1, 1], the same for every row."""
    generator = torch.Generator().manual_seed(0)
    real_a, real_b = (
        torch.rand(batch, 3, size, size, generator=generator).mul_(2).sub_(1).to(device) for _ in range(2)
    )
    if channels_last:
        real_a, real_b = (t.contiguous(memory_format=torch.channels_last) for t in (real_a, real_b))
    return real_a, real_b


def _set_layout(models: Models, row: Row) -> None:
    memory_format = torch.channels_last if row.channels_last else torch.contiguous_format
    for module in (models.generator, models.discriminator, models.encoder):
        module.to(memory_format=memory_format)
    models.encoder.to(torch.bfloat16 if row.bf16_weights else torch.float32)
    models.encoder.model.requires_grad_(row.trainable)


def _release(models: Models) -> None:
    for module in (models.generator, models.discriminator, models.encoder.model):
        for parameter in module.parameters():
            parameter.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Step:
    """One training iteration (generator_step + discriminator_step) for a row at a batch size."""

    def __init__(
        self,
        models: Models,
        row: Row,
        batch: int,
        size: int,
        device: torch.device,
        *,
        fresh_compile: bool = True,
        counting: bool = False,
    ) -> None:
        """``fresh_compile``: forget every earlier compilation first (so the warm-up shows the whole
        compile time); ``counting``: eager float32 and lr-0 SGD, for the FLOP count (no optimizer state)."""
        amp = None if counting else row.amp
        self.options = StepOptions(
            lambda_travel=1e-3, device_type=device.type,
            amp_dtype={None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp],
            micro_batch=0 if counting else row.micro_batch,
        )  # fmt: skip

        def optimizer(module: nn.Module, lr: float) -> torch.optim.Optimizer:
            if counting:
                return torch.optim.SGD(module.parameters(), lr=0.0)
            return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999), fused=row.fused_adam or None)

        self.g_optimizer = optimizer(models.generator, 2e-4)
        self.d_optimizer = optimizer(models.discriminator, 4e-4)
        self.e_optimizer = optimizer(models.encoder.model, 2e-4) if row.trainable else None
        fp16 = amp == "fp16"
        self.g_scaler = torch.amp.GradScaler("cuda", enabled=fp16) if fp16 else None
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=fp16) if fp16 else None
        generator, discriminator, encoder = models.generator, models.discriminator, models.encoder
        if row.compile and not counting:
            if fresh_compile:
                torch._dynamo.reset()
            compiled = (torch.compile(m, mode=row.compile_mode) for m in (generator, discriminator, encoder))
            generator, discriminator, encoder = compiled
        self.generator, self.discriminator = generator, discriminator
        self.real_a, self.real_b = _batches(batch, size, device, row.channels_last and not counting)
        self.emb_src = None
        if row.cached:
            with torch.no_grad(), self.options.autocast():
                self.emb_src = models.encoder(self.real_a)  # once for the dataset, eager
        self.encoder = encoder

    def __call__(self) -> None:
        g_out = generator_step(
            self.generator, self.discriminator, self.encoder, self.g_optimizer, self.real_a, self.options,
            scaler=self.g_scaler, encoder_optimizer=self.e_optimizer, emb_src=self.emb_src,
        )  # fmt: skip
        discriminator_step(
            self.discriminator, self.d_optimizer, self.real_b, g_out["fake"], self.options, scaler=self.d_scaler
        )


def count_flops_per_image(models: Models, row: Row, size: int, device: torch.device, batch: int) -> float:
    """FLOPs of one eager float32 iteration at ``batch`` images, divided by ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    _set_layout(models, Row("count", trainable=row.trainable))
    step = _Step(models, row, batch, size, device, counting=True)
    with FlopCounterMode(display=False) as counter:
        step()
    del step
    _release(models)
    return counter.get_total_flops() / batch


def _progress(iterable: range, label: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=label, leave=False, file=sys.stderr)


def prepare_row(
    models: Models, row: Row, batch: int, args: argparse.Namespace, device: torch.device
) -> tuple[_Step, Result]:
    """The row's step at ``batch`` images after its warm-up steps (may raise an out-of-memory error).

    With one round each compiled row starts from a clean compiler state; with several, the rows'
    compiled modules must all stay valid until the last round, so nothing is reset.
    """
    _set_layout(models, row)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = _Step(models, row, batch, args.size, device, fresh_compile=args.rounds == 1)
    _sync(device)
    started = time.perf_counter()
    for _ in range(args.compile_warmup if row.compile else args.warmup):
        step()
    _sync(device)
    return step, Result(row.label, batch, warmup_seconds=time.perf_counter() - started)


def time_steps(step: _Step, count: int, seconds: float, label: str, device: torch.device) -> list[float]:
    """Seconds of up to ``count`` steps, each alone between two device synchronisations; stops
    early once ``seconds`` have passed (after at least 2 steps)."""
    times: list[float] = []
    for _ in _progress(range(count), label):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > seconds and len(times) >= 2:
            break
    return times


def prepare_fitting(
    models: Models, row: Row, args: argparse.Namespace, device: torch.device
) -> tuple[_Step | None, Result]:
    """:func:`prepare_row` at ``--batch-size``, halving the batch on out-of-memory errors until it fits."""
    batch = args.batch_size
    while True:
        failure: BaseException | None = None
        try:
            return prepare_row(models, row, batch, args, device)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            failure = error
        del failure  # drop the traceback's frames (and their tensors) before freeing memory
        if args.rounds == 1:  # with several rounds, earlier rows still need their compiled modules
            torch._dynamo.reset()
        _release(models)
        if batch // 2 < 2:
            return None, Result(row.label, batch, error=f"out of memory down to batch {batch}")
        print(f"  {row.label}: out of memory at batch {batch}, trying {batch // 2}", file=sys.stderr, flush=True)
        batch //= 2


def finish(
    result: Result,
    times: list[float],
    models: Models,
    row: Row,
    args: argparse.Namespace,
    device: torch.device,
    flops_cache: dict,
) -> Result:
    """Fill in the median step time and the FLOPs per image (counted once per kind of work)."""
    result.step_seconds = statistics.median(times)
    result.timed_steps = len(times)
    _release(models)
    key = row.cached, row.trainable
    if key not in flops_cache:
        flops_cache[key] = count_flops_per_image(models, row, args.size, device, min(result.batch, args.count_batch))
    result.flops_per_image = flops_cache[key]
    return result


def run_rows(models: Models, rows: list[Row], args: argparse.Namespace, device: torch.device) -> Iterator[Result]:
    """Each row's result, in order.

    One round (``--rounds 1``): row after row, each prepared, timed and freed before the next
    (peak memory is then the row's own). More rounds: every row is prepared and warmed up first,
    then each round times ``--steps`` steps of every row in turn, so that a load that drifts
    (other processes on a shared machine) hits all rows alike; the median is over all rounds.
    """
    flops_cache: dict = {}
    if args.rounds == 1:
        for row in rows:
            try:
                step, result = prepare_fitting(models, row, args, device)
            except Exception as error:
                torch._dynamo.reset()
                _release(models)
                yield Result(row.label, args.batch_size, error=f"failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            if step is not None:
                times = time_steps(step, args.steps, args.row_seconds, row.label, device)
                if device.type == "cuda":
                    result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
                del step
                finish(result, times, models, row, args, device, flops_cache)
            yield result
        return
    prepared = [prepare_fitting(models, row, args, device) for row in rows]
    times: list[list[float]] = [[] for _ in rows]
    for round_index in range(args.rounds):
        for index, (row, (step, _)) in enumerate(zip(rows, prepared)):
            if step is not None:
                _set_layout(models, row)
                label = f"{row.label} (round {round_index + 1}/{args.rounds})"
                times[index] += time_steps(step, args.steps, args.row_seconds / args.rounds, label, device)
    results = [result for _, result in prepared]
    del prepared  # the steps, their optimizers and compiled modules
    torch._dynamo.reset()
    for row, result, row_times in zip(rows, results, times):
        if row_times:
            finish(result, row_times, models, row, args, device, flops_cache)
        yield result


# ---------------------------------------------------------------------------------------------
# Setup and report
# ---------------------------------------------------------------------------------------------


def build_models(args: argparse.Namespace, device: torch.device) -> Models:
    torch.manual_seed(0)
    generator = ResnetGenerator(3, 3, width=args.g_width, n_blocks=args.g_blocks)
    discriminator = PatchDiscriminator(3, width=args.d_width, n_layers=args.d_layers)
    vision = dict(ENCODER_PRESETS[args.encoder_size])
    patch = vision["patch_size"]
    image_size = vision["image_size"] if args.size >= vision["image_size"] else args.size // patch * patch
    encoder = FrozenCLIPEncoder.from_config(
        vision, seed=0, crop="center", features="pooled", image_size=image_size, check_range=False
    )
    return Models(generator.to(device), discriminator.to(device), encoder.to(device))


def bf16_peak(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s, where the number comes from) for a CUDA device name."""
    for key, peak in BF16_PEAKS:
        if key.lower() in device_name.lower():
            return peak, f"{key} dense bf16 peak"
    return None, "unknown card (give --peak-tflops)"


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


class Table:
    """The result table, printed a line at a time (a run cut short keeps the rows done so far)."""

    def __init__(self, device: torch.device, peak: float | None) -> None:
        self.cuda, self.peak = device.type == "cuda", peak
        self.base: Result | None = None
        header = (
            f"{'row':<28} {'batch':>5} {'warm-up s':>9} {'ms/step':>9} {'img/s':>8} "
            f"{'vs base':>7} {'GFLOP/img':>9} {'TFLOP/s':>8}"
        )
        if self.cuda:
            header += f" {'% peak':>6} {'peak GiB':>8}"
        print(header)
        print("-" * len(header), flush=True)

    def add(self, r: Result) -> None:
        if r.error:
            print(f"{r.label:<28} {r.batch:>5} {r.error}", flush=True)
            return
        self.base = self.base or r  # the first row that ran is the reference
        tflops = r.flops_per_image * r.images_per_second / 1e12 if r.flops_per_image else None
        line = (
            f"{r.label:<28} {r.batch:>5} {r.warmup_seconds:9.1f} {1e3 * r.step_seconds:9.1f} "
            f"{r.images_per_second:8.1f} "
            f"{r.images_per_second / self.base.images_per_second:6.2f}x "
            f"{_fmt(r.flops_per_image and r.flops_per_image / 1e9, '.1f', 9)} "
            f"{_fmt(tflops, '.1f' if self.cuda else '.3f', 8)}"
        )
        if self.cuda:
            line += f" {_fmt(tflops and self.peak and 100 * tflops / self.peak, '.1f', 6)} {_fmt(r.peak_gib, '.1f', 8)}"
        print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Memory against micro-batch size (--memory): one child process per size
# ---------------------------------------------------------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure_memory(args: argparse.Namespace, micro_batch: int, device: torch.device) -> dict[str, float]:
    """In a child process: peak memory growth of one step at ``--batch-size`` and its best time.

    A step at batch 2 first loads the kernels' code pages and allocates the optimizers' state, so
    that the growth measured over the resident (or allocated) bytes before the big step is what
    the batch's activations need. The row is the first of ``--rows`` with ``micro_batch`` set.
    """
    models = build_models(args, device)
    base_row = args.parsed_rows[0]
    row = dataclasses.replace(base_row, label=f"mb{micro_batch}", micro_batch=micro_batch)
    _set_layout(models, row)
    step = _Step(models, row, 2, args.size, device)
    step()  # warm-up at batch 2: code pages, Adam state
    small = step
    step = _Step(models, row, args.batch_size, args.size, device, fresh_compile=False)
    step.g_optimizer.load_state_dict(small.g_optimizer.state_dict())
    step.d_optimizer.load_state_dict(small.d_optimizer.state_dict())
    del small
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _resident_bytes()
    started = time.perf_counter()
    step()
    _sync(device)
    times = [time.perf_counter() - started]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times += time_steps(step, max(args.steps, 2), args.row_seconds, row.label, device)
    return {"micro_batch": micro_batch, "peak_bytes": max(peak, 0), "seconds": min(times)}


def run_memory_table(argv: list[str], args: argparse.Namespace) -> None:
    """One child process per ``--memory`` size, the table printed a line at a time."""
    print(f"{'micro-batch':>11} {'peak MiB':>9} {'vs off':>7} {'s/step':>8} {'vs off':>7} {'img/s':>7}")
    print("-" * 53, flush=True)
    reference: dict[str, float] | None = None
    for micro_batch in args.memory:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-child", str(micro_batch)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            print(f"{micro_batch:>11} failed: {completed.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        reference = reference or result
        label = "off" if micro_batch in (0, args.batch_size) else str(micro_batch)
        memory, seconds = result["peak_bytes"], result["seconds"]
        print(
            f"{label:>11} {memory / 2**20:9.1f} {memory / max(reference['peak_bytes'], 1):6.2f}x "
            f"{seconds:8.3f} {seconds / reference['seconds']:6.2f}x {args.batch_size / seconds:7.1f}",
            flush=True,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny on cpu, paper on cuda")
    parser.add_argument("--size", type=int, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, help="images per step (halved on CUDA out-of-memory)")
    parser.add_argument("--g-width", type=int)
    parser.add_argument("--g-blocks", type=int)
    parser.add_argument("--d-width", type=int)
    parser.add_argument("--d-layers", type=int)
    parser.add_argument("--encoder-size", choices=sorted(ENCODER_PRESETS))
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(DEFAULT_ROWS),
        help=f"'+'-joined sets of {', '.join(FEATURES)}; aliases baseline, amp (= bf16), all",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per eager row")
    parser.add_argument("--compile-warmup", type=int, default=3, help="untimed steps per compiled row")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round (at most)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default: 3 on cpu, 1 on cuda)")
    parser.add_argument(
        "--row-seconds", type=float, default=30.0, help="stop timing a row after this long (>= 2 steps)"
    )
    parser.add_argument("--count-batch", type=int, default=4, help="batch of the FLOP-counting step")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not detected")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, help="also write the configuration and the rows here")
    parser.add_argument(
        "--memory",
        type=int,
        nargs="+",
        metavar="M",
        help="instead of the table: peak memory and time of one step per micro-batch size M "
        "(0: off), each in a child process, for the first of --rows",
    )
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-fraction-gib",
        type=float,
        help="CUDA: cap this process's memory at this many GiB (set_per_process_memory_fraction)",
    )
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset; ValueError on a bad combination, before any work."""
    preset = PRESETS[args.preset or ("paper" if args.device == "cuda" else "tiny")]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("size", "g_width", "d_width", "d_layers", "warmup", "steps", "count_batch"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size: expected an int >= 2 (the travel loss compares pairs), got {args.batch_size}")
    if args.size % 4:
        raise ValueError(f"--size: expected a multiple of 4 (the generator downsamples twice), got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' asked for, but torch.cuda.is_available() is False")
    if args.rounds is None:
        args.rounds = 1 if args.device == "cuda" else 3
    if args.rounds < 1:
        raise ValueError(f"--rounds: expected a positive int, got {args.rounds}")
    args.parsed_rows = [parse_row(spec, args.device) for spec in args.rows]
    for micro_batch in args.memory or []:
        if micro_batch < 0:
            raise ValueError(f"--memory: expected micro-batch sizes >= 0, got {micro_batch}")
    if args.memory_fraction_gib is not None and not args.memory_fraction_gib > 0:
        raise ValueError(f"--memory-fraction-gib: expected a positive number, got {args.memory_fraction_gib}")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and args.memory_fraction_gib:
        index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" has none
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_fraction_gib * 2**30 / total), index)
    if args.memory_child is not None:
        print(json.dumps(measure_memory(args, args.memory_child, device)))
        return
    import transformers

    models = build_models(args, torch.device("cpu") if args.memory else device)  # --memory: the children measure
    encoder_parameters = sum(p.numel() for p in models.encoder.model.parameters())
    g_parameters = sum(p.numel() for p in models.generator.parameters())
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else bf16_peak(name)
        hardware = (
            f"{name}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB; "
            f"CUDA {torch.version.cuda}; "
            f"float32 matmul precision {torch.get_float32_matmul_precision()!r}, "
            f"cudnn TF32 {torch.backends.cudnn.allow_tf32}"
        )
    else:
        import platform

        peak, peak_source = None, "n/a"
        hardware = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"training iteration (generator_step + discriminator_step): {hardware}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}")
    print(
        f"{args.size} px, batch {args.batch_size}; G width {args.g_width}, {args.g_blocks} blocks "
        f"({g_parameters / 1e6:.1f} M); "
        f"PatchGAN width {args.d_width}, {args.d_layers} layers; encoder {args.encoder_size} random weights "
        f"({encoder_parameters / 1e6:.1f} M, {models.encoder.image_size} px centre crop)"
    )
    if args.memory:
        what = "resident memory" if device.type == "cpu" else "torch.cuda.max_memory_allocated"
        print(
            f"row {args.rows[0]!r}: growth of peak {what} during one step, one child process per micro-batch "
            f"size; time: best of that step and {max(args.steps, 2)} more",
            flush=True,
        )
        if device.type == "cuda" and args.memory_fraction_gib:
            print(f"memory capped at {args.memory_fraction_gib:g} GiB (torch.cuda.set_per_process_memory_fraction)")
        run_memory_table(sys.argv[1:] if argv is None else argv, args)
        return
    print(
        f"median of <= {args.steps} timed steps per row"
        + (f" in each of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + f" after {args.warmup} warm-up steps ({args.compile_warmup} when compiled); FLOPs counted "
        f"(matmul, conv{', attention' if device.type == 'cuda' else ''}) at batch {args.count_batch}"
        + (f"; peak {peak} TFLOP/s assumed ({peak_source})" if device.type == "cuda" else ""),
        flush=True,
    )
    if device.type == "cuda" and args.memory_fraction_gib:
        print(f"memory capped at {args.memory_fraction_gib:g} GiB (torch.cuda.set_per_process_memory_fraction)")
    table = Table(device, peak)
    results: list[Result] = []
    for result in run_rows(models, args.parsed_rows, args, device):
        results.append(result)
        table.add(result)
        if args.json:
            config = {k: v for k, v in vars(args).items() if k not in ("parsed_rows", "json")}
            rows = [{**asdict(r), "images_per_second": r.images_per_second} for r in results]
            record = {
                "hardware": hardware,
                "peak_tflops": peak,
                "peak_source": peak_source,
                "config": config,
                "rows": rows,
            }
            args.json.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
