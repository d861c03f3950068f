r"""Train CLIPTraVeLGAN: one generator, one discriminator, a frozen CLIP encoder, one loop.

Unpaired translation A -> B. Every iteration draws a batch x from A and a batch y from B and
makes two updates:

    generator      L_G = L_adv(D(aug(G(x)))) + lambda * L_travel(E(x), E(G(x)))   (E(x) without grad)
    discriminator  L_D = L_adv^D(D(aug(y)), D(aug(G(x))))                          (G(x) detached)

where ``L_travel`` compares the transformation vectors E(x_i) - E(x_j) with
E(G(x_i)) - E(G(x_j)) over all ordered pairs of the (global) batch (``travel_loss``) and ``aug``
is an optional differentiable augmentation (``reference.losses.diff_augment``). Adam with betas
(0.5, 0.999) for both networks, the discriminator at twice the generator's learning rate.

``--lambda-cycle L`` > 0 adds CycleGAN's second generator G_BA and discriminator D_A and its
cycle-consistency and identity terms (``reference.steps.generator_step``), for the CycleGAN
baseline; ``--lambda-nce L`` > 0 adds CUT's patchwise contrastive term on G's own encoder
features and trains its MLP heads with G (``reference.patchnce``), for the CUT baseline;
``--g-ema d`` keeps an exponential moving average of G's weights (checkpoint key
``generator_ema``), which the sample grids and ``reference.translate.load_generator`` then use.

Usage::

    python reference/train.py --data datasets/gta2cityscapes --out runs/gta      # trainA/, trainB/
    python reference/train.py --data-a photos/ --data-b paintings/ --size 128 --out runs/p2m
    torchrun --nproc_per_node 4 reference/train.py --data ... --batch-size 32   # 4 x 32 = 128 pairs set
    python reference/train.py --data ... --batch-size 128 --micro-batch 16   # batch 128 in 16's activation memory
    python reference/train.py --data ... --lambda-travel 0 --lambda-cycle 10      # the CycleGAN baseline
    python reference/train.py --data ... --lambda-travel 0 --lambda-nce 1         # the CUT baseline
    python reference/train.py --data ... --lambda-travel 0 --lambda-nce 10 --no-nce-idt   # FastCUT
    python reference/train.py --data ... --g-ema 0.999              # samples and translate.py use the EMA of G
    python reference/train.py --resume --out runs/gta                             # continue latest.pt
    python reference/train.py --demo --out runs/demo              # the digit study (reference.studies)

The file reads top to bottom: the encoder, the data, the training loop, the command line. Its
parts live in their own modules of ``reference``: the two update steps (``steps``), the options
and their checks (``config``), devices, process group, seeds and signals (``runtime``), the batch stream
(``stream``), metrics and sample grids (``logs``), checkpoint files and the resumable training
state (``checkpoint``), the networks (``models``) and the GAN losses (``losses``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

if __package__ in (None, ""):  # run as a script: make `reference` and `travel_loss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from reference.checkpoint import (
    LATEST,
    finite_parts,
    load_checkpoint,
    remove_stale_temporaries,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from reference.config import (
    ADAPTIVE_LAMBDAS,
    AMP_MODES,
    DEVICES,
    ENCODER_MODES,
    PAPER_ENCODER,
    TRAVEL_OBJECTIVES,
    TrainConfig,
    check_config,
    uses_encoder,
)
from reference.data import ImageFolder, TooManyUnreadableImagesError, resolve_unpaired_folders
from reference.logs import LogInterval, TrainingDivergedError, divergence_message, save_image_grid, write_samples
from reference.losses import GAN_LOSSES
from reference.models import DISCRIMINATOR_NORMS, PatchDiscriminator, ResnetGenerator, SiameseEmbedder
from reference.outputs import RunFolderBusyError, RunFolderLock, error_line
from reference.patchnce import PatchHeads
from reference.presets import PRESETS, preset_config, preset_data
from reference.runtime import (
    RunInputError,
    Runtime,
    SetupError,
    StopSignal,
    check_datasets,
    check_encoder_input_size,
    check_encoder_name,
    check_run_inputs,
    compile_modules,
    compiled_graph_count,
    rank_seed,
    seed_everything,
    setup_runtime,
    sync_xla,
)
from reference.steps import PatchNCE, ReverseDirection, StepOptions, discriminator_step, generator_step, update_ema
from reference.stream import FlippedImages, stream_loader
from reference.studies import DEFAULT_STUDY, STUDIES, run_study
from travel_loss import DiscriminatorGapLambda, GradientBalancedLambda, TravelQueue
from travel_loss.loss import Distance, Reduction

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


# =============================================================================================
# 1. The encoder E and the learning-rate schedule
# =============================================================================================


# The shape of CLIP ViT-L/14's vision tower, for the random-weights ablation without a download.
VIT_L14_VISION: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_encoder(config: TrainConfig) -> nn.Module:
    """The embedder E of the travel loss for ``config.encoder_mode``.

    - ``clip``: ``FrozenCLIPEncoder(config.encoder_name)``, pretrained weights by hub id or folder
      (the paper's ViT-L/14 when ``config.encoder`` is None);
    - ``random-clip``: the same architecture with random weights (the paper's ablation), from
      the checkpoint's config when ``config.encoder`` names one, else ViT-L/14's shape;
    - ``siamese``: :class:`SiameseEmbedder`, trainable (the TraVeLGAN baseline);
    - ``module``: your own embedder, built by the factory that ``config.encoder`` names
      (``FILE.py:FACTORY`` or ``package.module:FACTORY``; ``reference.user_embedder``), frozen
      and checked with ``travel_loss.testing.check_embedder`` before the first step.

    All but ``siamese`` come back frozen (no parameter requires grad) and in eval mode.
    """
    if config.encoder_mode == "siamese":
        return SiameseEmbedder(config.size, width=config.siamese_width, dim=config.siamese_dim)
    if config.encoder_mode == "module":
        from reference.user_embedder import EmbedderSpecError, build_user_embedder

        try:
            return build_user_embedder(config.encoder_name, config.size)
        except EmbedderSpecError as error:
            raise SetupError(str(error)) from error
    from travel_loss.encoder import FrozenCLIPEncoder

    # check_range=False: no host sync per call
    options: dict[str, Any] = dict(crop=config.crop, features=config.features, check_range=False)
    if config.encoder_mode == "clip":
        try:
            return _frozen(FrozenCLIPEncoder(config.encoder_name, **options))
        except (OSError, ValueError) as error:  # not cached and offline, not a CLIP checkpoint, damaged files
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SetupError(
                f"--encoder: cannot load a CLIP checkpoint from {config.encoder_name!r}: {first}; "
                "pass a local folder written by save_pretrained (offline: HF_HUB_OFFLINE=1 uses the cache only)"
            ) from error
    from transformers import CLIPVisionConfig

    try:
        vision_config = CLIPVisionConfig.from_pretrained(config.encoder_name, local_files_only=True)
    except OSError as error:
        if config.encoder_name != PAPER_ENCODER:
            raise SetupError(f"encoder: cannot read a CLIP config from {config.encoder_name!r}: {error}") from error
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
# 2. Data: an endless, seeded stream of batches per domain (reference.stream)
# =============================================================================================


def build_datasets(config: TrainConfig) -> tuple[ImageFolder, ImageFolder]:
    """The two training sets, A and B, of (3, size, size) images in [-1, 1]."""
    folder_a, folder_b = resolve_unpaired_folders(config.data, config.data_a, config.data_b, split="train")
    flag_a, flag_b = ("--data", "--data") if config.data is not None else ("--data-a", "--data-b")
    datasets = []
    for flag, folder in ((flag_a, folder_a), (flag_b, folder_b)):
        try:
            datasets.append(ImageFolder(folder, size=config.size))
        except (OSError, ValueError) as error:  # a folder without a usable image
            raise RunInputError(f"{flag}: {error}") from error
    return datasets[0], datasets[1]


def _batches(images: Dataset, config: TrainConfig, runtime: Runtime, domain: int, start: int) -> Iterator[Tensor]:
    workers = config.num_workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    return stream_loader(
        images, config.batch_size, seed=config.seed, domain=domain, rank=runtime.rank, world_size=runtime.world_size,
        start=start, flip=config.flip, num_workers=workers, pin_memory=runtime.device.type == "cuda",
    )  # fmt: skip


# =============================================================================================
# 3. Training
# =============================================================================================


_RESUME_FREE_FIELDS = {
    "out", "resume", "steps", "log_every", "sample_every", "sample_count", "checkpoint_every",
    "keep_checkpoints", "num_workers", "device", "compile", "compile_backend", "channels_last",
    "resume_from", "max_unreadable_fraction",
}  # fmt: skip


class TrainSummary(TypedDict):
    """What :func:`train` returns; the keys are described there."""

    step: int
    seconds: float
    images_per_second: float
    out: str
    rank: int
    checkpoint: str
    interrupted: str | None
    metrics: dict[str, float]
    compiled_graphs: dict[str, int] | None
    unreadable_images: int


def train(config: TrainConfig, *, progress: bool = True) -> TrainSummary:
    """Train G (and D) for ``config.steps`` iterations; returns a summary.

    Summary keys: ``step`` (reached), ``seconds`` (of this call's loop), ``images_per_second``
    (source images translated per second, all ranks), ``out``, ``rank``, ``checkpoint`` (path of
    latest.pt), ``interrupted`` (the signal name, or None), ``metrics`` (the last logged record),
    ``compiled_graphs`` (with ``compile``: graphs compiled after the first step and at the end;
    equal means no recompilation), ``unreadable_images`` (image files that failed to decode and
    were skipped; also in every metrics.jsonl line of a run on image folders).

    The run owns ``config.out`` (:class:`reference.outputs.RunFolderLock`): a second run on the
    same folder raises :class:`reference.outputs.RunFolderBusyError` at once. Mistakes in the
    inputs raise :class:`reference.runtime.RunInputError` before any work; a damaged checkpoint
    raises :class:`reference.checkpoint.DamagedCheckpointError`, which lists the step files that
    ``resume_from`` can take. When more than ``max_unreadable_fraction`` of the image files
    fail to decode, the run saves a checkpoint at the last finished step and raises
    :class:`reference.data.TooManyUnreadableImagesError`.

    Divergence: every logged loss is checked for NaN and inf on the device (no host sync per
    step; read at each logging step), and the losses, weights and optimizer state before every
    checkpoint (:class:`reference.logs.LogInterval`; under DDP all ranks agree). A failed check
    stops the run without writing a checkpoint (the last finite one and its ``step_*.pt`` stay
    as they were) and raises :class:`reference.logs.TrainingDivergedError`, whose one-line
    message names the step window, the terms and what to try.

    E is built only when a term needs it or one is named (:func:`reference.config.uses_encoder`):
    a baseline at ``lambda_travel`` 0 without ``encoder`` trains without one and logs no
    travel consistency.
    """
    check_config(config)
    check_run_inputs(config)
    runtime = setup_runtime(config.device, config.amp)
    if uses_encoder(config) and config.encoder_mode in ("clip", "random-clip"):  # a mistyped folder, no hub: at once
        check_encoder_name(config.encoder_name, weights_needed=config.encoder_mode == "clip")
    lock = RunFolderLock(config.out) if runtime.is_main else None  # a second run on --out stops here
    new_folder = not Path(config.out).exists()
    try:
        if lock is not None:
            lock.acquire()
            remove_stale_temporaries(config.out)  # left by a writer killed mid-checkpoint
        return _train(config, runtime, progress=progress)
    finally:
        if lock is not None:
            left_nothing = new_folder and [p.name for p in Path(config.out).iterdir()] == [lock.path.name]
            if left_nothing:  # a run that stopped before any output leaves no trace in a new --out
                lock.path.unlink()  # while still held: a run starting now makes a lock file of its own
            lock.release()
            if left_nothing:
                with contextlib.suppress(OSError):  # not empty: another run has started there
                    Path(config.out).rmdir()
        if runtime.owns_process_group:
            # The DDP wrappers hold the process group in reference cycles; left to the interpreter's
            # shutdown, its teardown races gloo's threads (an abort at exit on CPU).
            gc.collect()
            dist.destroy_process_group()


@dataclass
class TrainingRun:
    """What a run holds, built once by :func:`build_run`: the checkpointed state by name (modules,
    optimizers, schedulers, grad scalers, the adaptive lambda), the views that train (DDP-wrapped
    or compiled), the CycleGAN and PatchNCE pieces, the step options and where the run starts."""

    config: TrainConfig
    runtime: Runtime
    modules: dict[str, nn.Module]  # generator, discriminator (+ siamese, generator_ba, ..., generator_ema)
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    scalers: dict[str, torch.amp.GradScaler]
    adaptive: GradientBalancedLambda | DiscriminatorGapLambda | None
    ema: nn.Module | None
    g_train: nn.Module  # the views that train: DDP wrappers, torch.compile
    d_train: nn.Module
    e_train: nn.Module | None  # None: no term needs the encoder (reference.config.uses_encoder)
    d_for_g: nn.Module
    da_train: nn.Module | None
    reverse: ReverseDirection | None  # CycleGAN's B -> A half
    patch_nce: PatchNCE | None
    needs_b: bool  # the generator step takes the B batch too
    options: StepOptions
    start_step: int
    data_position: int
    adaptive_structure: GradientBalancedLambda | None = None  # the structure term's, with --lambda-structure auto

    def step(self, real_a: Tensor, real_b: Tensor) -> dict[str, Tensor]:
        """One iteration: G's update (and the EMA), D's (and D_A's), the schedules; the logged terms."""
        queue = self.modules.get("travel_queue")
        assert queue is None or isinstance(queue, TravelQueue)  # build_run stores a TravelQueue under this name
        g_out = generator_step(
            self.g_train, self.d_for_g, self.e_train, self.optimizers["generator"], real_a, self.options,
            scaler=self.scalers["generator"], encoder_optimizer=self.optimizers.get("siamese"),
            adaptive_lambda=self.adaptive, travel_queue=queue, reverse=self.reverse,
            real_b=real_b if self.needs_b else None, patch_nce=self.patch_nce,
            adaptive_structure=self.adaptive_structure,
        )  # fmt: skip
        if self.ema is not None:
            update_ema(self.ema, self.modules["generator"], self.config.g_ema)
        fake_a = g_out.pop("fake_a", None)
        d_out = discriminator_step(
            self.d_train, self.optimizers["discriminator"], real_b, g_out.pop("fake"), self.options,
            scaler=self.scalers["discriminator"],
        )  # fmt: skip
        if isinstance(self.adaptive, DiscriminatorGapLambda):  # lambda follows D's verdict on this batch
            self.adaptive.observe(d_out["d_gap"])
        if fake_a is not None and self.da_train is not None:  # D_A on (a, G_BA(b)), after D_B (random draws in order)
            d_a = discriminator_step(
                self.da_train, self.optimizers["discriminator_a"], real_a, fake_a, self.options,
                scaler=self.scalers["discriminator_a"],
            )  # fmt: skip
            d_out.update({f"{key}_a": value for key, value in d_a.items()})
        for scheduler in self.schedulers.values():
            scheduler.step()
        if self.runtime.xla is not None:
            sync_xla(self.runtime.xla)
        return {**g_out, **d_out}

    def save_samples(self, step: int, inputs: Tensor) -> None:
        """OUT/samples/step_S.png: the ``input | translation`` grid of ``inputs`` (G's EMA when kept), labelled."""
        sampler = self.modules["generator"] if self.ema is None else self.ema
        path = Path(self.config.out) / "samples" / f"step_{step:06d}.png"
        title = f"step {step} of {self.config.steps}" + (f", EMA {self.config.g_ema:g}" if self.ema is not None else "")
        write_samples(sampler, inputs, path, self.options.autocast, self.config.channels_last, title)

    def finite_parts(self) -> dict[str, bool]:
        """Whether each module's and optimizer's state is finite, by name (checked before every save)."""
        return finite_parts(self.modules, self.optimizers)

    def save(self, step: int) -> None:
        """The atomic checkpoint of everything above at ``step`` (rank 0 writes)."""
        state = training_state(
            asdict(self.config), step, self.runtime, self.modules, self.optimizers, self.schedulers, self.scalers,
            self.adaptive, self.adaptive_structure,
        )  # fmt: skip
        if state is not None:
            xla = self.runtime.xla
            writer = (lambda obj, path: xla.save(obj, path)) if xla is not None else torch.save
            save_checkpoint(state, Path(self.config.out), step, keep=self.config.keep_checkpoints, save=writer)


def build_run(
    config: TrainConfig, runtime: Runtime, *, resume_path: Path | None, say: Callable[[str], None]
) -> TrainingRun:
    """Models, encoder, optimizers and schedules with the same initial weights on every rank; the
    checkpoint's state when ``resume_path`` is given; then the views that train."""
    device = runtime.device
    # ---- models, encoder, optimizers: the same initial weights on every rank
    seed_everything(config.seed)
    generator = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.generator_blocks).to(device)
    discriminator = PatchDiscriminator(3, width=config.d_width, n_layers=config.d_layers, norm=config.d_norm).to(device)
    encoder = build_encoder(config).to(device) if uses_encoder(config) else None
    if encoder is None:
        say(
            "no encoder: --lambda-travel is 0 and no other term needs one, so travel consistency is not logged "
            "(name one with --encoder to log it)"
        )
    else:
        check_encoder_input_size(encoder, config.size)
        if config.lambda_structure and not getattr(encoder, "gives_tokens", hasattr(encoder, "forward_with_tokens")):
            raise SetupError(
                f"--lambda-structure: the encoder {config.encoder_name!r} gives no spatial tokens; give the module "
                "a tokens(images) -> (N, L, C) or (N, C, H, W) method (reference/user_embedder.py)"
            )
    trainable_encoder = encoder is not None and config.encoder_mode == "siamese"
    if config.channels_last:
        for module in (generator, discriminator, *([encoder] if encoder is not None else [])):
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid, not in torch's overloads
    betas = (config.beta1, config.beta2)
    optimizers: dict[str, torch.optim.Optimizer] = {
        "generator": torch.optim.Adam(generator.parameters(), lr=config.lr, betas=betas),
        "discriminator": torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_lr, betas=betas),
    }
    modules: dict[str, nn.Module] = {"generator": generator, "discriminator": discriminator}
    if encoder is not None and trainable_encoder:
        optimizers["siamese"] = torch.optim.Adam(encoder.parameters(), lr=config.lr, betas=betas)
        modules["siamese"] = encoder
    if config.lambda_cycle:  # CycleGAN's B -> A half: G_BA and D_A, built like G and D
        modules["generator_ba"] = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.generator_blocks)
        modules["discriminator_a"] = PatchDiscriminator(
            3, width=config.d_width, n_layers=config.d_layers, norm=config.d_norm
        )
        for name, lr in (("generator_ba", config.lr), ("discriminator_a", config.discriminator_lr)):
            modules[name].to(device)
            if config.channels_last:
                modules[name].to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # as above
            optimizers[name] = torch.optim.Adam(modules[name].parameters(), lr=lr, betas=betas)
    if config.lambda_nce:  # CUT's MLP heads on G's encoder layers, trained with G's loss at G's learning rate
        heads = PatchHeads(generator.feature_channels(generator.nce_layers), dim=config.nce_dim, seed=config.seed)
        modules["nce_heads"] = heads.to(device)
        optimizers["nce_heads"] = torch.optim.Adam(heads.parameters(), lr=config.lr, betas=betas)
    ema = None
    if config.g_ema:
        ema = modules["generator_ema"] = copy.deepcopy(generator).requires_grad_(False)
    if config.travel_queue:
        distance = cast(Distance, config.travel_distance)  # one of its values: check_config
        queue = TravelQueue(config.travel_queue, distance=distance, reduction=cast(Reduction, config.travel_reduction))
        modules["travel_queue"] = queue.to(device)
    decay = _linear_decay(config.steps, config.decay_steps)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, decay) for name, opt in optimizers.items()}
    fp16 = config.amp == "fp16"
    scaled = ("generator", "discriminator", *(("discriminator_a",) if config.lambda_cycle else ()))
    scalers = {name: torch.amp.GradScaler("cuda", enabled=fp16) for name in scaled}
    adaptive, adaptive_structure = adaptive_lambdas(config, generator)
    seed_everything(rank_seed(config.seed, runtime.rank))

    # ---- resume: weights, optimizer moments, schedules, scalers, RNG states, data position
    start_step, data_position = 0, 0
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, advice="resume from one of them with --resume-from FILE")
        stored = checkpoint.get("config", {})
        stored = {**stored, "encoder": stored.get("encoder") or PAPER_ENCODER}  # None: the paper's, as before
        current = {**asdict(config), "encoder": config.encoder_name}
        changed = sorted(k for k, v in stored.items() if k not in _RESUME_FREE_FIELDS and current.get(k) != v)
        try:
            start_step, data_position = restore_training_state(
                checkpoint, runtime, modules, optimizers, schedulers, scalers, adaptive, adaptive_structure
            )
        except (KeyError, RuntimeError, ValueError) as error:  # another architecture, or not a training checkpoint
            raise RunInputError(
                f"--resume: {resume_path} does not fit this run (settings that differ: {changed or 'none recorded'}; "
                f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}); "
                f"resume with its settings or use a new --out"
            ) from None
        if changed:
            warnings.warn(
                f"resuming {resume_path} with changed settings {changed}: "
                f"the run will differ from an uninterrupted one",
                stacklevel=2,
            )
        say(f"resumed {resume_path} at step {start_step}")
        del checkpoint

    # ---- the views that train: DDP wrappers (gradient averaging), torch.compile
    g_train: nn.Module = generator  # nn.Module: DDP and torch.compile replace them below
    d_train: nn.Module = discriminator
    d_for_g: nn.Module = discriminator
    e_train = encoder
    ga_train, da_train = modules.get("generator_ba"), modules.get("discriminator_a")  # None without the cycle
    da_for_g = da_train
    nce_train = modules.get("nce_heads")  # None without the PatchNCE term
    if runtime.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        g_train = DistributedDataParallel(generator, device_ids=device_ids)
        d_train = DistributedDataParallel(discriminator, device_ids=device_ids)
        if encoder is not None and trainable_encoder:
            e_train = DistributedDataParallel(encoder, device_ids=device_ids)
        if config.lambda_cycle:
            ga_train = DistributedDataParallel(modules["generator_ba"], device_ids=device_ids)
            da_train = DistributedDataParallel(modules["discriminator_a"], device_ids=device_ids)
        if nce_train is not None:
            nce_train = DistributedDataParallel(nce_train, device_ids=device_ids)
    if config.compile:
        g_train, d_train, d_for_g, *cycle_views = compile_modules(
            [g_train, d_train, d_for_g, *((ga_train, da_train, da_for_g) if config.lambda_cycle else ())],
            config.compile_backend,
        )
        if e_train is not None:
            (e_train,) = compile_modules([e_train], config.compile_backend)
        if cycle_views:
            ga_train, da_train, da_for_g = cycle_views
    reverse = None
    if ga_train is not None and da_for_g is not None:  # with lambda_cycle
        reverse = ReverseDirection(ga_train, da_for_g, optimizers["generator_ba"])
    patch_nce = None if nce_train is None else PatchNCE(nce_train, optimizers["nce_heads"])  # never compiled
    needs_b = reverse is not None or (patch_nce is not None and config.nce_idt)
    return TrainingRun(
        config, runtime, modules, optimizers, schedulers, scalers, adaptive, ema, g_train, d_train, e_train, d_for_g,
        da_train, reverse, patch_nce, needs_b, StepOptions.from_config(config, device.type), start_step, data_position,
        adaptive_structure=adaptive_structure,
    )  # fmt: skip


def _train(config: TrainConfig, runtime: Runtime, *, progress: bool) -> TrainSummary:
    """:func:`train` inside the run folder's lock: checks, data, the run, the loop, the finish."""
    # ---- checks, data, the run
    resume_path = _resume_path(config)  # a new run on a folder that holds a checkpoint stops here
    out = Path(config.out)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    say: Callable[[str], None] = print if runtime.is_main and progress else (lambda *a, **k: None)
    images_a, images_b = build_datasets(config)  # folder mistakes surface before any model is built
    check_datasets(
        {f"domain {d} ({x.folder})": x for d, x in zip("AB", (images_a, images_b))},
        config.batch_size, runtime.world_size,
    )  # fmt: skip
    run = build_run(config, runtime, resume_path=resume_path, say=say)
    if resume_path is None and config.resume:
        say(f"no {out / LATEST} yet: starting a new run")
    batches = _batch_pairs(images_a, images_b, config, runtime, start=run.data_position)
    sample_inputs = torch.stack(
        [FlippedImages(images_a)[(i, False)] for i in range(min(config.sample_count, len(images_a)))]
    )

    # ---- the loop
    metrics = LogInterval(
        config, runtime, run.optimizers, (images_a, images_b), start_step=run.start_step, progress=progress,
        scalers=list(run.scalers.values()),
    )  # fmt: skip
    compiled_graphs: dict[str, int] = {}
    step = last_saved = run.start_step
    lambda_warned = False
    interrupted = None
    started = time.perf_counter()
    with StopSignal(runtime) as stop:
        for step in range(run.start_step + 1, config.steps + 1):
            real_a, real_b = next(batches)
            metrics.add(run.step(real_a, real_b))
            if config.compile and step == run.start_step + 1:
                compiled_graphs["after_first_step"] = compiled_graph_count()
            if step % config.log_every == 0 or step == config.steps:
                metrics.close_interval(step)  # checks the terms first: a diverged interval is not written
                lambda_warned = lambda_warned or warn_if_lambda_gave_way(run.adaptive, step, say)
            if runtime.is_main and (step % config.sample_every == 0 or step == config.steps) and not metrics.diverged:
                run.save_samples(step, sample_inputs)
            if step % config.checkpoint_every == 0 and metrics.finite(step, run.finite_parts()):
                run.save(step)
                last_saved = step
            metrics.bar.update(1)
            if metrics.too_many_unreadable is not None or metrics.diverged is not None:
                break
            if step < config.steps and stop.should_stop():
                interrupted = stop.received or "signal on another rank"
                say(f"\n{interrupted}: saving a checkpoint at step {step} and exiting")
                break
    metrics.bar.close()
    seconds = time.perf_counter() - started

    # ---- finish
    _finish_run(run, metrics, compiled_graphs, step=step, last_saved=last_saved)
    return _summary(run, metrics, compiled_graphs, step=step, seconds=seconds, interrupted=interrupted)


def _resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint the run continues: ``resume_from``, else OUT/latest.pt with ``resume`` when it
    exists; None for a new run. A new run on a folder that holds a checkpoint is a ValueError."""
    latest = Path(config.out) / LATEST
    if config.resume_from is not None:
        return Path(config.resume_from)
    if latest.exists() and not config.resume:
        raise ValueError(
            f"out: {Path(config.out)} already holds a checkpoint ({LATEST}); "
            "continue it with --resume or choose another --out"
        )
    return latest if latest.exists() else None


def _batch_pairs(
    images_a: Dataset[Tensor], images_b: Dataset[Tensor], config: TrainConfig, runtime: Runtime, *, start: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (A, B) batch pairs on the device (channels-last with ``config.channels_last``) from the
    data position ``start``; both loaders are built here, before the first draw."""
    batches_a = _batches(images_a, config, runtime, domain=0, start=start)
    batches_b = _batches(images_b, config, runtime, domain=1, start=start)
    return (_on_device(a, b, runtime.device, config.channels_last) for a, b in zip(batches_a, batches_b))


def _on_device(batch_a: Tensor, batch_b: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    real_a, real_b = batch_a.to(device, non_blocking=True), batch_b.to(device, non_blocking=True)
    if channels_last:
        real_a, real_b = (t.contiguous(memory_format=torch.channels_last) for t in (real_a, real_b))
    return real_a, real_b


def _finish_run(
    run: TrainingRun, metrics: LogInterval, compiled_graphs: dict[str, int], *, step: int, last_saved: int
) -> None:
    """After the loop, on every rank: the checkpoint at ``step`` (unless the loop just wrote it),
    the metrics file closed, the compiled-graph count at the end (a warning when it grew after the
    first step), all ranks waiting until latest.pt is complete; then
    :class:`TooManyUnreadableImagesError` when the loop stopped for unreadable images. A run that
    diverged (a check of :class:`LogInterval` failed, here too before the last save) writes no
    checkpoint and raises :class:`TrainingDivergedError`."""
    if last_saved != step and metrics.finite(step, run.finite_parts()):
        run.save(step)
        last_saved = step
    metrics.close()
    if run.config.compile:
        compiled_graphs["end"] = compiled_graph_count()
        if compiled_graphs.get("end") != compiled_graphs.get("after_first_step"):
            message = f"torch.compile recompiled after the first step: {compiled_graphs}"
            warnings.warn(message, stacklevel=3)  # attributed to train(), _train's caller
    if run.runtime.distributed:
        dist.barrier(group=run.runtime.control_group)  # latest.pt is complete before any rank reads it
    if metrics.diverged is not None:
        checkpoint = _checkpoint_on_disk(run, last_saved)
        message = divergence_message(run.config, metrics.diverged, checkpoint)
        raise TrainingDivergedError(message, rank=run.runtime.rank)
    if metrics.too_many_unreadable is not None:
        raise TooManyUnreadableImagesError(metrics.too_many_unreadable)


def _checkpoint_on_disk(run: TrainingRun, last_saved: int) -> tuple[Path, int] | None:
    """The checkpoint a diverged run leaves to continue from, with its step: the last one it wrote,
    else the one it resumed; None when there is none."""
    if last_saved > run.start_step or (run.start_step and run.config.resume_from is None):
        return Path(run.config.out) / LATEST, last_saved
    if run.start_step and run.config.resume_from is not None:
        return Path(run.config.resume_from), run.start_step
    return None


def _summary(
    run: TrainingRun, metrics: LogInterval, compiled_graphs: dict[str, int], *, step: int, seconds: float,
    interrupted: str | None,
) -> TrainSummary:  # fmt: skip
    """:func:`train`'s summary of a run that reached ``step`` in ``seconds`` of loop."""
    done = step - run.start_step
    return {
        "step": step,
        "seconds": seconds,
        "images_per_second": metrics.images_per_step * done / seconds if done else 0.0,
        "out": str(Path(run.config.out)),
        "rank": run.runtime.rank,
        "checkpoint": str(Path(run.config.out) / LATEST),
        "interrupted": interrupted,
        "metrics": metrics.record,
        "compiled_graphs": compiled_graphs or None,
        "unreadable_images": metrics.unreadable_images(),  # a collective: every rank counts
    }


# =============================================================================================
# 4. Command line
# =============================================================================================


def warn_if_lambda_gave_way(rule: object, step: int, say: Callable[[str], None] = print) -> bool:
    """Say once (returns True) when ``--lambda-travel auto`` has fallen below a third of its initial
    value: the discriminator keeps spotting the translations, and where that is because the
    generator collapses, lowering lambda feeds the collapse (docs/lambda.md: where the default
    fails; of 15 runs of the lambda-transfer study, only the one that collapsed fell that far)."""
    if not isinstance(rule, DiscriminatorGapLambda) or rule.value >= rule.initial / 3:
        return False
    say(
        f"\nwarning: step {step}: --lambda-travel auto fell to {rule.value:.3g}, below a third of its start "
        f"({rule.initial:g}): the discriminator keeps telling the translations apart. If loss_travel rose "
        "meanwhile, the generator is probably collapsing and a lower lambda helps it: look at OUT/samples, "
        "audit the translations (docs/audit.md) or set a fixed --lambda-travel"
    )
    return True


def adaptive_lambdas(
    config: TrainConfig, generator: nn.Module
) -> tuple[DiscriminatorGapLambda | GradientBalancedLambda | None, GradientBalancedLambda | None]:
    """The travel term's adaptive lambda (``--lambda-travel auto``: D's gap, a fifth of the steps at
    the initial value first; ``balance``: the gradient balance at G's last layer) and the structure
    term's (``--lambda-structure auto``: the gradient balance); None where a weight is a number."""
    from travel_loss.lambdas import last_layer_weight

    def balance() -> GradientBalancedLambda:
        return GradientBalancedLambda(
            last_layer_weight(generator), momentum=config.lambda_auto_momentum, scale=config.lambda_auto_scale
        )

    travel: DiscriminatorGapLambda | GradientBalancedLambda | None = None
    if config.lambda_travel == "auto":
        travel = DiscriminatorGapLambda(
            target_gap=config.lambda_auto_gap, initial=config.lambda_auto_initial, warmup=config.steps // 5
        )
    elif config.lambda_travel == "balance":
        travel = balance()
    return travel, balance() if config.lambda_structure == "auto" else None


def _lambda_value(text: str) -> float | str:
    if text in ADAPTIVE_LAMBDAS:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'balance', got {text!r}") from None


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field of a dataclass, as command-line help (empty if no source)."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+):[^=]+=[^#]*#\s*(.+)$")
    return {match[1]: match[2].strip() for match in map(pattern.match, source.splitlines()) if match}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field (``--g-width`` for g_width), plus --demo and --quick."""
    parser = argparse.ArgumentParser(
        prog="reference/train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    special: dict[str, dict[str, Any]] = {
        "lambda_travel": dict(type=_lambda_value, metavar="FLOAT|auto|balance"),
        "lambda_structure": dict(type=_lambda_value, metavar="FLOAT|auto"),
        "lambda_auto_scale": dict(type=float),
        "lambda_auto_momentum": dict(type=float),
        "travel_objective": dict(choices=TRAVEL_OBJECTIVES),
        "travel_distance": dict(choices=("cosine", "squared_euclidean", "travelgan")),
        "travel_reduction": dict(choices=("mean", "sum")),
        "gan_loss": dict(choices=GAN_LOSSES),
        "d_norm": dict(choices=DISCRIMINATOR_NORMS),
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
    parser.add_argument(
        "--demo", nargs="?", const=DEFAULT_STUDY, choices=sorted(STUDIES), default=None, metavar="STUDY",
        help=f"run a study into --out (reference.studies): {', '.join(sorted(STUDIES))}; --demo alone: {DEFAULT_STUDY}",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="with --demo: a shorter study")
    parser.add_argument(
        "--preset", choices=list(PRESETS), default=None,
        help="start from a named recipe (reference/presets.py: the paper's experiments, digits-demo); "
        "other flags override its values",
    )  # fmt: skip
    return parser


def _as_flags(message: str) -> str:
    """A message that starts with TrainConfig field names (``"size: expected ..."``, ``"data_a, data_b: ..."``)
    with those names written as the command line's flags (``"--size: expected ..."``); field names inside
    the message (``data_a='x'``) become flags too."""
    fields = {item.name for item in dataclasses.fields(TrainConfig)}
    head, colon, rest = message.partition(": ")
    names = [name.strip() for name in head.split(",")]
    if colon and names and all(name in fields for name in names):
        head = ", ".join("--" + name.replace("_", "-") for name in names)
        rest = re.sub(
            r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")=",
            lambda match: "--" + match[1].replace("_", "-") + "=",
            rest,
        )
        return f"{head}{colon}{rest}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:  # the preset's values become the defaults; flags given on the command line win
        parser.set_defaults(**preset_config(preset))
    args = vars(parser.parse_args(argv))
    if args.pop("preset") is not None and args["data"] is not None and args["data_a"] is args["data_b"] is None:
        args |= {"data": None, **preset_data(preset, args["data"])}  # the preset's data set layout under ROOT
    demo, quick = args.pop("demo"), args.pop("quick")
    config = TrainConfig(**args)
    if demo:
        run_study(demo, config.out, seed=config.seed, quick=quick)
        return 0
    try:
        check_config(config)
    except ValueError as error:
        print(error_line(parser.prog, _as_flags(str(error))), file=sys.stderr)
        raise SystemExit(2) from None
    try:
        summary = train(config)
    except (SetupError, RunFolderBusyError, ValueError) as error:  # ValueError: RunInputError, DamagedCheckpointError
        print(error_line(parser.prog, _as_flags(str(error))), file=sys.stderr)
        return 2
    except TooManyUnreadableImagesError as error:
        print(error_line(parser.prog, error), file=sys.stderr)
        return 1
    except TrainingDivergedError as error:  # every rank stops; one says why
        if error.rank == 0:
            print(error_line(parser.prog, error), file=sys.stderr)
        return 1
    if summary["rank"] != 0:
        return 0
    if summary["interrupted"]:
        print(
            f"stopped by {summary['interrupted']} at step {summary['step']}; "
            f"continue with --resume --out {summary['out']}"
        )
    elif summary["images_per_second"] == 0.0:  # a resume with nothing left to do
        print(f"already at step {summary['step']} of {config.steps}; checkpoint {summary['checkpoint']}")
    else:
        print(
            f"done: {summary['step']} steps, {summary['images_per_second']:.1f} images/s; "
            f"checkpoint {summary['checkpoint']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
