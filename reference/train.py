r"""Train CLIPTraVeLGAN: one generator, one discriminator, a frozen CLIP encoder, one loop.

Unpaired translation A -> B. Every iteration draws a batch x from A and a batch y from B and
makes two updates:

    generator      L_G = L_adv(D(aug(G(x)))) + lambda * L_travel(E(x), E(G(x)))   (E(x) without grad)
    discriminator  L_D = L_adv^D(D(aug(y)), D(aug(G(x))))                          (G(x) detached)

where ``L_travel`` compares the transformation vectors E(x_i) - E(x_j) with
E(G(x_i)) - E(G(x_j)) over all ordered pairs of the (global) batch (``travel_loss``) and ``aug``
is an optional differentiable augmentation (``reference.losses.diff_augment``). Adam with betas
(0.5, 0.999) for both networks, the discriminator at twice the generator's learning rate.

Usage::

    python reference/train.py --data datasets/gta2cityscapes --out runs/gta      # trainA/, trainB/
    python reference/train.py --data-a photos/ --data-b paintings/ --size 128 --out runs/p2m
    python reference/train.py --toy-streets --encoder-mode toy --size 64 --steps 600 --out runs/toy
    torchrun --nproc_per_node 4 reference/train.py --data ... --batch-size 32   # 4 x 32 = 128 pairs set
    python reference/train.py --resume --out runs/gta                             # continue latest.pt
    python reference/train.py --demo --out runs/demo                              # the toy-street study

The file reads top to bottom: configuration, the two update steps, setup (devices, processes,
precision), models, data, logging, the training loop, the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `reference` and `travel_loss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from reference.checkpoint import LATEST, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from reference.data import ImageFolder, ToyStreets, resolve_unpaired_folders
from reference.losses import (
    AUGMENT_OPS,
    GAN_LOSSES,
    diff_augment,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    notebook_travel_loss,
)
from reference.models import PatchDiscriminator, ResnetGenerator, default_n_blocks, init_weights
from travel_loss import TravelQueue, siamese_margin_loss, travel_loss
from travel_loss.distributed import all_gather_with_grad

__all__ = [
    "SetupError",
    "SiameseEmbedder",
    "StepOptions",
    "TrainConfig",
    "build_encoder",
    "check_config",
    "discriminator_step",
    "generator_step",
    "main",
    "save_image_grid",
    "train",
]

PAPER_ENCODER = "openai/clip-vit-large-patch14"
ENCODER_MODES = ("clip", "random-clip", "siamese", "toy")
TRAVEL_OBJECTIVES = ("paper", "notebook")
AMP_MODES = ("off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "xla")


class SetupError(RuntimeError):
    """The environment cannot run the requested configuration (a missing package, an unsupported feature)."""


# =============================================================================================
# 1. Configuration
# =============================================================================================


@dataclass
class TrainConfig:
    """Every option of a run; the command line maps one flag to each field (``--g-width`` -> g_width)."""

    # data: a CycleGAN-layout root (trainA/, trainB/), two folders, or the toy streets
    data: str | None = None  # a CycleGAN-layout root with trainA/ and trainB/
    data_a: str | None = None  # a folder of source-domain images (with --data-b)
    data_b: str | None = None  # a folder of target-domain images
    toy_streets: bool = False  # train on the generated toy streets (reference.data.ToyStreets)
    toy_length: int = 10_000  # training scenes per toy domain (generated on the fly)
    toy_seed: int = 0  # the toy training set; evaluate on other seeds
    size: int = 256  # images are resized to size x size
    flip: bool = True  # random horizontal flips of training images
    num_workers: int | None = None  # None: 0 for the toy streets, min(4, cpus) for folders

    # objective
    lambda_travel: float | str = 1.0  # a number, or "auto" (reference.adaptive_lambda)
    lambda_auto_scale: float = 1.0  # "auto": wanted ratio of travel to adversarial gradient norm
    lambda_auto_momentum: float = 0.9  # "auto": moving-average momentum of the gradient ratio
    travel_objective: str = "paper"  # "paper": equation 2; "notebook": the original code's variant
    travel_distance: str = "cosine"  # travel_loss distance: cosine | squared_euclidean | travelgan
    travel_reduction: str = "mean"  # mean | sum over the N(N-1) pairs (lambda conventions: README)
    travel_queue: int = 0  # K > 0: also pair with the last K rows of earlier batches (travel_loss.TravelQueue)
    gan_loss: str = "bce"  # bce (non-saturating) | lsgan | hinge
    augment: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"

    # encoder E
    encoder: str = PAPER_ENCODER  # hub id or local folder of a CLIP checkpoint
    encoder_mode: str = "clip"  # clip | random-clip (the ablation) | siamese (TraVeLGAN) | toy
    crop: str = "center"  # FrozenCLIPEncoder crop policy: center | resize | full
    features: str = "pooled"  # FrozenCLIPEncoder features: pooled | projected
    siamese_width: int = 32  # siamese mode: the embedder's first conv width
    siamese_dim: int = 1000  # siamese mode: embedding size (TraVeLGAN's 1000)
    siamese_margin: float = 10.0  # siamese mode: margin of siamese_margin_loss

    # networks
    g_width: int = 64  # generator width (channels after the stem)
    g_blocks: int | None = None  # None: 9 above 128 px, else 6
    d_width: int = 64  # discriminator width
    d_layers: int = 3  # stride-2 layers of the PatchGAN (3: 70 x 70 patches)

    # optimisation
    steps: int = 20_000  # training iterations (one G and one D update each)
    batch_size: int = 16  # per process; the travel loss sees batch_size * world_size images
    lr: float = 2e-4  # generator learning rate
    lr_d: float | None = None  # None: 2 * lr
    beta1: float = 0.5  # Adam betas of both optimizers
    beta2: float = 0.999
    decay_steps: int = 0  # linear decay of both learning rates to 0 over the last decay_steps

    # engineering
    device: str = "auto"  # auto | cpu | cuda | xla
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    compile: bool = False  # torch.compile G, D and the encoder forward
    compile_backend: str = "inductor"
    channels_last: bool = False  # channels-last memory format (pays under --compile on CUDA)
    seed: int = 0

    # output
    out: str = "runs/cliptravelgan"  # run folder: latest.pt, metrics.jsonl, samples/
    resume: bool = False  # continue from OUT/latest.pt
    log_every: int = 50  # steps between metric lines (the only host syncs)
    sample_every: int = 500  # steps between input | translation PNG grids
    sample_count: int = 8
    checkpoint_every: int = 1000  # steps between atomic checkpoints
    keep_checkpoints: int = 0  # also keep the last K checkpoints as step_XXXXXX.pt

    @property
    def discriminator_lr(self) -> float:
        return 2 * self.lr if self.lr_d is None else self.lr_d

    @property
    def generator_blocks(self) -> int:
        return default_n_blocks(self.size) if self.g_blocks is None else self.g_blocks


def check_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad field, before any work is done."""

    def fail(name: str, expected: str) -> None:
        raise ValueError(f"{name}: expected {expected}, got {getattr(config, name)!r}")

    def positive_int(name: str, minimum: int = 1) -> None:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            fail(name, f"an int >= {minimum}")

    def choice(name: str, allowed: Sequence[str]) -> None:
        if getattr(config, name) not in allowed:
            fail(name, f"one of {', '.join(map(repr, allowed))}")

    sources = [config.data is not None, config.data_a is not None or config.data_b is not None, config.toy_streets]
    if sum(sources) != 1:
        raise ValueError(
            "data: give exactly one of data (a CycleGAN-layout root), data_a and data_b (two folders) or "
            f"toy_streets=True; got data={config.data!r}, data_a={config.data_a!r}, data_b={config.data_b!r}, "
            f"toy_streets={config.toy_streets!r}"
        )
    if (config.data_a is None) != (config.data_b is None):
        raise ValueError(f"data_a, data_b: give both folders, got data_a={config.data_a!r}, data_b={config.data_b!r}")
    positive_int("size", 8)
    if config.size % 4:
        fail("size", "a multiple of 4 (the generator downsamples twice)")
    positive_int("toy_length")
    positive_int("toy_seed", 0)
    if config.num_workers is not None:
        positive_int("num_workers", 0)
    lam = config.lambda_travel
    if lam != "auto" and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or not math.isfinite(lam)):
        fail("lambda_travel", "a finite number >= 0 or 'auto'")
    for name in ("lambda_auto_scale", "lr", "siamese_margin"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            fail(name, "a finite number > 0")
    if config.lr_d is not None and (isinstance(config.lr_d, bool) or not isinstance(config.lr_d, (int, float)) or not config.lr_d > 0):
        fail("lr_d", "None (twice lr) or a number > 0")
    for name in ("lambda_auto_momentum", "beta1", "beta2"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            fail(name, "a number in [0, 1)")
    choice("travel_objective", TRAVEL_OBJECTIVES)
    choice("travel_distance", ("cosine", "squared_euclidean", "travelgan"))
    choice("travel_reduction", ("mean", "sum"))
    if config.travel_objective == "notebook" and (config.travel_distance, config.travel_reduction) != ("cosine", "mean"):
        raise ValueError(
            "travel_objective: 'notebook' fixes its own distance and reduction (cosine over the batch axis, summed); "
            f"leave travel_distance and travel_reduction at their defaults, got {config.travel_distance!r}, "
            f"{config.travel_reduction!r}"
        )
    choice("gan_loss", GAN_LOSSES)
    if not isinstance(config.augment, str) or any(
        op.strip() and op.strip() not in AUGMENT_OPS for op in config.augment.split(",")
    ):
        fail("augment", f"'' or a comma-separated list of {sorted(AUGMENT_OPS)}")
    choice("encoder_mode", ENCODER_MODES)
    choice("crop", ("center", "resize", "full"))
    choice("features", ("pooled", "projected"))
    for name in ("siamese_width", "siamese_dim", "g_width", "d_width", "d_layers", "steps", "batch_size"):
        positive_int(name)
    positive_int("travel_queue", 0)
    if config.travel_queue and (config.travel_objective != "paper" or config.encoder_mode == "siamese"):
        fail("travel_queue", "0 with travel_objective 'notebook' or encoder_mode 'siamese' (queued rows need a frozen encoder)")
    if config.batch_size < 2 and not config.travel_queue:
        fail("batch_size", "an int >= 2 (the travel loss compares pairs), or any with travel_queue > 0")
    if config.g_blocks is not None:
        positive_int("g_blocks", 0)
    probe = PatchDiscriminator(3, width=1, n_layers=config.d_layers)
    if probe.output_size(config.size) < 1:
        smallest = next(s for s in range(4, 4096, 4) if probe.output_size(s) >= 1)
        fail("size", f"a size of at least {smallest} for a discriminator with d_layers={config.d_layers} (or fewer d_layers)")
    positive_int("decay_steps", 0)
    if config.decay_steps > config.steps:
        fail("decay_steps", f"an int <= steps = {config.steps}")
    choice("device", DEVICES)
    choice("amp", AMP_MODES)
    if config.amp == "fp16" and config.device in ("cpu", "xla"):
        fail("amp", f"'off' or 'bf16' on device {config.device!r}: float16 autocast needs CUDA (use bf16)")
    positive_int("seed", 0)
    for name in ("log_every", "sample_every", "checkpoint_every", "sample_count"):
        positive_int(name)
    positive_int("keep_checkpoints", 0)
    if not config.out:
        fail("out", "an output folder")


# =============================================================================================
# 2. The two updates of one iteration
# =============================================================================================


@dataclass(frozen=True)
class StepOptions:
    """What :func:`generator_step` and :func:`discriminator_step` need to know besides the models."""

    lambda_travel: float = 1.0  # ignored when an adaptive lambda is passed
    travel_objective: str = "paper"
    travel_distance: str = "cosine"
    travel_reduction: str = "mean"
    gan_loss: str = "bce"
    augment: str = ""
    siamese_margin: float = 10.0
    device_type: str = "cpu"  # for autocast
    amp_dtype: torch.dtype | None = None  # None: full precision

    @classmethod
    def from_config(cls, config: TrainConfig, device_type: str) -> StepOptions:
        return cls(
            lambda_travel=0.0 if config.lambda_travel == "auto" else float(config.lambda_travel),
            travel_objective=config.travel_objective,
            travel_distance=config.travel_distance,
            travel_reduction=config.travel_reduction,
            gan_loss=config.gan_loss,
            augment=config.augment,
            siamese_margin=config.siamese_margin,
            device_type=device_type,
            amp_dtype={"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp],
        )

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)


def travel_term(emb_src: Tensor, emb_gen: Tensor, options: StepOptions) -> Tensor:
    """The travel loss of the chosen objective, in float32 (embeddings of the whole global batch)."""
    if options.travel_objective == "notebook":
        return notebook_travel_loss(emb_src, emb_gen)
    return travel_loss(
        emb_src, emb_gen, distance=options.travel_distance, reduction=options.travel_reduction, check_finite=False
    )


def _backward_and_step(
    loss: Tensor, optimizers: Sequence[torch.optim.Optimizer], inputs: list[Tensor], scaler: torch.amp.GradScaler | None
) -> None:
    """Backward into ``inputs`` only (no gradient for the other network's weights), then one update."""
    if scaler is None or not scaler.is_enabled():
        loss.backward(inputs=inputs)
        for optimizer in optimizers:
            optimizer.step()
        return
    scaler.scale(loss).backward(inputs=inputs)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()


def _parameters(optimizers: Sequence[torch.optim.Optimizer]) -> list[Tensor]:
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    encoder: nn.Module,
    optimizer: torch.optim.Optimizer,
    real_a: Tensor,
    options: StepOptions,
    *,
    scaler: torch.amp.GradScaler | None = None,
    encoder_optimizer: torch.optim.Optimizer | None = None,
    adaptive_lambda: Any | None = None,
    emb_src: Tensor | None = None,
    travel_queue: TravelQueue | None = None,
) -> dict[str, Any]:
    r"""One generator update on a batch ``real_a`` (n, 3, H, W) of source images in [-1, 1].

    .. math::  L_G = L_\mathrm{adv}(D(\mathrm{aug}(G(x)))) + \lambda\, L_\mathrm{travel}(E(x), E(G(x)))

    ``E(x)`` is computed without gradient when the encoder is frozen. With an
    ``encoder_optimizer`` the encoder is TraVeLGAN's trainable Siamese network: both embeddings
    keep their gradient, the loss gains :math:`\lambda\, L_\mathrm{margin}(E(x))` (which keeps E
    from collapsing) and E is updated together with G. Under DDP the embeddings of all ranks are
    gathered with gradient, so the travel loss compares every pair of the global batch.

    ``discriminator`` must be the *unwrapped* module (not DDP): only G (and E) receive gradients
    here. ``adaptive_lambda`` (``reference.adaptive_lambda.GradientBalancedLambda``) replaces
    ``options.lambda_travel`` by a gradient-balanced value. Returns detached losses, the lambda
    used and the translations ``"fake"`` (detached) for the discriminator step.

    ``emb_src``: precomputed (n, D) source embeddings E(x) (a frozen encoder's embeddings of a
    fixed data set can be computed once); the step then skips the source forward.

    ``travel_queue``: a :class:`travel_loss.TravelQueue` that replaces the travel term (pairs
    with queued rows of earlier steps too; batch 1 works).
    """
    if emb_src is not None and encoder_optimizer is not None:
        raise ValueError("emb_src: precomputed source embeddings cannot be used with a trainable encoder (encoder_optimizer)")
    optimizers = [optimizer] if encoder_optimizer is None else [optimizer, encoder_optimizer]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with options.autocast():
        fake = generator(real_a)
        judged = fake.to(real_a.dtype)  # D sees one input dtype in both steps: one compiled graph
        fake_logits = discriminator(diff_augment(judged, options.augment) if options.augment else judged)
        if encoder_optimizer is not None:  # one forward of the trainable embedder (one DDP call)
            emb_src, emb_gen = encoder(torch.cat([real_a, fake])).chunk(2)
        else:
            if emb_src is None:
                with torch.no_grad():
                    emb_src = encoder(real_a)
            emb_gen = encoder(fake)
    adversarial = generator_adversarial_loss(fake_logits, options.gan_loss)
    emb_src, emb_gen = all_gather_with_grad(emb_src.float()), all_gather_with_grad(emb_gen.float())
    travel = travel_term(emb_src, emb_gen, options) if travel_queue is None else travel_queue(emb_src, emb_gen)
    lam = options.lambda_travel if adaptive_lambda is None else adaptive_lambda.update(adversarial, travel)
    loss = adversarial + lam * travel
    if encoder_optimizer is not None:
        loss = loss + lam * siamese_margin_loss(emb_src, options.siamese_margin, check_finite=False)
    _backward_and_step(loss, optimizers, _parameters(optimizers), scaler)
    return {
        "loss_g": loss.detach(),
        "loss_adv": adversarial.detach(),
        "loss_travel": travel.detach(),
        "lambda": lam,
        "fake": fake.detach(),
    }


def discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real_b: Tensor,
    fake_b: Tensor,
    options: StepOptions,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Tensor]:
    """One discriminator update on real target images ``real_b`` and translations ``fake_b`` (both (n, 3, H, W)).

    Real and fake go through D as one batch (one call of a DDP module; D has no batch
    statistics, so this equals two calls), each augmented by the same policy.
    """
    optimizer.zero_grad(set_to_none=True)
    fake_b = fake_b.detach().to(real_b.dtype)  # an autocast G(x) would otherwise recompile a compiled D
    if options.augment:
        real_b, fake_b = diff_augment(real_b, options.augment), diff_augment(fake_b, options.augment)
    with options.autocast():
        logits = discriminator(torch.cat([real_b, fake_b]))
    real_logits, fake_logits = logits.split([real_b.shape[0], fake_b.shape[0]])
    loss = discriminator_adversarial_loss(real_logits, fake_logits, options.gan_loss)
    _backward_and_step(loss, [optimizer], _parameters([optimizer]), scaler)
    return {
        "loss_d": loss.detach(),
        "d_real": real_logits.detach().float().mean(),
        "d_fake": fake_logits.detach().float().mean(),
    }


# =============================================================================================
# 3. Setup: device, processes, precision, signals
# =============================================================================================


@dataclass
class Runtime:
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


def _import_xla() -> Any:
    try:
        import torch_xla.core.xla_model as xm  # noqa: PLC0415
    except ImportError as error:
        raise SetupError(
            "--device xla needs torch_xla, which is not installed (pip install torch_xla, on a TPU host); "
            "use --device cpu or --device cuda on other machines"
        ) from error
    return xm


def setup_runtime(config: TrainConfig) -> Runtime:
    """Pick the device and join the process group that torchrun describes (WORLD_SIZE > 1)."""
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if config.amp == "fp16" and kind != "cuda":
        raise ValueError(f"amp: 'fp16' needs a CUDA device, but the run uses {kind!r}; use --amp bf16 or --amp off")
    xm = _import_xla() if kind == "xla" else None

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
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif kind == "xla":
        device = xm.xla_device()
    else:
        device = torch.device("cpu")
    control = None
    if world > 1:
        control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Runtime(device=device, rank=rank, world_size=world, owns_process_group=owns, control_group=control, xla=xm)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int) -> int:
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


# =============================================================================================
# 4. Models
# =============================================================================================


class SiameseEmbedder(nn.Module):
    """TraVeLGAN's trainable embedder S: 4x4 stride-2 convs with LeakyReLU(0.2) down to at most
    4x4 pixels (channels doubling from ``width``, capped at 8 width), then a linear map to ``dim``.

    (N, 3, size, size) -> (N, dim). No normalisation layer: each embedding depends on its image alone.
    """

    def __init__(self, size: int, width: int = 32, dim: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, out, side = 3, width, size
        while side > 4:
            layers += [nn.Conv2d(channels, out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            channels, out, side = out, min(2 * out, 8 * width), side // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * side * side, dim)
        init_weights(self)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))


# The shape of CLIP ViT-L/14's vision tower, for the random-weights ablation without a download.
VIT_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_encoder(config: TrainConfig) -> nn.Module:
    """The embedder E of the travel loss for ``config.encoder_mode``.

    - ``clip``: ``FrozenCLIPEncoder(config.encoder)``, pretrained weights by hub id or folder;
    - ``random-clip``: the same architecture with random weights (the paper's ablation), from
      the checkpoint's config when ``config.encoder`` names one, else ViT-L/14's shape;
    - ``siamese``: :class:`SiameseEmbedder`, trainable (the TraVeLGAN baseline);
    - ``toy``: ``reference.toy_encoder.build_toy_encoder``, a small frozen encoder that needs no weights.

    All but ``siamese`` come back frozen (no parameter requires grad) and in eval mode.
    """
    if config.encoder_mode == "siamese":
        return SiameseEmbedder(config.size, width=config.siamese_width, dim=config.siamese_dim)
    if config.encoder_mode == "toy":
        from reference.toy_encoder import build_toy_encoder  # noqa: PLC0415

        return _frozen(build_toy_encoder(config.size, seed=config.seed))
    from travel_loss.encoder import FrozenCLIPEncoder  # noqa: PLC0415  (imports transformers)

    options = dict(crop=config.crop, features=config.features, check_range=False)  # no host sync per call
    if config.encoder_mode == "clip":
        return _frozen(FrozenCLIPEncoder(config.encoder, **options))
    from transformers import CLIPVisionConfig  # noqa: PLC0415

    try:
        vision_config = CLIPVisionConfig.from_pretrained(config.encoder, local_files_only=True)
    except OSError as error:
        if config.encoder != PAPER_ENCODER:
            raise SetupError(f"encoder: cannot read a CLIP config from {config.encoder!r}: {error}") from error
        vision_config = CLIPVisionConfig(**VIT_L14_VISION)
    return _frozen(FrozenCLIPEncoder.from_config(vision_config, seed=config.seed, **options))


def _linear_decay(total_steps: int, decay_steps: int):
    """Learning-rate factor: 1 for the first total - decay steps, then linearly down to 0."""

    def factor(step: int) -> float:
        if decay_steps == 0:
            return 1.0
        return min(1.0, (total_steps - step) / decay_steps)

    return factor


# =============================================================================================
# 5. Data: an endless, seeded stream of batches per domain, the same for any number of workers
# =============================================================================================


class StreamBatches:
    """Batches of (index, flip) for one domain and one rank, as a DataLoader ``batch_sampler``.

    The domain's images form one endless stream: epoch e is a permutation of the dataset drawn
    from (seed, domain, e), each item with a flip bit from the same generator. Global batch t is
    stream positions [t B W, (t + 1) B W) for per-rank batch B and world size W; rank r takes
    [t B W + r B, t B W + (r + 1) B) (the ``DistributedSampler`` split, without dropping data at
    epoch ends). Batch t depends on nothing but (seed, domain, t), so a run resumed at
    ``start = t B W`` sees exactly the batches the uninterrupted run saw, with any workers.
    """

    def __init__(
        self, length: int, batch_size: int, *, seed: int, domain: int, rank: int = 0, world_size: int = 1,
        start: int = 0, flip: bool = False,
    ) -> None:  # fmt: skip
        self.length, self.batch_size, self.seed, self.domain = length, batch_size, seed, domain
        self.rank, self.world_size, self.start, self.flip = rank, world_size, start, flip
        self._epoch_cache: tuple[int, list[int], list[bool]] | None = None

    def _epoch(self, epoch: int) -> tuple[list[int], list[bool]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            seed = int(np.random.SeedSequence([self.seed, self.domain, epoch]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(self.length, generator=generator).tolist()
            flips = (torch.rand(self.length, generator=generator) < 0.5).tolist()
            self._epoch_cache = (epoch, order, flips)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _item(self, position: int) -> tuple[int, bool]:
        epoch, offset = divmod(position, self.length)
        order, flips = self._epoch(epoch)
        return order[offset], self.flip and flips[offset]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self._item(position + k) for k in range(self.batch_size)]
            position += self.batch_size * self.world_size


class _FlippedImages(Dataset):
    """``dataset[(index, flip)]`` -> the image (3, H, W) of ``images[index]``, mirrored if ``flip``."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, bool]) -> Tensor:
        index, flip = item
        image = self.images[index]
        if isinstance(image, (tuple, list)):  # ToyStreets items are (image, labels)
            image = image[0]
        return image.flip(-1) if flip else image


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The two training sets, A and B, of (3, size, size) images in [-1, 1]."""
    if config.toy_streets:
        return (
            ToyStreets("A", size=config.size, length=config.toy_length, seed=config.toy_seed),
            ToyStreets("B", size=config.size, length=config.toy_length, seed=config.toy_seed),
        )
    folder_a, folder_b = resolve_unpaired_folders(config.data, config.data_a, config.data_b, split="train")
    return ImageFolder(folder_a, size=config.size), ImageFolder(folder_b, size=config.size)


def _batches(images: Dataset, config: TrainConfig, runtime: Runtime, domain: int, start: int) -> Iterator[Tensor]:
    workers = config.num_workers
    if workers is None:
        workers = 0 if config.toy_streets else min(4, os.cpu_count() or 1)
    sampler = StreamBatches(
        len(images), config.batch_size, seed=config.seed, domain=domain, rank=runtime.rank,  # type: ignore[arg-type]
        world_size=runtime.world_size, start=start, flip=config.flip,
    )  # fmt: skip
    loader = DataLoader(
        _FlippedImages(images), batch_sampler=sampler, num_workers=workers,
        pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.seed),  # worker seeds; leaves the global RNG alone
    )  # fmt: skip
    return iter(loader)


# =============================================================================================
# 6. Logging and sample grids
# =============================================================================================


def _to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def save_image_grid(columns: Sequence[Tensor], path: str | os.PathLike[str], padding: int = 2) -> Path:
    """Write a PNG whose row i shows ``columns[0][i] | columns[1][i] | ...`` (e.g. input | translation).

    Every column is (N, 3, H, W) in [-1, 1] with the same N, H, W; cells are separated by
    ``padding`` white pixels.
    """
    from PIL import Image  # noqa: PLC0415

    if not columns or any(c.shape != columns[0].shape or c.dim() != 4 or c.shape[1] != 3 for c in columns):
        raise ValueError(f"columns: expected equally shaped (N, 3, H, W) tensors, got {[tuple(c.shape) for c in columns]}")
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

    On resume the lines of steps after the checkpoint (written before a crash) are dropped.
    """

    def __init__(self, out: Path, resume_step: int) -> None:
        self.path = out / "metrics.jsonl"
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

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


# =============================================================================================
# 7. Training
# =============================================================================================


def _checkpoint_state(
    config: TrainConfig, step: int, runtime: Runtime, modules: dict[str, nn.Module], optimizers: dict[str, Any],
    schedulers: dict[str, Any], scalers: dict[str, Any], adaptive: Any,
) -> dict[str, Any] | None:  # fmt: skip
    """Everything a bit-exact resume needs; collective under DDP (RNG states of all ranks), None off rank 0."""
    rng = capture_rng_state(runtime.device if runtime.device.type == "cuda" else None)
    if runtime.xla is not None:
        rng["xla"] = int(runtime.xla.get_rng_state())
    rng_states = [rng]
    if runtime.distributed:
        rng_states = [None] * runtime.world_size
        dist.all_gather_object(rng_states, rng, group=runtime.control_group)
    if not runtime.is_main:
        return None
    generator = modules["generator"]
    return {
        "format": 1,
        "step": step,
        "config": asdict(config),
        "generator_kwargs": dict(
            in_channels=generator.in_channels, out_channels=generator.out_channels,
            width=generator.width, n_blocks=generator.n_blocks,
        ),  # fmt: skip
        "discriminator_kwargs": dict(in_channels=3, width=config.d_width, n_layers=config.d_layers),
        **{name: module.state_dict() for name, module in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "grad_scalers": {name: scaler.state_dict() for name, scaler in scalers.items()},
        "adaptive_lambda": None if adaptive is None else adaptive.state_dict(),
        "rng": rng_states,
        "data": {"position": step * config.batch_size * runtime.world_size, "world_size": runtime.world_size},
    }


_RESUME_FREE_FIELDS = {
    "out", "resume", "steps", "log_every", "sample_every", "sample_count", "checkpoint_every",
    "keep_checkpoints", "num_workers", "device", "compile", "compile_backend", "channels_last",
}  # fmt: skip


def train(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train G (and D) for ``config.steps`` iterations; returns a summary.

    Summary keys: ``step`` (reached), ``seconds`` (of this call's loop), ``images_per_second``
    (source images translated per second, all ranks), ``out``, ``rank``, ``checkpoint`` (path of
    latest.pt), ``interrupted`` (the signal name, or None), ``metrics`` (the last logged record),
    ``compiled_graphs`` (with ``compile``: graphs compiled after the first step and at the end;
    equal means no recompilation).
    """
    check_config(config)
    runtime = setup_runtime(config)
    try:
        return _train(config, runtime, progress=progress)
    finally:
        if runtime.owns_process_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, runtime: Runtime, *, progress: bool) -> dict[str, Any]:
    device = runtime.device
    out = Path(config.out)
    latest = out / LATEST
    if latest.exists() and not config.resume:
        raise ValueError(f"out: {out} already holds a checkpoint ({LATEST}); pass resume=True (--resume) or choose another folder")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    say = print if runtime.is_main and progress else (lambda *a, **k: None)

    # ---- models, encoder, optimizers: the same initial weights on every rank
    _seed_everything(config.seed)
    generator = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.generator_blocks).to(device)
    discriminator = PatchDiscriminator(3, width=config.d_width, n_layers=config.d_layers).to(device)
    encoder = build_encoder(config).to(device)
    trainable_encoder = config.encoder_mode == "siamese"
    if config.channels_last:
        for module in (generator, discriminator, encoder):
            module.to(memory_format=torch.channels_last)
    betas = (config.beta1, config.beta2)
    optimizers = {
        "generator": torch.optim.Adam(generator.parameters(), lr=config.lr, betas=betas),
        "discriminator": torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_lr, betas=betas),
    }
    modules: dict[str, nn.Module] = {"generator": generator, "discriminator": discriminator}
    if trainable_encoder:
        optimizers["siamese"] = torch.optim.Adam(encoder.parameters(), lr=config.lr, betas=betas)
        modules["siamese"] = encoder
    if config.travel_queue:
        queue = TravelQueue(config.travel_queue, distance=config.travel_distance, reduction=config.travel_reduction)
        modules["travel_queue"] = queue.to(device)
    decay = _linear_decay(config.steps, config.decay_steps)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, decay) for name, opt in optimizers.items()}
    fp16 = config.amp == "fp16"
    scalers = {name: torch.amp.GradScaler("cuda", enabled=fp16) for name in ("generator", "discriminator")}
    adaptive = None
    if config.lambda_travel == "auto":
        from reference.adaptive_lambda import GradientBalancedLambda, last_layer_weight  # noqa: PLC0415

        adaptive = GradientBalancedLambda(
            last_layer_weight(generator), momentum=config.lambda_auto_momentum, scale=config.lambda_auto_scale
        )
    _seed_everything(_rank_seed(config.seed, runtime.rank))

    # ---- resume: weights, optimizer moments, schedules, scalers, RNG states, data position
    start_step = 0
    if config.resume and latest.exists():
        checkpoint = load_checkpoint(latest)
        changed = sorted(k for k, v in checkpoint["config"].items() if k not in _RESUME_FREE_FIELDS and asdict(config).get(k) != v)
        if changed:
            warnings.warn(f"resuming {latest} with changed settings {changed}: the run will differ from an uninterrupted one")
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
        rng_states = checkpoint["rng"]
        if len(rng_states) == runtime.world_size:
            restore_rng_state(rng_states[runtime.rank], device if device.type == "cuda" else None)
            if runtime.xla is not None and "xla" in rng_states[runtime.rank]:
                runtime.xla.set_rng_state(rng_states[runtime.rank]["xla"])
        else:
            warnings.warn(f"resuming {len(rng_states)} ranks' run on {runtime.world_size}: random streams restart")
        start_step = int(checkpoint["step"])
        data_position = int(checkpoint["data"]["position"])
        say(f"resumed {latest} at step {start_step}")
        del checkpoint
    else:
        data_position = 0
        if config.resume:
            say(f"no {latest} yet: starting a new run")

    # ---- the views that train: DDP wrappers (gradient averaging), torch.compile
    g_train, d_train, e_train, d_for_g = generator, discriminator, encoder, discriminator
    if runtime.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        g_train = DistributedDataParallel(generator, device_ids=device_ids)
        d_train = DistributedDataParallel(discriminator, device_ids=device_ids)
        if trainable_encoder:
            e_train = DistributedDataParallel(encoder, device_ids=device_ids)
    if config.compile:
        g_train, d_train, e_train, d_for_g = _compile([g_train, d_train, e_train, d_for_g], config.compile_backend)

    # ---- data
    images_a, images_b = build_datasets(config)
    batches_a = _batches(images_a, config, runtime, domain=0, start=data_position)
    batches_b = _batches(images_b, config, runtime, domain=1, start=data_position)
    sample_inputs = torch.stack([_FlippedImages(images_a)[(i, False)] for i in range(min(config.sample_count, len(images_a)))])

    # ---- the loop
    options = StepOptions.from_config(config, device.type)
    log = MetricsLog(out, start_step) if runtime.is_main else None
    images_per_step = config.batch_size * runtime.world_size
    running: dict[str, Any] = {}
    record: dict[str, float] = {}
    compiled_graphs: dict[str, int] = {}
    last_saved = start_step
    step = start_step
    bar = _progress_bar(start_step, config.steps, enabled=progress and runtime.is_main)
    started = interval_started = time.perf_counter()
    interval_start_step = start_step

    def save(step: int) -> None:
        state = _checkpoint_state(config, step, runtime, modules, optimizers, schedulers, scalers, adaptive)
        if state is not None:
            writer = (lambda obj, path: runtime.xla.save(obj, path)) if runtime.xla is not None else torch.save
            save_checkpoint(state, out, step, keep=config.keep_checkpoints, save=writer)

    interrupted = None
    with StopSignal(runtime) as stop:
        for step in range(start_step + 1, config.steps + 1):
            real_a = next(batches_a).to(device, non_blocking=True)
            real_b = next(batches_b).to(device, non_blocking=True)
            if config.channels_last:
                real_a, real_b = (t.contiguous(memory_format=torch.channels_last) for t in (real_a, real_b))
            g_out = generator_step(
                g_train, d_for_g, e_train, optimizers["generator"], real_a, options, scaler=scalers["generator"],
                encoder_optimizer=optimizers.get("siamese"), adaptive_lambda=adaptive,
                travel_queue=modules.get("travel_queue"),
            )  # fmt: skip
            d_out = discriminator_step(d_train, optimizers["discriminator"], real_b, g_out.pop("fake"), options, scaler=scalers["discriminator"])
            for sched in schedulers.values():
                sched.step()
            if runtime.xla is not None:
                runtime.xla.mark_step()
            for key, value in {**g_out, **d_out}.items():  # running sums, no host sync
                running[key] = running.get(key, 0.0) + value
            if config.compile and step == start_step + 1:
                compiled_graphs["after_first_step"] = _compiled_graph_count()

            if step % config.log_every == 0 or step == config.steps:
                record = _log_record(step, running, step - interval_start_step, runtime, optimizers)
                record["images_per_second"] = images_per_step * (step - interval_start_step) / (time.perf_counter() - interval_started)
                running, interval_started, interval_start_step = {}, time.perf_counter(), step
                if log is not None:
                    log.write(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss_g", "loss_d", "loss_travel", "images_per_second")})
            if runtime.is_main and (step % config.sample_every == 0 or step == config.steps):
                _write_samples(generator, sample_inputs, out / "samples" / f"step_{step:06d}.png", options, config.channels_last)
            if step % config.checkpoint_every == 0:
                save(step)
                last_saved = step
            bar.update(1)
            if step < config.steps and stop.should_stop():
                interrupted = stop.received or "signal on another rank"
                say(f"\n{interrupted}: saving a checkpoint at step {step} and exiting")
                break
    bar.close()
    seconds = time.perf_counter() - started
    if last_saved != step:
        save(step)
    if log is not None:
        log.close()
    if config.compile:
        compiled_graphs["end"] = _compiled_graph_count()
        if compiled_graphs.get("end") != compiled_graphs.get("after_first_step"):
            warnings.warn(f"torch.compile recompiled after the first step: {compiled_graphs}")
    if runtime.distributed:
        dist.barrier(group=runtime.control_group)  # latest.pt is complete before any rank reads it
    done = step - start_step
    return {
        "step": step,
        "seconds": seconds,
        "images_per_second": images_per_step * done / seconds if done else 0.0,
        "out": str(out),
        "rank": runtime.rank,
        "checkpoint": str(latest),
        "interrupted": interrupted,
        "metrics": record,
        "compiled_graphs": compiled_graphs or None,
    }


def _compile(modules: list[nn.Module], backend: str) -> list[nn.Module]:
    import torch._dynamo  # noqa: PLC0415

    if not torch._dynamo.is_dynamo_supported():
        raise SetupError(f"--compile: torch.compile is not supported here (Python {sys.version.split()[0]}, torch {torch.__version__}); run without --compile")
    compiled: dict[int, nn.Module] = {}
    for module in modules:
        if id(module) not in compiled:
            compiled[id(module)] = torch.compile(module, backend=backend)
    return [compiled[id(module)] for module in modules]


def _compiled_graph_count() -> int:
    from torch._dynamo.utils import counters  # noqa: PLC0415

    return int(counters["stats"]["unique_graphs"])


def _log_record(step: int, running: dict[str, Any], count: int, runtime: Runtime, optimizers: dict[str, Any]) -> dict[str, float]:
    """Mean of each running sum over the interval (averaged over ranks): the one host sync of a log step."""
    keys = sorted(running)
    values = torch.stack([torch.as_tensor(running[k], dtype=torch.float32, device=runtime.device) for k in keys]) / max(count, 1)
    if runtime.distributed:
        values = values.cpu()
        dist.all_reduce(values, group=runtime.control_group)
        values = values / runtime.world_size
    record = {"step": step, **dict(zip(keys, values.tolist()))}
    record["lr"] = optimizers["generator"].param_groups[0]["lr"]
    return record


@torch.no_grad()
def _write_samples(generator: nn.Module, inputs: Tensor, path: Path, options: StepOptions, channels_last: bool) -> None:
    device = next(generator.parameters()).device
    batch = inputs.to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with options.autocast():
        translated = generator(batch)
    save_image_grid([inputs, translated.float().cpu()], path)


class _NoBar:
    def set_postfix(self, *a: object, **k: object) -> None: ...
    def update(self, *a: object) -> None: ...
    def close(self) -> None: ...


def _progress_bar(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


# =============================================================================================
# 8. Command line
# =============================================================================================


def _lambda_value(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field of a dataclass, as command-line help (empty if no source)."""
    import inspect  # noqa: PLC0415
    import re  # noqa: PLC0415

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+):[^=]+=[^#]*#\s*(.+)$")
    return {match[1]: match[2].strip() for match in map(pattern.match, source.splitlines()) if match}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field (``--g-width`` for g_width), plus --demo and --quick."""
    parser = argparse.ArgumentParser(
        prog="reference/train.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    defaults = TrainConfig()
    special: dict[str, dict[str, Any]] = {
        "lambda_travel": dict(type=_lambda_value, metavar="FLOAT|auto"),
        "lambda_auto_scale": dict(type=float),
        "lambda_auto_momentum": dict(type=float),
        "travel_objective": dict(choices=TRAVEL_OBJECTIVES),
        "travel_distance": dict(choices=("cosine", "squared_euclidean", "travelgan")),
        "travel_reduction": dict(choices=("mean", "sum")),
        "gan_loss": dict(choices=GAN_LOSSES),
        "augment": dict(nargs="?", const="color,translation,cutout", metavar="POLICY"),
        "encoder_mode": dict(choices=ENCODER_MODES),
        "crop": dict(choices=("center", "resize", "full")),
        "features": dict(choices=("pooled", "projected")),
        "device": dict(choices=DEVICES),
        "amp": dict(choices=AMP_MODES),
    }
    comments = _field_comments(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        text = comments.get(item.name, "").replace("%", "%%")
        if item.name in special:
            parser.add_argument(flag, default=default, help=text, **special[item.name])
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif item.type in ("int", "int | None"):
            parser.add_argument(flag, type=int, default=default, help=text)
        elif item.type in ("float", "float | None"):
            parser.add_argument(flag, type=float, default=default, help=text)
        else:
            parser.add_argument(flag, default=default, help=text)
    parser.add_argument("--demo", action="store_true", help="run the toy-street study (reference.demo) into --out")
    parser.add_argument("--quick", action="store_true", help="with --demo: a shorter study")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    demo, quick = args.pop("demo"), args.pop("quick")
    config = TrainConfig(**args)
    if demo:
        from reference.demo import run_demo  # noqa: PLC0415

        run_demo(config.out, seed=config.seed, quick=quick)
        return 0
    try:
        check_config(config)
    except ValueError as error:
        parser.error(str(error))
    try:
        summary = train(config)
    except SetupError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if summary["rank"] != 0:
        return 0
    if summary["interrupted"]:
        print(f"stopped by {summary['interrupted']} at step {summary['step']}; continue with --resume --out {summary['out']}")
    else:
        print(f"done: {summary['step']} steps, {summary['images_per_second']:.1f} images/s; checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
