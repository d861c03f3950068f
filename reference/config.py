"""The options of a reference training run: :class:`TrainConfig` and its validation.

One dataclass field per option; ``reference/train.py``'s command line maps one flag to each
field (``--g-width`` -> ``g_width``) and uses the comment after a field as the flag's help.
:func:`check_config` rejects a bad value with a ValueError naming the field before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reference.losses import AUGMENT_OPS, GAN_LOSSES
from reference.models import DISCRIMINATOR_NORMS, PatchDiscriminator, default_n_blocks

__all__ = [
    "AMP_MODES",
    "DEVICES",
    "ENCODER_MODES",
    "LR_CEILING",
    "PAPER_ENCODER",
    "TRAVEL_OBJECTIVES",
    "TrainConfig",
    "check_config",
    "command_line_flags",
    "encoder_needed",
    "uses_encoder",
]

PAPER_ENCODER = "openai/clip-vit-large-patch14"
ENCODER_MODES = ("clip", "random-clip", "siamese", "module")
TRAVEL_OBJECTIVES = ("paper", "notebook")
AMP_MODES = ("off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "xla")
ADAPTIVE_LAMBDAS = ("auto", "balance")  # --lambda-travel's rules besides a number
LR_CEILING = 1.0  # the largest learning rate the trainer accepts: Adam steps of this size already diverge


@dataclass
class TrainConfig:
    """Every option of a run; the command line maps one flag to each field (``--g-width`` -> g_width)."""

    # data: a CycleGAN-layout root (trainA/, trainB/) or two folders
    data: str | None = None  # a CycleGAN-layout root with trainA/ and trainB/
    data_a: str | None = None  # a folder of source-domain images (with --data-b)
    data_b: str | None = None  # a folder of target-domain images
    size: int = 256  # images are resized to size x size
    flip: bool = True  # random horizontal flips of training images
    num_workers: int | None = None  # None: min(4, cpus)

    # objective
    lambda_travel: float | str = "auto"  # a number; "auto": DiscriminatorGapLambda; "balance": GradientBalancedLambda
    lambda_auto_gap: float = 0.5  # "auto": the discriminator gap (0: fooled, 1: never) lambda steers towards
    lambda_auto_initial: float = 3.0  # "auto": lambda for the first fifth of the steps, where the rule starts
    lambda_auto_scale: float = 1.0  # "balance": wanted ratio of travel to adversarial gradient norm
    lambda_auto_momentum: float = 0.9  # "balance": moving-average momentum of the gradient ratio
    travel_objective: str = "paper"  # "paper": equation 2; "notebook": the original code's variant
    travel_distance: str = "cosine"  # travel_loss distance: cosine | squared_euclidean | travelgan
    travel_reduction: str = "mean"  # mean | sum over the N(N-1) pairs (lambda conventions: docs/api.md)
    travel_queue: int = 0  # K > 0: also pair with the last K rows of earlier batches (travel_loss.TravelQueue)
    travel_views: int = 0  # > 0: E averaged over this many shared random views of x and G(x) (0: the images)
    travel_view_transforms: str = "shift=2,blur=0.5,noise=0.1"  # with travel_views: travel_loss.RandomViews.parse
    lambda_structure: float | str = 0.0  # > 0 or "auto": + lambda * self-similarity loss on E's spatial tokens
    structure_window: int = 0  # structure term: 0 global self-similarity (Splice), w odd: w x w windows (F-LSeSim)
    structure_positions: int = 0  # structure term: rows (window centres) sampled per step; 0: every one
    structure_layer: int | None = None  # structure term: E's hidden_states[k] as tokens (None: its last_hidden_state)
    gan_loss: str = "bce"  # bce (non-saturating) | lsgan | hinge
    augment: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"
    r1_gamma: float = 0.0  # > 0: D's R1 penalty (gamma / 2) E|grad_x D(x)|^2 on real images (Mescheder et al. 2018)
    lambda_identity: float = 0.0  # baseline: CycleGAN's identity term, + lambda_identity * mean |G(x) - x|
    lambda_cycle: float = 0.0  # > 0: the CycleGAN baseline (G_BA, D_A, cycle terms of this weight; CycleGAN: 10)
    lambda_cycle_identity: float = 0.5  # with lambda_cycle: CycleGAN's identity terms weigh lambda_cycle * this
    lambda_nce: float = 0.0  # > 0: the CUT baseline, PatchNCE on G's encoder features, this weight (CUT 1, FastCUT 10)
    nce_idt: bool = True  # with lambda_nce: also PatchNCE on (y, G(y)), the two averaged (CUT: on, FastCUT: off)
    nce_patches: int = 256  # with lambda_nce: patch locations sampled per layer (all where a layer has fewer)
    nce_temperature: float = 0.07  # with lambda_nce: temperature tau of the PatchNCE softmax
    nce_dim: int = 256  # with lambda_nce: width of the MLP heads and of the patch embeddings (CUT: 256)

    # encoder E
    encoder: str | None = None  # CLIP hub id or local folder (None: the paper's ViT-L/14); module mode: FILE.py:FACTORY
    encoder_mode: str = "clip"  # clip | random-clip (the ablation) | siamese (TraVeLGAN) | module (your own)
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
    d_norm: str = "instance"  # the PatchGAN's norm: instance (CycleGAN) | none (StyleGAN-style, with --r1-gamma)

    # optimisation
    steps: int = 20_000  # training iterations (one G and one D update each)
    batch_size: int = 16  # per process; the travel loss sees batch_size * world_size images
    micro_batch: int = 0  # > 0: the generator step in chunks of this many images, same gradient (0: off)
    lr: float = 2e-4  # generator learning rate
    lr_d: float | None = None  # None: 2 * lr
    beta1: float = 0.5  # Adam beta1 of every optimizer
    beta2: float = 0.999  # Adam beta2 of every optimizer
    decay_steps: int = 0  # linear decay of both learning rates to 0 over the last decay_steps
    g_ema: float = 0.0  # > 0: keep an EMA of G's weights, this decay (e.g. 0.999); samples, translate use it

    # engineering
    device: str = "auto"  # auto | cpu | cuda | xla
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    compile: bool = False  # torch.compile G, D and the encoder forward
    compile_backend: str = "inductor"  # torch.compile backend (inductor; eager or aot_eager to debug)
    channels_last: bool = False  # channels-last memory format (pays under --compile on CUDA)
    seed: int = 0  # draws the initial weights, the data order and every random choice of the run

    # output
    out: str = "runs/cliptravelgan"  # run folder: latest.pt, metrics.jsonl, samples/
    resume: bool = False  # continue from OUT/latest.pt
    resume_from: str | None = None  # continue from this checkpoint file instead (e.g. OUT/step_001000.pt)
    max_unreadable_fraction: float = 0.05  # stop (after a checkpoint) when more of the image files fail to decode
    log_every: int = 50  # steps between metric lines (the only host syncs)
    sample_every: int = 500  # steps between input | translation PNG grids
    sample_count: int = 8  # source images in each sample grid
    checkpoint_every: int = 1000  # steps between atomic checkpoints
    keep_checkpoints: int = 0  # also keep the last K checkpoints as step_XXXXXX.pt

    @property
    def discriminator_lr(self) -> float:
        return 2 * self.lr if self.lr_d is None else self.lr_d

    @property
    def generator_blocks(self) -> int:
        return default_n_blocks(self.size) if self.g_blocks is None else self.g_blocks

    @property
    def encoder_name(self) -> str:
        """``encoder``, or the paper's CLIP checkpoint when none is named."""
        return PAPER_ENCODER if self.encoder is None else self.encoder


def encoder_needed(config: TrainConfig) -> bool:
    """Whether a term of L_G goes through the encoder E: the travel term (``lambda_travel`` other
    than 0, or ``"auto"``) and the structure term (``lambda_structure`` likewise). A term that needs E
    joins this condition."""
    return config.lambda_travel != 0 or config.lambda_structure != 0


def uses_encoder(config: TrainConfig) -> bool:
    """Whether the run builds E: a term needs it (:func:`encoder_needed`), or the user named one
    (``encoder``, or an ``encoder_mode`` other than the default ``"clip"``), whose travel
    consistency is then logged even at ``lambda_travel`` 0."""
    return encoder_needed(config) or config.encoder is not None or config.encoder_mode != "clip"


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

    def number(name: str, expected: str, within: Callable[[float], bool]) -> None:
        value = getattr(config, name)
        numeric = not isinstance(value, bool) and isinstance(value, (int, float))
        if not (numeric and math.isfinite(value) and within(value)):
            fail(name, expected)

    sources = [config.data is not None, config.data_a is not None or config.data_b is not None]
    if sum(sources) != 1:
        raise ValueError(
            "data: give exactly one of data (a CycleGAN-layout root) or data_a and data_b (two folders); "
            f"got data={config.data!r}, data_a={config.data_a!r}, data_b={config.data_b!r}"
        )
    if (config.data_a is None) != (config.data_b is None):
        raise ValueError(f"data_a, data_b: give both folders, got data_a={config.data_a!r}, data_b={config.data_b!r}")
    positive_int("size", 8)
    if config.size % 4:
        fail("size", "a multiple of 4 (the generator downsamples twice)")
    if config.num_workers is not None:
        positive_int("num_workers", 0)
    lam = config.lambda_travel
    if lam not in ADAPTIVE_LAMBDAS and (
        isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or not math.isfinite(lam)
    ):
        fail("lambda_travel", "a finite number >= 0, 'auto' or 'balance'")
    number("lambda_auto_gap", "a number in (0, 1)", lambda v: 0 < v < 1)
    number("lambda_auto_initial", "a number in [1e-4, 1e4]", lambda v: 1e-4 <= v <= 1e4)
    if config.lambda_structure != "auto":
        number("lambda_structure", "a finite number >= 0 or 'auto'", lambda v: v >= 0)
    for name in ("lambda_identity", "lambda_cycle", "lambda_cycle_identity", "r1_gamma", "lambda_nce"):
        number(name, "a finite number >= 0", lambda v: v >= 0)
    for name in ("lambda_auto_scale", "siamese_margin", "nce_temperature"):
        number(name, "a finite number > 0", lambda v: v > 0)
    number("lr", f"a number in (0, {LR_CEILING:g}]", lambda v: 0 < v <= LR_CEILING)
    if config.lr_d is not None:
        number("lr_d", f"None (twice lr) or a number in (0, {LR_CEILING:g}]", lambda v: 0 < v <= LR_CEILING)
    for name in ("lambda_auto_momentum", "beta1", "beta2", "g_ema"):
        number(name, "a number in [0, 1)", lambda v: 0 <= v < 1)
    choice("travel_objective", TRAVEL_OBJECTIVES)
    choice("travel_distance", ("cosine", "squared_euclidean", "travelgan"))
    choice("travel_reduction", ("mean", "sum"))
    if config.travel_objective == "notebook" and (config.travel_distance, config.travel_reduction) != (
        "cosine",
        "mean",
    ):
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
    if config.r1_gamma and config.compile:
        fail("r1_gamma", "0 with compile (R1 differentiates D's input gradient; torch.compile has no double backward)")
    if config.r1_gamma and config.amp == "fp16":
        fail("r1_gamma", "0 with amp 'fp16' (untested under the float16 gradient scaler; use amp 'bf16' or 'off')")
    choice("d_norm", DISCRIMINATOR_NORMS)
    choice("encoder_mode", ENCODER_MODES)
    if config.encoder_mode == "module" and ":" not in str(config.encoder):
        fail("encoder", "FILE.py:FACTORY or package.module:FACTORY with encoder_mode='module'")
    choice("crop", ("center", "resize", "full"))
    choice("features", ("pooled", "projected"))
    for name in ("siamese_width", "siamese_dim", "g_width", "d_width", "d_layers", "steps", "batch_size"):
        positive_int(name)
    positive_int("travel_queue", 0)
    if config.travel_queue and (config.travel_objective != "paper" or config.encoder_mode == "siamese"):
        fail(
            "travel_queue",
            "0 with travel_objective 'notebook' or encoder_mode 'siamese' (queued rows need a frozen encoder)",
        )
    if config.batch_size < 2 and not config.travel_queue:
        fail("batch_size", "an int >= 2 (the travel loss compares pairs), or any with travel_queue > 0")
    positive_int("micro_batch", 0)
    positive_int("structure_window", 0)
    if config.structure_window and config.structure_window % 2 == 0:
        fail("structure_window", "0 (global) or an odd window side (3, 5, ...)")
    positive_int("structure_positions", 0)
    if config.structure_layer is not None and (
        isinstance(config.structure_layer, bool) or not isinstance(config.structure_layer, int)
    ):
        fail("structure_layer", "None or an int index into the encoder's hidden_states")
    if config.lambda_structure:
        if config.encoder_mode == "siamese":
            fail("lambda_structure", "0 with encoder_mode siamese (the structure term needs a frozen encoder)")
        if config.lambda_structure == "auto" and config.micro_batch:
            fail("lambda_structure", "a number with micro_batch > 0 ('auto' balances whole-batch gradients)")
    positive_int("travel_views", 0)
    if config.travel_views:
        from travel_loss import RandomViews

        try:
            RandomViews.parse(config.travel_view_transforms)
        except (TypeError, ValueError) as error:
            fail("travel_view_transforms", f"a view spec such as 'shift=2,blur=0.5,noise=0.1' ({error})")
        if config.encoder_mode == "siamese":
            fail("travel_views", "0 with encoder_mode siamese (views are for a frozen encoder)")
    if not isinstance(config.nce_idt, bool):
        fail("nce_idt", "True or False")
    positive_int("nce_patches")
    positive_int("nce_dim")
    if config.g_blocks is not None:
        positive_int("g_blocks", 0)
    probe = PatchDiscriminator(3, width=1, n_layers=config.d_layers)
    if probe.output_size(config.size) < 1:
        smallest = next(s for s in range(4, 4096, 4) if probe.output_size(s) >= 1)
        fail(
            "size",
            f"a size of at least {smallest} for a discriminator with d_layers={config.d_layers} (or fewer d_layers)",
        )
    positive_int("decay_steps", 0)
    if config.decay_steps > config.steps:
        fail("decay_steps", f"an int <= steps = {config.steps}")
    choice("device", DEVICES)
    choice("amp", AMP_MODES)
    if config.amp == "fp16" and config.device in ("cpu", "xla"):
        fail("amp", f"'off' or 'bf16' on device {config.device!r}: float16 autocast needs CUDA (use bf16)")
    positive_int("seed", 0)
    if config.seed >= 2**64:
        fail("seed", "an int in [0, 2**64) (torch's generators take 64 bits)")
    for name in ("log_every", "sample_every", "checkpoint_every", "sample_count"):
        positive_int(name)
    positive_int("keep_checkpoints", 0)
    if not config.out:
        fail("out", "an output folder")
    number("max_unreadable_fraction", "a number in [0, 1]", lambda v: 0 <= v <= 1)


def command_line_flags(fields: Mapping[str, Any]) -> list[str]:
    """``reference/train.py``'s flags for TrainConfig field values: ``--name VALUE`` (floats
    written exactly), ``--name`` / ``--no-name`` for True / False; None is left out."""
    flags: list[str] = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags
