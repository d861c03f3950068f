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
    python reference/train.py --data ... --batch-size 128 --micro-batch 16   # batch 128 in 16's activation memory
    python reference/train.py --resume --out runs/gta                             # continue latest.pt
    python reference/train.py --demo --out runs/demo                              # the toy-street study

The file reads top to bottom: the two update steps, the encoder, the data, the training loop,
the command line. Its parts live in their own modules of ``reference``: the options and their
checks (``config``), devices, process group, seeds and signals (``runtime``), the batch stream
(``stream``), metrics and sample grids (``logs``), checkpoint files and the resumable training
state (``checkpoint``), the networks (``models``) and the GAN losses (``losses``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `reference` and `travel_loss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from reference.checkpoint import (
    LATEST,
    load_checkpoint,
    remove_stale_temporaries,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from reference.config import (
    AMP_MODES,
    DEVICES,
    ENCODER_MODES,
    PAPER_ENCODER,
    TRAINER_PRESETS,
    TRAVEL_OBJECTIVES,
    TrainConfig,
    check_config,
)
from reference.data import (
    ImageFolder,
    TooManyUnreadableImagesError,
    ToyStreets,
    resolve_unpaired_folders,
    unreadable_count,
)
from reference.logs import MetricsLog, log_record, progress_bar, save_image_grid, write_samples
from reference.losses import (
    GAN_LOSSES,
    diff_augment,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    notebook_travel_loss,
)
from reference.models import PatchDiscriminator, ResnetGenerator, SiameseEmbedder
from reference.outputs import RunFolderBusyError, RunFolderLock, error_line
from reference.runtime import (
    RunInputError,
    Runtime,
    SetupError,
    StopSignal,
    check_datasets,
    check_encoder_input_size,
    check_run_inputs,
    compile_modules,
    compiled_graph_count,
    rank_seed,
    seed_everything,
    setup_runtime,
)
from reference.stream import FlippedImages, stream_loader
from travel_loss import TravelQueue, siamese_margin_loss, travel_loss
from travel_loss.distributed import all_gather_with_grad
from travel_loss.gradcache import backward_chunk, embed_in_chunks, travel_loss_and_embedding_grads

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
# 1. The two updates of one iteration
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
    lambda_identity: float = 0.0  # weight of the identity baseline mean |G(x) - x|
    device_type: str = "cpu"  # for autocast
    amp_dtype: torch.dtype | None = None  # None: full precision
    micro_batch: int = 0  # > 0: the generator step in chunks of this many images, same gradient

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
            lambda_identity=config.lambda_identity,
            device_type=device_type,
            amp_dtype={"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp],
            micro_batch=config.micro_batch,
        )

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )


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

    ``options.lambda_identity`` > 0 adds CycleGAN's identity term
    :math:`\lambda_\mathrm{id}\, \mathrm{mean}|G(x) - x|` (a baseline regulariser; it also works
    with ``lambda_travel = 0``).

    ``emb_src``: precomputed (n, D) source embeddings E(x) (a frozen encoder's embeddings of a
    fixed data set can be computed once); the step then skips the source forward.

    ``travel_queue``: a :class:`travel_loss.TravelQueue` that replaces the travel term (pairs
    with queued rows of earlier steps too; batch 1 works).

    ``options.micro_batch`` = m with 0 < m < n: the same update computed in chunks of m images
    (:func:`micro_batched_generator_step`), for the memory of m images' activations.
    """
    if emb_src is not None and encoder_optimizer is not None:
        raise ValueError(
            "emb_src: precomputed source embeddings cannot be used with a trainable encoder (encoder_optimizer)"
        )
    optimizers = [optimizer] if encoder_optimizer is None else [optimizer, encoder_optimizer]
    if 0 < options.micro_batch < real_a.shape[0]:
        return micro_batched_generator_step(
            generator, discriminator, encoder, optimizers, real_a, options, scaler=scaler,
            trainable_encoder=encoder_optimizer is not None, adaptive_lambda=adaptive_lambda, emb_src=emb_src,
            travel_queue=travel_queue,
        )  # fmt: skip
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
    emb_src = all_gather_with_grad(_at_least_float32(emb_src))
    emb_gen = all_gather_with_grad(_at_least_float32(emb_gen))
    travel = travel_term(emb_src, emb_gen, options) if travel_queue is None else travel_queue(emb_src, emb_gen)
    lam = options.lambda_travel if adaptive_lambda is None else adaptive_lambda.update(adversarial, travel)
    loss = adversarial + lam * travel
    if encoder_optimizer is not None:
        loss = loss + lam * siamese_margin_loss(emb_src, options.siamese_margin, check_finite=False)
    if options.lambda_identity:
        loss = loss + options.lambda_identity * (fake.float() - real_a.float()).abs().mean()
    _backward_and_step(loss, optimizers, _parameters(optimizers), scaler)
    return {
        "loss_g": loss.detach(),
        "loss_adv": adversarial.detach(),
        "loss_travel": travel.detach(),
        "lambda": lam,
        "fake": fake.detach(),
    }


def micro_batched_generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    encoder: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    real_a: Tensor,
    options: StepOptions,
    *,
    scaler: torch.amp.GradScaler | None = None,
    trainable_encoder: bool = False,
    adaptive_lambda: Any | None = None,
    emb_src: Tensor | None = None,
    travel_queue: TravelQueue | None = None,
) -> dict[str, Any]:
    r""":func:`generator_step` in chunks of ``options.micro_batch`` images, with the same gradient.

    The gradient-cache technique (:mod:`travel_loss.gradcache`; Gao et al., 2021):

    1. E(x) and E(G(x)) of the whole batch, chunk by chunk, without graphs;
    2. the travel loss of the global batch (all ranks' rows) and its gradient
       :math:`\gamma = \partial L_\mathrm{travel} / \partial E(G(x))` (and with respect to E(x) for
       the trainable embedder, whose margin loss joins the travel loss here);
    3. per chunk c of m of the n images: G, D and E again with graphs, and one backward of
       :math:`\frac{m}{n} L_\mathrm{adv}(c) + \lambda \sum_{i \in c} \langle E(G(x_i)), \gamma_i \rangle`.
       The adversarial loss is a mean over images, so the chunk terms sum to the batch mean.

    Memory: one chunk's activations; cost: one more forward of G and E per image. Under DDP only
    the last chunk's backward reduces gradients across ranks (``no_sync`` before it).

    With an ``adaptive_lambda`` on a step where it computes, lambda is known only once every
    chunk is done: each chunk then back-propagates its adversarial term into ``.grad`` and its
    travel term into a separate buffer (one more backward through G per chunk), the gradient
    norms at the balanced parameter come from the two sums, and ``.grad`` becomes
    adversarial + lambda * travel (averaged across ranks by hand under DDP).
    ``optimizers``: G's, then the trainable encoder's. The random draws of ``options.augment``
    differ from those of the whole-batch step (same distribution), the rest is the same update.
    """
    chunk_size, n = options.micro_batch, real_a.shape[0]
    parameters = _parameters(optimizers)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with options.autocast():
        if emb_src is None:
            emb_src = embed_in_chunks(encoder, real_a, chunk_size)
        emb_gen = embed_in_chunks(lambda x: encoder(generator(x)), real_a, chunk_size)
    emb_src, emb_gen = _at_least_float32(emb_src), _at_least_float32(emb_gen)
    separate = adaptive_lambda is not None and adaptive_lambda.computes_next
    lam = options.lambda_travel
    if adaptive_lambda is not None and not separate:
        lam = adaptive_lambda.update_from_norms(None, None)

    def objective(src: Tensor, gen: Tensor) -> Tensor:
        travel = travel_term(src, gen, options) if travel_queue is None else travel_queue(src, gen)
        if trainable_encoder:
            travel = travel + siamese_margin_loss(src, options.siamese_margin, check_finite=False)
        return travel

    objective_value, grad_gen, grad_src = travel_loss_and_embedding_grads(
        emb_src, emb_gen, loss_fn=objective, src_grad=trainable_encoder, global_batch=True
    )
    scaled = scaler.scale if scaler is not None and scaler.is_enabled() else (lambda t: t)
    adversarial, fakes = torch.zeros((), device=real_a.device), []
    travel_grads: list[Tensor | None] = [None] * len(parameters)
    chunks = real_a.split(chunk_size)
    trained_modules = (generator, encoder if trainable_encoder else None)
    for index, x in enumerate(chunks):
        rows = slice(index * chunk_size, index * chunk_size + x.shape[0])
        with _no_sync_unless(index == len(chunks) - 1 and not separate, *trained_modules):
            with options.autocast():
                fake = generator(x)
                judged = fake.to(x.dtype)
                fake_logits = discriminator(diff_augment(judged, options.augment) if options.augment else judged)
                if trainable_encoder:
                    embedded, grad = encoder(torch.cat([x, fake])), torch.cat([grad_src[rows], grad_gen[rows]])
                else:
                    embedded, grad = encoder(fake), grad_gen[rows]
            adversarial_chunk = generator_adversarial_loss(fake_logits, options.gan_loss) * (x.shape[0] / n)
            if separate:
                torch.autograd.backward(scaled(adversarial_chunk), inputs=parameters, retain_graph=True)
                chunk_grads = torch.autograd.grad(
                    embedded, parameters, scaled(grad).to(embedded.dtype), allow_unused=True
                )
                travel_grads = [_add(total, g) for total, g in zip(travel_grads, chunk_grads)]
            else:
                backward_chunk(embedded, scaled(lam * grad), scaled(adversarial_chunk), inputs=parameters)
        adversarial = adversarial + adversarial_chunk.detach()
        fakes.append(fake.detach())
    if separate:
        lam = _combine_balanced(adaptive_lambda, parameters, travel_grads, trained_modules)
    _optimizer_step(optimizers, scaler)
    travel = objective_value
    if trainable_encoder:  # report the travel term alone, as the whole-batch step does
        with torch.no_grad():
            travel = travel_term(all_gather_with_grad(emb_src), all_gather_with_grad(emb_gen), options)
    return {
        "loss_g": adversarial + lam * objective_value,
        "loss_adv": adversarial,
        "loss_travel": travel,
        "lambda": lam,
        "fake": torch.cat(fakes),
    }


def _add(total: Tensor | None, value: Tensor | None) -> Tensor | None:
    if value is None:
        return total
    return value if total is None else total.add_(value)


def _combine_balanced(
    adaptive_lambda: Any,
    parameters: list[Tensor],
    travel_grads: list[Tensor | None],
    modules: Sequence[nn.Module | None],
) -> float:
    """lambda from the norms at the balanced parameter of ``.grad`` (adversarial) and ``travel_grads``;
    then ``.grad`` = adversarial + lambda * travel, averaged across ranks for DDP modules."""
    position = next((i for i, p in enumerate(parameters) if p is adaptive_lambda.parameter), None)
    if position is None:
        raise ValueError("adaptive_lambda: its parameter is not among the trained parameters of this step")
    adversarial_at, travel_at = parameters[position].grad, travel_grads[position]
    if adversarial_at is None or travel_at is None:
        raise ValueError("adaptive_lambda: the adversarial or travel loss does not depend on its parameter")
    norms = (torch.linalg.vector_norm(t.detach().double()) for t in (adversarial_at, travel_at))
    lam = adaptive_lambda.update_from_norms(*norms)
    for parameter, travel in zip(parameters, travel_grads):
        if travel is not None:
            parameter.grad = travel.mul_(lam) if parameter.grad is None else parameter.grad.add_(travel, alpha=lam)
    for module in modules:
        if isinstance(module, DistributedDataParallel):
            world_size = dist.get_world_size()
            for parameter in module.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad.div_(world_size)
    return lam


def _at_least_float32(embeddings: Tensor) -> Tensor:
    """float16/bfloat16 (autocast) embeddings in float32 for the loss; float32 and float64 unchanged."""
    return embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))


def _optimizer_step(optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None or not scaler.is_enabled():
        for optimizer in optimizers:
            optimizer.step()
        return
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()


@contextlib.contextmanager
def _no_sync_unless(sync: bool, *modules: nn.Module | None) -> Iterator[None]:
    """``no_sync()`` of every DDP module among ``modules`` unless ``sync``: gradients accumulate
    locally, and the next synchronised backward reduces the sum across ranks."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for module in modules:
                if isinstance(module, DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield


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
# 2. The encoder E and the learning-rate schedule
# =============================================================================================


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
    - ``toy``: ``reference.toy_encoder.build_toy_encoder``, a small frozen encoder that needs no weights;
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
            return build_user_embedder(config.encoder, config.size)
        except EmbedderSpecError as error:
            raise SetupError(str(error)) from error
    if config.encoder_mode == "toy":
        from reference.toy_encoder import build_toy_encoder

        return _frozen(build_toy_encoder(config.size, seed=config.seed))
    from travel_loss.encoder import FrozenCLIPEncoder

    options = dict(crop=config.crop, features=config.features, check_range=False)  # no host sync per call
    if config.encoder_mode == "clip":
        return _frozen(FrozenCLIPEncoder(config.encoder, **options))
    from transformers import CLIPVisionConfig

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
# 3. Data: an endless, seeded stream of batches per domain (reference.stream)
# =============================================================================================


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The two training sets, A and B, of (3, size, size) images in [-1, 1]."""
    if config.toy_streets:
        return (
            ToyStreets("A", size=config.size, length=config.toy_length, seed=config.toy_seed),
            ToyStreets("B", size=config.size, length=config.toy_length, seed=config.toy_seed),
        )
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
        workers = 0 if config.toy_streets else min(4, os.cpu_count() or 1)
    return stream_loader(
        images, config.batch_size, seed=config.seed, domain=domain, rank=runtime.rank, world_size=runtime.world_size,
        start=start, flip=config.flip, num_workers=workers, pin_memory=runtime.device.type == "cuda",
    )  # fmt: skip


# =============================================================================================
# 4. Training
# =============================================================================================


_RESUME_FREE_FIELDS = {
    "out", "resume", "steps", "log_every", "sample_every", "sample_count", "checkpoint_every",
    "keep_checkpoints", "num_workers", "device", "compile", "compile_backend", "channels_last",
    "resume_from", "max_unreadable_fraction",
}  # fmt: skip


def train(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
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
    """
    check_config(config)
    check_run_inputs(config)
    runtime = setup_runtime(config.device, config.amp)
    lock = RunFolderLock(config.out) if runtime.is_main else None  # a second run on --out stops here
    try:
        if lock is not None:
            lock.acquire()
            remove_stale_temporaries(config.out)  # left by a writer killed mid-checkpoint
        return _train(config, runtime, progress=progress)
    finally:
        if lock is not None:
            lock.release()
        if runtime.owns_process_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, runtime: Runtime, *, progress: bool) -> dict[str, Any]:
    device = runtime.device
    out = Path(config.out)
    latest = out / LATEST
    resume_path = Path(config.resume_from) if config.resume_from is not None else latest
    resuming = config.resume_from is not None or (config.resume and latest.exists())
    if latest.exists() and not (config.resume or config.resume_from is not None):
        raise ValueError(
            f"out: {out} already holds a checkpoint ({LATEST}); pass resume=True (--resume) or choose another folder"
        )
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    say = print if runtime.is_main and progress else (lambda *a, **k: None)
    images_a, images_b = build_datasets(config)  # folder mistakes surface before any model is built
    check_datasets(
        {f"domain {d} ({getattr(x, 'folder', 'toy streets')})": x for d, x in zip("AB", (images_a, images_b))},
        config.batch_size, runtime.world_size,
    )  # fmt: skip

    # ---- models, encoder, optimizers: the same initial weights on every rank
    seed_everything(config.seed)
    generator = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.generator_blocks).to(device)
    discriminator = PatchDiscriminator(3, width=config.d_width, n_layers=config.d_layers).to(device)
    encoder = build_encoder(config).to(device)
    check_encoder_input_size(encoder, config.size)
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
        from reference.adaptive_lambda import GradientBalancedLambda, last_layer_weight

        adaptive = GradientBalancedLambda(
            last_layer_weight(generator), momentum=config.lambda_auto_momentum, scale=config.lambda_auto_scale
        )
    seed_everything(rank_seed(config.seed, runtime.rank))

    # ---- resume: weights, optimizer moments, schedules, scalers, RNG states, data position
    start_step = 0
    if resuming:
        checkpoint = load_checkpoint(resume_path, advice="resume from one of them with --resume-from FILE")
        changed = sorted(
            k
            for k, v in checkpoint.get("config", {}).items()
            if k not in _RESUME_FREE_FIELDS and asdict(config).get(k) != v
        )
        try:
            start_step, data_position = restore_training_state(
                checkpoint, runtime, modules, optimizers, schedulers, scalers, adaptive
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
        g_train, d_train, e_train, d_for_g = compile_modules(
            [g_train, d_train, e_train, d_for_g], config.compile_backend
        )

    # ---- data
    batches_a = _batches(images_a, config, runtime, domain=0, start=data_position)
    batches_b = _batches(images_b, config, runtime, domain=1, start=data_position)
    sample_inputs = torch.stack(
        [FlippedImages(images_a)[(i, False)] for i in range(min(config.sample_count, len(images_a)))]
    )

    # ---- the loop
    options = StepOptions.from_config(config, device.type)
    log = MetricsLog(out, start_step) if runtime.is_main else None
    images_per_step = config.batch_size * runtime.world_size
    running: dict[str, Any] = {}
    record: dict[str, float] = {}
    compiled_graphs: dict[str, int] = {}
    last_saved = start_step
    step = start_step
    bar = progress_bar(start_step, config.steps, enabled=progress and runtime.is_main)
    started = interval_started = time.perf_counter()
    interval_start_step = start_step

    def save(step: int) -> None:
        state = training_state(asdict(config), step, runtime, modules, optimizers, schedulers, scalers, adaptive)
        if state is not None:
            writer = (lambda obj, path: runtime.xla.save(obj, path)) if runtime.xla is not None else torch.save
            save_checkpoint(state, out, step, keep=config.keep_checkpoints, save=writer)

    interrupted = None
    unreadable, too_many_unreadable = 0, None
    image_files = sum(len(d) for d in (images_a, images_b) if isinstance(d, ImageFolder))
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
            d_out = discriminator_step(
                d_train,
                optimizers["discriminator"],
                real_b,
                g_out.pop("fake"),
                options,
                scaler=scalers["discriminator"],
            )
            for sched in schedulers.values():
                sched.step()
            if runtime.xla is not None:
                runtime.xla.mark_step()
            for key, value in {**g_out, **d_out}.items():  # running sums, no host sync
                running[key] = running.get(key, 0.0) + value
            if config.compile and step == start_step + 1:
                compiled_graphs["after_first_step"] = compiled_graph_count()

            if step % config.log_every == 0 or step == config.steps:
                record = log_record(step, running, step - interval_start_step, runtime, optimizers)
                record["images_per_second"] = (
                    images_per_step * (step - interval_start_step) / (time.perf_counter() - interval_started)
                )
                running, interval_started, interval_start_step = {}, time.perf_counter(), step
                if image_files:
                    unreadable = unreadable_count(
                        images_a, images_b, group=runtime.control_group if runtime.distributed else None
                    )
                    record["unreadable_images"] = unreadable
                    if unreadable > config.max_unreadable_fraction * image_files:
                        too_many_unreadable = (
                            f"stopped at step {step}: {unreadable} of {image_files} image files "
                            f"failed to decode, more than "
                            f"--max-unreadable-fraction {config.max_unreadable_fraction}; "
                            f"a checkpoint was saved in {out}: "
                            "fix or remove the files (named in the warnings above) and continue with --resume"
                        )
                if log is not None:
                    log.write(record)
                bar.set_postfix(
                    {k: f"{record[k]:.3g}" for k in ("loss_g", "loss_d", "loss_travel", "images_per_second")}
                )
            if runtime.is_main and (step % config.sample_every == 0 or step == config.steps):
                samples = out / "samples" / f"step_{step:06d}.png"
                write_samples(generator, sample_inputs, samples, options.autocast, config.channels_last)
            if step % config.checkpoint_every == 0:
                save(step)
                last_saved = step
            bar.update(1)
            if too_many_unreadable is not None:
                break
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
        compiled_graphs["end"] = compiled_graph_count()
        if compiled_graphs.get("end") != compiled_graphs.get("after_first_step"):
            warnings.warn(f"torch.compile recompiled after the first step: {compiled_graphs}", stacklevel=2)
    if runtime.distributed:
        dist.barrier(group=runtime.control_group)  # latest.pt is complete before any rank reads it
    if too_many_unreadable is not None:
        raise TooManyUnreadableImagesError(too_many_unreadable)
    if image_files:
        unreadable = unreadable_count(images_a, images_b, group=runtime.control_group if runtime.distributed else None)
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
        "unreadable_images": unreadable,
    }


# =============================================================================================
# 5. Command line
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
    parser.add_argument(
        "--demo", nargs="?", const="streets", choices=("streets", "digits"), default=None,
        help="run a study into --out: the toy streets (reference.demo; --demo alone) "
        "or real digits (reference.digit_demo)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="with --demo: a shorter study")
    parser.add_argument(
        "--preset", choices=sorted(TRAINER_PRESETS), default=None,
        help="start from a named recipe (reference.config.TRAINER_PRESETS); other flags override its values",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:  # the preset's values become the defaults; flags given on the command line win
        parser.set_defaults(**TRAINER_PRESETS[preset])
    args = vars(parser.parse_args(argv))
    args.pop("preset")
    demo, quick = args.pop("demo"), args.pop("quick")
    config = TrainConfig(**args)
    if demo == "digits":
        from reference.digit_demo import run_digit_demo

        run_digit_demo(config.out, seed=config.seed, quick=quick)
        return 0
    if demo:
        from reference.demo import run_demo

        run_demo(config.out, seed=config.seed, quick=quick)
        return 0
    try:
        check_config(config)
    except ValueError as error:
        print(error_line(parser.prog, error), file=sys.stderr)
        raise SystemExit(2) from None
    try:
        summary = train(config)
    except (SetupError, RunFolderBusyError, ValueError) as error:  # ValueError: RunInputError, DamagedCheckpointError
        print(error_line(parser.prog, error), file=sys.stderr)
        return 2
    except TooManyUnreadableImagesError as error:
        print(error_line(parser.prog, error), file=sys.stderr)
        return 1
    if summary["rank"] != 0:
        return 0
    if summary["interrupted"]:
        print(
            f"stopped by {summary['interrupted']} at step {summary['step']}; "
            f"continue with --resume --out {summary['out']}"
        )
    else:
        print(
            f"done: {summary['step']} steps, {summary['images_per_second']:.1f} images/s; "
            f"checkpoint {summary['checkpoint']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
