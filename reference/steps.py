r"""The two updates of one training iteration, shared by every trainer in ``reference``.

    generator      L_G = L_adv(D(aug(G(x)))) + lambda * L_travel(E(x), E(G(x)))   (E(x) without grad)
    discriminator  L_D = L_adv^D(D(aug(y)), D(aug(G(x))))                          (G(x) detached)

With a :class:`ReverseDirection` (G_BA, D_A) the generator step also trains CycleGAN's
B -> A generator and adds the cycle-consistency terms (the CycleGAN baseline); the trainer then
runs :func:`discriminator_step` a second time, for D_A on (a, G_BA(b)). With a
:class:`PatchNCE` it adds CUT's patchwise contrastive term (``reference.patchnce``, the CUT
baseline) and trains its MLP heads. :func:`update_ema` keeps an exponential moving average of
the generator's weights.

:func:`generator_step` (or :func:`micro_batched_generator_step`, the same gradient computed a
few images at a time) and :func:`discriminator_step`; :class:`StepOptions` carries what they
need besides the networks. Both generator steps take L_G's terms other than travel from one
definition, :func:`generator_terms` (means over images, so a chunk's share is m/n of its
terms). ``reference/train.py`` re-exports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from reference.losses import (
    diff_augment,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    notebook_travel_loss,
)
from reference.patchnce import patch_nce_per_image, sample_locations
from travel_loss import RandomViews, TravelQueue, embed_views, siamese_margin_loss, travel_loss
from travel_loss.distributed import all_gather_with_grad
from travel_loss.gradcache import backward_chunk, embed_in_chunks, travel_loss_and_embedding_grads
from travel_loss.lambdas import AdaptiveLambda, GradientBalancedLambda, discriminator_gap
from travel_loss.loss import Distance, Reduction
from travel_loss.structure import self_similarity_loss
from travel_loss.views import ViewDraw

if TYPE_CHECKING:
    from reference.config import TrainConfig

__all__ = [
    "GeneratorTerms",
    "PatchNCE",
    "ReverseDirection",
    "StepOptions",
    "StructureFeatures",
    "cycle_terms",
    "discriminator_step",
    "generator_step",
    "generator_terms",
    "micro_batched_generator_step",
    "nce_term",
    "structure_features",
    "structure_term",
    "translate_and_judge",
    "travel_term",
    "update_ema",
]


@dataclass(frozen=True)
class StepOptions:
    """What :func:`generator_step` and :func:`discriminator_step` need to know besides the models."""

    lambda_travel: float = 1.0  # ignored when an adaptive lambda is passed
    travel_objective: str = "paper"
    travel_distance: Distance = "cosine"
    travel_reduction: Reduction = "mean"
    gan_loss: str = "bce"
    augment: str = ""
    siamese_margin: float = 10.0
    lambda_identity: float = 0.0  # weight of the identity baseline mean |G(x) - x|
    device_type: str = "cpu"  # for autocast
    amp_dtype: torch.dtype | None = None  # None: full precision
    micro_batch: int = 0  # > 0: the generator step in chunks of this many images, same gradient
    lambda_cycle: float = 0.0  # weight of CycleGAN's cycle-consistency terms (with a ReverseDirection)
    lambda_cycle_identity: float = 0.5  # CycleGAN's identity terms weigh lambda_cycle * this
    r1_gamma: float = 0.0  # weight of D's R1 penalty on real images
    lambda_nce: float = 0.0  # weight of CUT's PatchNCE term (with a PatchNCE)
    nce_idt: bool = True  # PatchNCE also on (y, G(y)) for target images y, the two averaged (CUT's default)
    nce_patches: int = 256  # PatchNCE: patch locations sampled per layer
    nce_temperature: float = 0.07  # PatchNCE: softmax temperature
    views: RandomViews | None = None  # E averaged over shared random views of x and G(x) (a frozen encoder)
    lambda_structure: float = 0.0  # weight of the structure term (ignored when an adaptive one is passed)
    structure_window: int = 0  # structure term: 0 global self-similarity, w > 0 local w x w windows
    structure_positions: int = 0  # structure term: rows (centres) sampled per step, 0: every one
    structure_layer: int | None = None  # structure term: the encoder's hidden_states[k] (None: last_hidden_state)

    @property
    def structure_on(self) -> bool:
        """Whether L_G has a structure term at a fixed weight (an adaptive one is passed to the step)."""
        return self.lambda_structure != 0

    @classmethod
    def from_config(cls, config: TrainConfig, device_type: str) -> StepOptions:
        """The options of ``config``'s run: its fields of the same names, and lambda, autocast and views."""
        derived: dict[str, Any] = {
            # a rule's name ("auto", "balance": check_config) means the adaptive lambda passed to the step
            "lambda_travel": 0.0 if isinstance(config.lambda_travel, str) else float(config.lambda_travel),
            "lambda_structure": 0.0 if config.lambda_structure == "auto" else float(config.lambda_structure),
            "device_type": device_type,
            "amp_dtype": {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp],
            "views": RandomViews.parse(f"count={config.travel_views},{config.travel_view_transforms}")
            if config.travel_views
            else None,
        }
        same: dict[str, Any] = {f.name: getattr(config, f.name) for f in fields(cls) if f.name not in derived}
        return cls(**same, **derived)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` to ``amp_dtype``; with amp off no autocast context at all (torch_xla warns
        on entering a disabled float32 one)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)


def travel_term(emb_src: Tensor, emb_gen: Tensor, options: StepOptions) -> Tensor:
    """The travel loss of the chosen objective, in float32 (embeddings of the whole global batch)."""
    if options.travel_objective == "notebook":
        return notebook_travel_loss(emb_src, emb_gen)
    return travel_loss(
        emb_src, emb_gen, distance=options.travel_distance, reduction=options.travel_reduction, check_finite=False
    )


@dataclass(frozen=True)
class StructureFeatures:
    """Spatial features of source images and of their translations for :func:`structure_term`: (n, L, C)
    tokens on ``grid`` or (n, C, H, W) maps; ``seed`` draws the sampled positions (the same in every
    chunk of a batch), None where every position is used."""

    source: Tensor
    translation: Tensor
    grid: tuple[int, int] | None = None
    seed: int | None = None

    def rows(self, rows: Tensor) -> StructureFeatures:
        """The features of ``rows`` of the batch (a chunk), with the same grid and positions."""
        return StructureFeatures(self.source[rows], self.translation[rows], self.grid, self.seed)


def structure_features(encoder: nn.Module, images: Tensor, options: StepOptions) -> tuple[Tensor, Tensor]:
    """(embeddings, spatial tokens) of ``images`` from one forward of ``encoder``'s ``forward_with_tokens``
    (a :class:`travel_loss.FrozenEncoder`, or a user embedder with ``forward_with_tokens`` or
    ``tokens``: ``reference.user_embedder``); the module inside DDP / compile wrappers runs it."""
    plain = _plain(encoder)
    if options.structure_layer is None:
        embeddings, tokens = plain.forward_with_tokens(images)
    else:
        embeddings, tokens = plain.forward_with_tokens(images, layer=options.structure_layer)
    return embeddings, tokens


def structure_term(features: StructureFeatures, options: StepOptions) -> Tensor:
    r"""The structure loss (a scalar, at least float32): the mean over the n images of
    :func:`travel_loss.self_similarity_loss` (L1 between self-similarity maps, centred features),
    global or in ``options.structure_window`` windows, at ``options.structure_positions`` positions
    drawn from ``features.seed``. A mean over images, so chunks weighted m/n add up to the batch's."""
    draw = None if features.seed is None else torch.Generator().manual_seed(features.seed)
    return self_similarity_loss(
        features.source, features.translation, grid=features.grid if features.source.dim() == 3 else None,
        window=options.structure_window or None, positions=options.structure_positions or None, generator=draw,
    )  # fmt: skip


def _structure_seed(options: StepOptions) -> int | None:
    """One draw from torch's global RNG per step for the sampled structure positions (None: every one)."""
    return int(torch.randint(2**62, ())) if options.structure_positions else None


def _token_grid(encoder: nn.Module) -> tuple[int, int] | None:
    grid = getattr(_plain(encoder), "token_grid", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


@dataclass(frozen=True)
class ReverseDirection:
    """The B -> A half of a cycle-consistent (CycleGAN) run, for :func:`generator_step`.

    ``generator`` is G_BA as it trains (a DDP or compiled view is fine), ``discriminator`` D_A
    *unwrapped* (only the generators receive gradients in the generator step) and ``optimizer``
    G_BA's, stepped together with G_AB's after the one backward.
    """

    generator: nn.Module
    discriminator: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class PatchNCE:
    """CUT's PatchNCE term for :func:`generator_step`: its MLP heads and their optimizer.

    ``heads`` is the :class:`reference.patchnce.PatchHeads` of the generator's
    :attr:`~reference.models.ResnetGenerator.nce_layers` as it trains (a DDP view is fine);
    ``optimizer`` the heads' (CUT: Adam with G's learning rate and betas), stepped together with
    G's after the one backward.
    """

    heads: nn.Module
    optimizer: torch.optim.Optimizer


def _plain(module: nn.Module) -> Any:
    """The module inside DDP and torch.compile wrappers (typed Any: its own methods are called)."""
    inner: Any = module
    while isinstance(inner, DistributedDataParallel) or hasattr(inner, "_orig_mod"):
        inner = inner.module if isinstance(inner, DistributedDataParallel) else inner._orig_mod
    return inner


def nce_term(
    generator: nn.Module,
    patch_nce: PatchNCE,
    real_a: Tensor,
    fake: Tensor,
    options: StepOptions,
    real_b: Tensor | None = None,
    locations: Sequence[Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""CUT's NCE term (a scalar, at least float32) and what to log, for ``fake`` = G(``real_a``).

    .. math::  \mathrm{NCE} = \mathrm{NCE}_X = \mathrm{PatchNCE}(x, G(x)), \quad \text{or with nce\_idt} \quad
               \mathrm{NCE} = \tfrac12 \bigl(\mathrm{NCE}_X + \mathrm{PatchNCE}(y, G(y))\bigr)

    (:func:`reference.patchnce.patch_nce_per_image` on the generator's own ``encoder_features``
    at its ``nce_layers``). ``options.nce_idt`` needs ``real_b`` (n', 3, H, W) and costs one more
    forward of ``generator`` (the view that trains) on it; x and y then go through the encoder
    and the heads as one batch, with the same patch locations. The encoder passes call the
    module inside any DDP / compile wrapper: they run eagerly, and under DDP their gradient joins
    G's in the same backward, which the wrapper then averages. Logged: ``"loss_nce"`` (the term,
    before its weight) and, with nce_idt, ``"loss_nce_x"`` and ``"loss_nce_y"``.
    """
    plain = _plain(generator)
    sources, translations = real_a, fake
    if options.nce_idt:
        if real_b is None:
            raise ValueError("real_b: nce_idt needs a batch of target images for its (y, G(y)) term, got None")
        identity = generator(real_b)
        sources, translations = torch.cat([real_a, real_b]), torch.cat([fake, identity.to(fake.dtype)])
    per_image = patch_nce_per_image(
        plain.encoder_features, patch_nce.heads, sources, translations,
        num_patches=options.nce_patches, temperature=options.nce_temperature, locations=locations,
    )  # fmt: skip
    if not options.nce_idt:
        return per_image.mean(), {"loss_nce": per_image.mean().detach()}
    nce_x, nce_y = per_image[: real_a.shape[0]].mean(), per_image[real_a.shape[0] :].mean()
    nce = (nce_x + nce_y) / 2
    return nce, {"loss_nce": nce.detach(), "loss_nce_x": nce_x.detach(), "loss_nce_y": nce_y.detach()}


def cycle_terms(
    generator_ab: nn.Module,
    generator_ba: nn.Module,
    real_a: Tensor,
    real_b: Tensor,
    fake_b: Tensor,
    fake_a: Tensor,
    *,
    identity: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""CycleGAN's reconstruction and identity terms (scalars, at least float32), for images (n, 3, H, W).

    .. math::  L_\mathrm{cyc} = \mathrm{mean}|G_{BA}(G_{AB}(a)) - a| + \mathrm{mean}|G_{AB}(G_{BA}(b)) - b|
    .. math::  L_\mathrm{idt} = \mathrm{mean}|G_{AB}(b) - b| + \mathrm{mean}|G_{BA}(a) - a|

    ``fake_b`` = G_AB(a) and ``fake_a`` = G_BA(b) are passed in (the step has them already).
    ``identity=False`` skips the two identity forwards and returns a zero for L_idt.
    """

    def l1(x: Tensor, y: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # autocast's half precision in float32
        return (x.to(dtype) - y.to(dtype)).abs().mean()

    cycle = l1(generator_ba(fake_b), real_a) + l1(generator_ab(fake_a), real_b)
    if not identity:
        return cycle, torch.zeros((), dtype=cycle.dtype, device=cycle.device)
    return cycle, l1(generator_ab(real_b), real_b) + l1(generator_ba(real_a), real_a)


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float) -> None:
    r"""``average`` <- decay * average + (1 - decay) * model, parameter by parameter (buffers copied).

    .. math::  \bar\theta \leftarrow \bar\theta + (1 - d)(\theta - \bar\theta)

    ``average`` has ``model``'s architecture (e.g. a ``copy.deepcopy`` of it); ``model`` is the unwrapped module.
    """
    for kept, current in zip(average.parameters(), model.parameters(), strict=True):
        kept.lerp_(current.detach(), 1.0 - decay)
    for kept_buffer, buffer in zip(average.buffers(), model.buffers(), strict=True):
        kept_buffer.copy_(buffer)


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


@dataclass(frozen=True)
class GeneratorTerms:
    """The terms of L_G besides the travel term, for a batch or a chunk of one (all at least float32)."""

    loss: Tensor  # their weighted sum, with graph
    adversarial: Tensor  # L_adv(D(aug(G(x)))) alone, with graph (what an adaptive lambda balances against)
    reported: dict[str, Tensor]  # detached, to log: CycleGAN's and PatchNCE's terms, and "fake_a"
    structure: Tensor | None = None  # the structure term alone, with graph (what an adaptive lambda balances)


def translate_and_judge(
    generator: nn.Module, discriminator: nn.Module, real_a: Tensor, options: StepOptions
) -> tuple[Tensor, Tensor]:
    """G(x) and D's logits on the (augmented) translations, under the step's autocast."""
    with options.autocast():
        fake = generator(real_a)
        judged = fake.to(real_a.dtype)  # D sees one input dtype in both steps: one compiled graph
        logits = discriminator(diff_augment(judged, options.augment) if options.augment else judged)
    return fake, logits


def generator_terms(
    generator: nn.Module,
    real_a: Tensor,
    fake: Tensor,
    fake_logits: Tensor,
    options: StepOptions,
    *,
    reverse: ReverseDirection | None = None,
    real_b: Tensor | None = None,
    patch_nce: PatchNCE | None = None,
    nce_locations: Sequence[Tensor] | None = None,
    structure: StructureFeatures | None = None,
    lambda_structure: float | None = None,
) -> GeneratorTerms:
    r"""Every term of L_G but the travel term, for ``fake`` = G(``real_a``) (n, 3, H, W) and D's ``fake_logits``.

    .. math::  L_\mathrm{adv} + \lambda_\mathrm{id}\, \mathrm{mean}|G(x) - x| + \lambda_\mathrm{NCE}\, \mathrm{NCE}
               + \bigl[L_\mathrm{adv}(D_A(\mathrm{aug}(G_{BA}(b)))) + \lambda_\mathrm{cyc} L_\mathrm{cyc}
               + \lambda_\mathrm{cyc} \lambda_\mathrm{idt} L_\mathrm{idt}\bigr]

    (the identity-L1 baseline with ``options.lambda_identity``; CUT's :func:`nce_term` with a
    ``patch_nce``; CycleGAN's B -> A adversarial and :func:`cycle_terms` with a ``reverse`` and
    ``real_b`` (n, 3, H, W)). Each term is a mean over the n images, so m/n times the terms of a
    chunk of m images, summed over the chunks, is the batch's (PatchNCE with the same
    ``nce_locations`` in every chunk, :func:`reference.patchnce.sample_locations`; None draws
    them): the whole-batch and the micro-batched step both use this function.

    ``structure``: the encoder's spatial features of ``real_a`` and ``fake`` (the chunk's rows):
    adds :math:`\lambda_S\, L_\mathrm{structure}` (:func:`structure_term`, a mean over images too) with
    ``lambda_structure`` (None: ``options.lambda_structure``); ``structure`` of the result is the term.
    """
    adversarial = generator_adversarial_loss(fake_logits, options.gan_loss)
    loss, reported = adversarial, dict[str, Tensor]()
    structure_loss = None
    if structure is not None:
        structure_loss = structure_term(structure, options)
        weight = options.lambda_structure if lambda_structure is None else lambda_structure
        if weight:
            loss = loss + weight * structure_loss
    if options.lambda_identity:
        loss = loss + options.lambda_identity * (fake.float() - real_a.float()).abs().mean()
    if patch_nce is not None:
        with options.autocast():
            nce, reported = nce_term(generator, patch_nce, real_a, fake, options, real_b, locations=nce_locations)
        loss = loss + options.lambda_nce * nce
    if reverse is not None and real_b is not None:
        fake_a, logits_a = translate_and_judge(reverse.generator, reverse.discriminator, real_b, options)
        with options.autocast():
            cycle, cycle_identity = cycle_terms(
                generator, reverse.generator, real_a, real_b, fake, fake_a, identity=options.lambda_cycle_identity > 0
            )
        adversarial_ba = generator_adversarial_loss(logits_a, options.gan_loss)
        loss = loss + adversarial_ba + options.lambda_cycle * (cycle + options.lambda_cycle_identity * cycle_identity)
        reported |= {
            "loss_adv_ba": adversarial_ba.detach(),
            "loss_cycle": cycle.detach(),
            "loss_cycle_identity": cycle_identity.detach(),
            "fake_a": fake_a.detach(),
        }
    if structure_loss is not None:
        reported = {**reported, "loss_structure": structure_loss.detach()}
    return GeneratorTerms(loss=loss, adversarial=adversarial, reported=reported, structure=structure_loss)


def _check_step_arguments(
    real_a: Tensor,
    options: StepOptions,
    encoder_optimizer: torch.optim.Optimizer | None,
    emb_src: Tensor | None,
    reverse: ReverseDirection | None,
    real_b: Tensor | None,
    patch_nce: PatchNCE | None,
    *,
    has_encoder: bool = True,
    adaptive: bool = False,
) -> None:
    """Raises ``ValueError`` naming the argument, before any work."""
    nce_needs_b = patch_nce is not None and options.nce_idt
    if (reverse is not None and real_b is None) or (real_b is not None and reverse is None and not nce_needs_b):
        raise ValueError(
            f"reverse, real_b: give both (G_BA, D_A, optimizer and target images) or neither, "
            f"got reverse={type(reverse).__name__}, real_b={type(real_b).__name__}"
        )
    if nce_needs_b and real_b is None:
        raise ValueError("real_b: nce_idt needs a batch of target images for its (y, G(y)) term, got None")
    if real_b is not None and 0 < options.micro_batch < real_a.shape[0] and real_b.shape[0] != real_a.shape[0]:
        raise ValueError(
            f"real_b: the micro-batched step splits real_a and real_b into the same chunks; expected "
            f"{real_a.shape[0]} images like real_a, got {real_b.shape[0]}"
        )
    if reverse is None and options.lambda_cycle:
        raise ValueError(f"reverse: lambda_cycle = {options.lambda_cycle} needs G_BA and D_A, got None")
    if patch_nce is None and options.lambda_nce:
        raise ValueError(f"patch_nce: lambda_nce = {options.lambda_nce} needs the PatchNCE heads, got None")
    if emb_src is not None and encoder_optimizer is not None:
        raise ValueError(
            "emb_src: precomputed source embeddings cannot be used with a trainable encoder (encoder_optimizer)"
        )
    if emb_src is not None and options.views is not None:
        raise ValueError("emb_src: precomputed source embeddings cannot be used with views (E(x) changes per view)")
    if not has_encoder and (options.lambda_travel or adaptive or encoder_optimizer or emb_src is not None):
        raise ValueError(
            "encoder: None works only without a travel term (lambda_travel 0, no adaptive lambda, "
            f"no encoder_optimizer or emb_src), got lambda_travel={options.lambda_travel}"
        )


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    encoder: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    real_a: Tensor,
    options: StepOptions,
    *,
    scaler: torch.amp.GradScaler | None = None,
    encoder_optimizer: torch.optim.Optimizer | None = None,
    adaptive_lambda: AdaptiveLambda | None = None,
    emb_src: Tensor | None = None,
    travel_queue: TravelQueue | None = None,
    reverse: ReverseDirection | None = None,
    real_b: Tensor | None = None,
    patch_nce: PatchNCE | None = None,
    adaptive_structure: GradientBalancedLambda | None = None,
) -> dict[str, Any]:
    r"""One generator update on a batch ``real_a`` (n, 3, H, W) of source images in [-1, 1].

    .. math::  L_G = L_\mathrm{adv}(D(\mathrm{aug}(G(x)))) + \lambda\, L_\mathrm{travel}(E(x), E(G(x)))
               + \text{the baselines' terms of } :func:`generator_terms`

    ``E(x)`` is computed without gradient when the encoder is frozen. With an
    ``encoder_optimizer`` the encoder is TraVeLGAN's trainable Siamese network: both embeddings
    keep their gradient, the loss gains :math:`\lambda\, L_\mathrm{margin}(E(x))` (which keeps E
    from collapsing) and E is updated together with G. Under DDP the embeddings of all ranks are
    gathered with gradient, so the travel loss compares every pair of the global batch. With
    ``options.views`` E is averaged over random views shared by x and G(x)
    (:func:`travel_loss.embed_views`).

    ``discriminator`` must be the *unwrapped* module (not DDP): only G (and E) receive gradients
    here. ``adaptive_lambda`` replaces ``options.lambda_travel`` by a value that balances the
    travel gradient against the adversarial one. Returns detached losses, the lambda used and
    the translations ``"fake"`` (detached) for the discriminator step.

    ``emb_src``: precomputed (n, D) source embeddings E(x) (a frozen encoder's embeddings of a
    fixed data set can be computed once); the step then skips the source forward.

    ``encoder`` None (a baseline at ``lambda_travel`` 0 that needs no E): no travel term, and
    no ``"loss_travel"`` in the result.

    ``travel_queue``: a :class:`travel_loss.TravelQueue` that replaces the travel term (pairs
    with queued rows of earlier steps too; batch 1 works).

    Structure (``options.lambda_structure`` > 0, or ``adaptive_structure`` balancing it against the
    adversarial term as ``adaptive_lambda`` does the travel term): :math:`\lambda_S\,
    L_\mathrm{structure}` on the frozen encoder's spatial tokens of x and G(x)
    (:func:`structure_term`), taken from the same forward pass as the embeddings
    (``forward_with_tokens``) where no views are used; with views it is computed on the unviewed
    images (one more forward of each). The result gains ``"loss_structure"`` (and
    ``"lambda_structure"`` with ``adaptive_structure``).

    ``options.micro_batch`` = m with 0 < m < n: the same update computed in chunks of m images
    (:func:`micro_batched_generator_step`), for the memory of m images' activations; every
    option works there.

    Baselines (:func:`generator_terms`): ``options.lambda_identity`` > 0 adds CycleGAN's
    identity term :math:`\lambda_\mathrm{id}\, \mathrm{mean}|G(x) - x|` (it also works with
    ``lambda_travel = 0``). ``reverse`` (G_BA, D_A, G_BA's optimizer) and ``real_b`` (n, 3, H, W)
    target images: CycleGAN, both generators updated from one backward (``options.lambda_cycle``,
    ``options.lambda_cycle_identity``; the travel and identity-L1 terms act on A -> B only); the
    result gains ``"loss_adv_ba"``, ``"loss_cycle"``, ``"loss_cycle_identity"`` and ``"fake_a"``
    = G_BA(b) (detached, for D_A's step). ``patch_nce`` (the heads and their optimizer): CUT's
    :math:`\lambda_\mathrm{NCE}\, \mathrm{NCE}` (``options.lambda_nce``; with ``options.nce_idt``
    on ``real_b`` too), the heads updated from the same backward; the result gains
    ``"loss_nce"`` (and ``"loss_nce_x"``, ``"loss_nce_y"`` with nce_idt).
    """
    _check_step_arguments(
        real_a, options, encoder_optimizer, emb_src, reverse, real_b, patch_nce,
        has_encoder=encoder is not None, adaptive=adaptive_lambda is not None,
    )  # fmt: skip
    structure_on = options.structure_on or adaptive_structure is not None
    if structure_on and (encoder is None or encoder_optimizer is not None):
        raise ValueError("encoder: the structure term needs a frozen encoder with forward_with_tokens, got none")
    if adaptive_structure is not None and 0 < options.micro_batch < real_a.shape[0]:
        raise ValueError("adaptive_structure: the micro-batched step takes a fixed lambda_structure only")
    optimizers = [optimizer] if encoder_optimizer is None else [optimizer, encoder_optimizer]
    optimizers += [extra.optimizer for extra in (reverse, patch_nce) if extra is not None]
    if 0 < options.micro_batch < real_a.shape[0]:
        return micro_batched_generator_step(
            generator, discriminator, encoder, optimizers, real_a, options, scaler=scaler,
            trainable_encoder=encoder_optimizer is not None, adaptive_lambda=adaptive_lambda, emb_src=emb_src,
            travel_queue=travel_queue, reverse=reverse, real_b=real_b, patch_nce=patch_nce,
        )  # fmt: skip
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    structure_seed = _structure_seed(options) if structure_on else None
    fake, fake_logits = translate_and_judge(generator, discriminator, real_a, options)
    emb_gen: Tensor | None = None
    tokens_src: Tensor | None = None
    tokens_gen: Tensor | None = None
    with options.autocast():
        if encoder is None:  # no term goes through E: no travel term
            pass
        elif encoder_optimizer is not None:  # one forward of the trainable embedder (one DDP call)
            emb_src, emb_gen = encoder(torch.cat([real_a, fake])).chunk(2)
        else:
            # at a fixed lambda of 0 the travel term is only logged: no graph through E
            travel_trains = adaptive_lambda is not None or options.lambda_travel != 0
            if options.views is not None:  # the same random views of x and G(x); E(views of x) without grad
                with torch.set_grad_enabled(travel_trains):
                    emb_src, emb_gen = embed_views(encoder, real_a, fake, options.views)
            elif structure_on:  # one forward gives the embeddings and the structure term's tokens
                with torch.no_grad():
                    emb_src_and_tokens = structure_features(encoder, real_a, options)
                    emb_src, tokens_src = emb_src_and_tokens if emb_src is None else (emb_src, emb_src_and_tokens[1])
                emb_gen, tokens_gen = structure_features(encoder, fake, options)
                if not travel_trains:
                    emb_gen = emb_gen.detach()
            else:
                if emb_src is None:
                    with torch.no_grad():
                        emb_src = encoder(real_a)
                with torch.set_grad_enabled(travel_trains):
                    emb_gen = encoder(fake)
            if structure_on and tokens_gen is None:  # views: the structure term on the unviewed images
                with torch.no_grad():
                    tokens_src = structure_features(encoder, real_a, options)[1]
                tokens_gen = structure_features(encoder, fake, options)[1]
    structure = None
    if tokens_src is not None and tokens_gen is not None:
        assert encoder is not None  # structure_on
        structure = StructureFeatures(tokens_src, tokens_gen, _token_grid(encoder), structure_seed)
    terms = generator_terms(
        generator, real_a, fake, fake_logits, options, reverse=reverse, real_b=real_b, patch_nce=patch_nce,
        structure=structure, lambda_structure=0.0 if adaptive_structure is not None else None,
    )  # fmt: skip
    loss, lam, logged = terms.loss, options.lambda_travel, dict[str, Any]()
    if adaptive_structure is not None and terms.structure is not None:
        lam_structure = adaptive_structure.update(terms.adversarial, terms.structure)
        loss = loss + lam_structure * terms.structure
        logged["lambda_structure"] = lam_structure
    if emb_src is not None and emb_gen is not None:
        emb_src = all_gather_with_grad(_at_least_float32(emb_src))
        emb_gen = all_gather_with_grad(_at_least_float32(emb_gen))
        travel = travel_term(emb_src, emb_gen, options) if travel_queue is None else travel_queue(emb_src, emb_gen)
        lam = options.lambda_travel if adaptive_lambda is None else adaptive_lambda.update(terms.adversarial, travel)
        loss = loss + lam * travel
        if encoder_optimizer is not None:
            loss = loss + lam * siamese_margin_loss(emb_src, options.siamese_margin, check_finite=False)
        logged["loss_travel"] = travel.detach()
    _backward_and_step(loss, optimizers, _parameters(optimizers), scaler)
    return {
        "loss_g": loss.detach(),
        "loss_adv": terms.adversarial.detach(),
        **logged,
        "lambda": lam,
        "fake": fake.detach(),
        **terms.reported,
    }


def micro_batched_generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    encoder: nn.Module | None,
    optimizers: Sequence[torch.optim.Optimizer],
    real_a: Tensor,
    options: StepOptions,
    *,
    scaler: torch.amp.GradScaler | None = None,
    trainable_encoder: bool = False,
    adaptive_lambda: AdaptiveLambda | None = None,
    emb_src: Tensor | None = None,
    travel_queue: TravelQueue | None = None,
    reverse: ReverseDirection | None = None,
    real_b: Tensor | None = None,
    patch_nce: PatchNCE | None = None,
) -> dict[str, Any]:
    r""":func:`generator_step` in chunks of ``options.micro_batch`` images, with the same gradient.

    The gradient-cache technique (:mod:`travel_loss.gradcache`; Gao et al., 2021):

    1. E(x) and E(G(x)) of the whole batch, chunk by chunk, without graphs (averaged over the
       views drawn once for the whole batch, with ``options.views``);
    2. the travel loss of the global batch (all ranks' rows) and its gradient
       :math:`\gamma = \partial L_\mathrm{travel} / \partial E(G(x))` (and with respect to E(x) for
       the trainable embedder, whose margin loss joins the travel loss here);
    3. per chunk c of m of the n images: G, D and E again with graphs (and with a structure term
       E's tokens of the chunk's x and G(x), at the positions drawn once for the batch), and one backward of
       :math:`\frac{m}{n} T(c) + \lambda \sum_{i \in c} \langle E(G(x_i)), \gamma_i \rangle`, where T(c) are
       the chunk's :func:`generator_terms` (the adversarial term and any baseline's). They are
       means over images, so the chunk terms sum to the batch's; CycleGAN's and CUT's terms take
       the same chunk of ``real_b``, and PatchNCE the same patch locations in every chunk.

    Memory: one chunk's activations; cost: one more forward of G and E per image. Under DDP only
    the last chunk's backward reduces gradients across ranks (``no_sync`` before it).

    With an ``adaptive_lambda`` on a step where it computes, lambda is known only once every
    chunk is done: each chunk then back-propagates T(c) into ``.grad`` and its travel term into
    a separate buffer (one more backward through G per chunk), the gradient norms at the
    balanced parameter come from the adversarial and travel sums, and ``.grad`` becomes
    T + lambda * travel (averaged across ranks by hand under DDP).
    ``optimizers``: G's, then the trainable encoder's, G_BA's, the PatchNCE heads'. The random
    draws of ``options.augment`` differ from those of the whole-batch step (same distribution),
    the rest is the same update.
    """
    chunk_size, n = options.micro_batch, real_a.shape[0]
    parameters = _parameters(optimizers)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    structure_seed = _structure_seed(options) if options.structure_on else None  # drawn first, as in generator_step
    views = None if trainable_encoder else options.views
    draws = [views.draw(real_a) for _ in range(views.count)] if views is not None else []

    def embed(images: Tensor, rows: Tensor) -> Tensor:
        """E of (m, 3, H, W) ``images``, rows ``rows`` of the batch: averaged over their views."""
        assert encoder is not None  # called only with one
        if views is None:
            return encoder(images)
        per_view = encoder(torch.cat([views.apply(images, _draw_rows(draw, rows)) for draw in draws]))
        return torch.stack(per_view.chunk(len(draws))).mean(dim=0)

    batch_rows = torch.arange(n, device=real_a.device)
    emb_gen: Tensor | None = None
    if encoder is not None:  # else no term goes through E: no travel term
        with options.autocast():
            if emb_src is None:
                emb_src = embed_in_chunks(lambda rows: embed(real_a[rows], rows), batch_rows, chunk_size)
            emb_gen = embed_in_chunks(lambda rows: embed(generator(real_a[rows]), rows), batch_rows, chunk_size)
        emb_src, emb_gen = _at_least_float32(emb_src), _at_least_float32(emb_gen)
    # a gradient balance on a step where it computes needs the two gradient norms at its parameter
    balanced = (
        adaptive_lambda
        if isinstance(adaptive_lambda, GradientBalancedLambda) and adaptive_lambda.computes_next
        else None
    )
    separate = balanced is not None
    lam = options.lambda_travel
    if adaptive_lambda is not None and not separate:
        lam = adaptive_lambda.update_from_norms(None, None)

    def objective(src: Tensor, gen: Tensor) -> Tensor:
        travel = travel_term(src, gen, options) if travel_queue is None else travel_queue(src, gen)
        if trainable_encoder:
            travel = travel + siamese_margin_loss(src, options.siamese_margin, check_finite=False)
        return travel

    objective_value: Tensor | None = None
    grad_gen: Tensor | None = None
    grad_src: Tensor | None = None
    if emb_src is not None and emb_gen is not None:
        objective_value, grad_gen, grad_src = travel_loss_and_embedding_grads(
            emb_src, emb_gen, loss_fn=objective, src_grad=trainable_encoder, global_batch=True
        )
    nce_locations = None
    if patch_nce is not None:  # one draw for the whole batch, as the whole-batch step makes
        with torch.no_grad(), options.autocast():
            nce_locations = sample_locations(_plain(generator).encoder_features(real_a[:1]), options.nce_patches)
    scaled = scaler.scale if scaler is not None and scaler.is_enabled() else (lambda t: t)
    totals: dict[str, Tensor] = {}
    fakes, fakes_a = [], []
    travel_grads: list[Tensor | None] = [None] * len(parameters)
    adversarial_at: Tensor | None = None  # d(adversarial)/d(balanced parameter), when .grad holds more terms
    travel_trains = separate or lam != 0  # with a frozen E and lambda 0, no graph through E
    trained_modules = (
        generator,
        encoder if trainable_encoder else None,
        reverse.generator if reverse is not None else None,
        patch_nce.heads if patch_nce is not None else None,
    )
    chunks = batch_rows.split(chunk_size)
    for index, rows in enumerate(chunks):
        x, weight = real_a[rows], rows.numel() / n
        with _no_sync_unless(index == len(chunks) - 1 and not separate, *trained_modules):
            fake, fake_logits = translate_and_judge(generator, discriminator, x, options)
            with options.autocast():
                if grad_src is not None:  # the trainable encoder
                    assert encoder is not None and grad_gen is not None  # computed with grad_src
                    embedded, grad = encoder(torch.cat([x, fake])), torch.cat([grad_src[rows], grad_gen[rows]])
                elif travel_trains:
                    assert grad_gen is not None  # lambda other than 0: an encoder (_check_step_arguments)
                    embedded, grad = embed(fake, rows), grad_gen[rows]
            structure = None
            if options.structure_on:  # the chunk's tokens; the same positions in every chunk (one seed)
                assert encoder is not None  # checked by generator_step
                with options.autocast():
                    with torch.no_grad():
                        tokens_x = structure_features(encoder, x, options)[1]
                    tokens_fake = structure_features(encoder, fake, options)[1]
                structure = StructureFeatures(tokens_x, tokens_fake, _token_grid(encoder), structure_seed)
            terms = generator_terms(
                generator, x, fake, fake_logits, options, reverse=reverse,
                real_b=real_b[rows] if real_b is not None else None, patch_nce=patch_nce, nce_locations=nce_locations,
                structure=structure,
            )  # fmt: skip
            chunk_loss = terms.loss * weight
            if balanced is not None:
                torch.autograd.backward(scaled(chunk_loss), inputs=parameters, retain_graph=True)
                if terms.loss is not terms.adversarial:  # .grad holds more than the adversarial term
                    (at,) = torch.autograd.grad(
                        scaled(terms.adversarial * weight), balanced.parameter, retain_graph=True
                    )
                    adversarial_at = _add(adversarial_at, at)
                chunk_grads = torch.autograd.grad(
                    embedded, parameters, scaled(grad).to(embedded.dtype), allow_unused=True
                )
                travel_grads = [_add(total, g) for total, g in zip(travel_grads, chunk_grads)]
            elif trainable_encoder or travel_trains:
                backward_chunk(embedded, scaled(lam * grad), scaled(chunk_loss), inputs=parameters)
            else:  # a fixed lambda of 0: the travel term was only logged
                torch.autograd.backward(scaled(chunk_loss), inputs=parameters)
        for key, value in {"loss_terms": chunk_loss, "loss_adv": terms.adversarial * weight}.items():
            totals[key] = totals.get(key, 0) + value.detach()
        for key, value in terms.reported.items():
            if key == "fake_a":
                fakes_a.append(value)
            else:
                totals[key] = totals.get(key, 0) + value * weight
        fakes.append(fake.detach())
    if balanced is not None:
        lam = _combine_balanced(balanced, parameters, travel_grads, trained_modules, adversarial_at)
    _optimizer_step(optimizers, scaler)
    travel = objective_value
    if trainable_encoder and emb_src is not None and emb_gen is not None:  # the travel term alone, as in generator_step
        with torch.no_grad():
            travel = travel_term(all_gather_with_grad(emb_src), all_gather_with_grad(emb_gen), options)
    loss_terms = totals.pop("loss_terms")
    return {
        "loss_g": loss_terms if objective_value is None else loss_terms + lam * objective_value,
        **({} if travel is None else {"loss_travel": travel}),
        "lambda": lam,
        "fake": torch.cat(fakes),
        **totals,
        **({"fake_a": torch.cat(fakes_a)} if fakes_a else {}),
    }


def _draw_rows(draw: ViewDraw, rows: Tensor) -> ViewDraw:
    """The part of a batch's view draw that belongs to ``rows`` of the batch."""
    return ViewDraw(**{f.name: None if (v := getattr(draw, f.name)) is None else v[rows] for f in fields(draw)})


def _add(total: Tensor | None, value: Tensor | None) -> Tensor | None:
    if value is None:
        return total
    return value if total is None else total.add_(value)


def _combine_balanced(
    adaptive_lambda: GradientBalancedLambda,
    parameters: list[Tensor],
    travel_grads: list[Tensor | None],
    modules: Sequence[nn.Module | None],
    adversarial_at: Tensor | None = None,
) -> float:
    """lambda from the norms at the balanced parameter of the adversarial gradient (``.grad``, or
    ``adversarial_at`` when ``.grad`` holds other terms too) and of ``travel_grads``; then ``.grad``
    += lambda * travel, averaged across ranks for DDP modules."""
    position = next((i for i, p in enumerate(parameters) if p is adaptive_lambda.parameter), None)
    if position is None:
        raise ValueError("adaptive_lambda: its parameter is not among the trained parameters of this step")
    if adversarial_at is None:
        adversarial_at = parameters[position].grad
    travel_at = travel_grads[position]
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
    r"""One discriminator update on real target images ``real_b`` and translations ``fake_b`` (both (n, 3, H, W)).

    Real and fake go through D as one batch (one call of a DDP module; D has no batch
    statistics, so this equals two calls), each augmented by the same policy.

    ``options.r1_gamma`` = :math:`\gamma > 0` adds the R1 penalty on the (augmented) real images,
    :math:`\frac{\gamma}{2}\, \mathrm{mean}_i \lVert \nabla_x \textstyle\sum D(x_i) \rVert^2`
    (the gradient of the sum of x_i's patch logits; Mescheder et al., "Which Training Methods for
    GANs do actually Converge?", 2018), logged as ``"r1"`` (the mean squared gradient norm);
    ``"loss_d"`` stays the adversarial loss alone.
    """
    optimizer.zero_grad(set_to_none=True)
    fake_b = fake_b.detach().to(real_b.dtype)  # an autocast G(x) would otherwise recompile a compiled D
    if options.augment:
        real_b, fake_b = diff_augment(real_b, options.augment), diff_augment(fake_b, options.augment)
    if options.r1_gamma:
        real_b = real_b.detach().requires_grad_(True)
    with options.autocast():
        logits = discriminator(torch.cat([real_b, fake_b]))
    real_logits, fake_logits = logits.split([real_b.shape[0], fake_b.shape[0]])
    loss = discriminator_adversarial_loss(real_logits, fake_logits, options.gan_loss)
    total, extra = loss, {}
    if options.r1_gamma:
        (gradient,) = torch.autograd.grad(_at_least_float32(real_logits).sum(), real_b, create_graph=True)
        squared_norm = _at_least_float32(gradient).square().flatten(1).sum(1).mean()
        total = loss + 0.5 * options.r1_gamma * squared_norm
        extra["r1"] = squared_norm.detach()
    _backward_and_step(total, [optimizer], _parameters([optimizer]), scaler)
    return {
        "loss_d": loss.detach(),
        "d_real": real_logits.detach().float().mean(),
        "d_fake": fake_logits.detach().float().mean(),
        "d_gap": discriminator_gap(real_logits, fake_logits, options.gan_loss),
        **extra,
    }
