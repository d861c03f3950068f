r"""A frozen CLIP image encoder to put between a generator and :func:`travel_loss`, and an ensemble.

The encoder maps a batch of images in the generator's value range to CLIP image embeddings,

.. math::  E(x) = f_\theta\Bigl(\frac{P(x) - lo}{(hi - lo)\,\sigma} - \frac{\mu}{\sigma}\Bigr),

where :math:`P` is a crop and/or resize to the model's ``image_size`` (the *crop policy*),
``(lo, hi)`` the ``input_range``, :math:`\mu, \sigma` CLIP's per-channel mean and std, and
:math:`f_\theta` the frozen vision tower. Every step is a differentiable torch op, so gradients
reach the images, and no parameter ever requires a gradient.

Why the weights are not part of a parent's ``state_dict``: a generator that holds the encoder
would otherwise save (and require on load) the 1.2 GB of ViT-L/14 with every checkpoint. The
transformers model is kept *outside* the registered-module tree, as a plain attribute, so that

- ``state_dict()``, ``load_state_dict()``, ``parameters()`` and ``apply()`` of a parent never see
  it (an optimizer built from ``generator.parameters()`` cannot touch it; ``init_weights`` cannot
  re-initialise it);
- ``parent.train()`` cannot switch it out of eval mode (and :meth:`FrozenCLIPEncoder.train`
  keeps the wrapper itself in eval mode);
- ``parent.to(device)``, ``.cuda()``, ``.half()``, ``.to(dtype)`` still move and cast it, because
  :meth:`FrozenCLIPEncoder._apply` forwards them.

The wrapped model stays reachable as :attr:`FrozenCLIPEncoder.model`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CheckpointNotFoundError",
    "EncoderEnsemble",
    "FrozenCLIPEncoder",
    "FrozenEncoder",
]

Crop = Literal["center", "resize", "full"]
Features = Literal["pooled", "projected"]

CROPS: tuple[str, ...] = ("center", "resize", "full")
FEATURES: tuple[str, ...] = ("pooled", "projected")

# The fallback normalisation for checkpoints without a preprocessor_config.json (OpenAI's CLIP).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# How far (as a fraction of hi - lo) images may stray outside input_range before it is an error.
RANGE_TOLERANCE = 0.01

# Keyword arguments of from_pretrained that also locate preprocessor_config.json.
_HUB_LOOKUP_KEYS = ("cache_dir", "revision", "local_files_only", "token", "subfolder", "proxies")

# A resize target: an int is the shortest edge (aspect ratio kept), a pair is (height, width).
ResizeSize = int | tuple[int, int]
# A checkpoint's preprocessor_config.json, as read by json.load ({} where it has none).
ProcessorConfig = dict[str, Any]
# What names a checkpoint: a hub id or a folder.
ModelSource = str | os.PathLike[str]


class CheckpointNotFoundError(FileNotFoundError):
    """The weights of a CLIP checkpoint are neither in a local folder nor in the local HF cache."""


class FrozenEncoder(nn.Module):
    r"""Any frozen image backbone: (N, 3, H, W) images in ``input_range`` -> (N, D) embeddings.

    Args:
        model: one of

            - a hub id or a folder written by ``save_pretrained`` of a transformers vision
              backbone, chosen by the ``model_type`` of its ``config.json``: CLIP (``clip``,
              ``clip_vision_model``), SigLIP and fixed-resolution SigLIP 2 (``siglip``,
              ``siglip_vision_model``), DINOv2 (``dinov2``, ``dinov2_with_registers``), DINOv3
              (``dinov3_vit``) and ViT (``vit``). Image size, mean, std and resampling come from
              the checkpoint's own ``preprocessor_config.json`` (a checkpoint without one needs
              explicit ``mean`` and ``std``, except CLIP, which falls back to OpenAI's constants
              as :class:`FrozenCLIPEncoder` does). NaFlex SigLIP 2 (``siglip2``) takes
              variable-length patch sequences and is refused;
            - a transformers model instance of one of those families (no preprocessor config
              travels with an instance: ``mean`` and ``std`` are required, except for CLIP;
              ``image_size`` defaults to ``config.image_size``);
            - any other ``nn.Module`` mapping (N, 3, S, S) normalised images to (N, D) or
              (N, \*) features (flattened to (N, D)), e.g. a timm or open_clip image tower. It
              then requires explicit ``mean``, ``std`` and ``image_size``: there is no safe
              default.

        input_range, crop, check_range: as in :class:`FrozenCLIPEncoder` (``crop="resize"``
            follows the processor: shortest edge then central crop, or a (height, width) resize
            as SigLIP's; bilinear where the processor resamples bilinearly).
        features: which output is the embedding; per family (default first):

            - CLIP: ``"pooled"`` (post-layernorm CLS), ``"projected"`` (joint-space embedding);
            - SigLIP: ``"pooled"`` (the attention-pooling head), ``"mean"`` (mean of the tokens);
            - DINOv2 / DINOv3 / ViT: ``"cls"`` (the layer-normed CLS token), ``"mean"`` (mean of
              the patch tokens, register tokens excluded);
            - a plain module: ``None`` (its output).
        mean, std, image_size: override the checkpoint's values (required as said above).
        verbose: let transformers print its loading messages and progress bars; by default
            loading prints nothing (transformers' verbosity and progress-bar setting are
            restored afterwards, so other code is unaffected).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``,
            ``local_files_only``, ``dtype``, ``token`` ...); ``trust_remote_code`` is refused.

    The weights are frozen, kept in eval mode and outside the parent's ``state_dict()`` and
    ``parameters()``, as described in the module docstring, for every family.

    Replication: under ``nn.DataParallel`` each replica runs a copy of the weights on its own
    device (made on the first call on that device and cached, so the frozen weights are not
    broadcast at every step); ``DistributedDataParallel`` needs nothing special.
    ``copy.deepcopy`` gives an independent encoder with its own copy of the weights (an EMA copy
    of a generator that holds an encoder therefore holds a second encoder: keep the encoder
    outside modules that are copied).

    Example:
        >>> encoder = FrozenEncoder("facebook/dinov2-base").to(device)       # CLS token, 224 px
        >>> encoder = FrozenEncoder(timm_model, mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224)
    """

    # Set by _setup: the backbone through object.__setattr__ (a plain attribute, not a registered
    # submodule), the normalisation as non-persistent buffers.
    _backbone: nn.Module
    _scale: Tensor
    _shift: Tensor

    if TYPE_CHECKING:
        # nn.Module.__call__ is typed (...) -> Any; calling the encoder runs forward.
        def __call__(self, images: Tensor) -> Tensor: ...

    def __init__(
        self,
        model: ModelSource | nn.Module,
        *,
        input_range: tuple[float, float] = (-1.0, 1.0),
        crop: Crop = "center",
        features: str | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        image_size: int | None = None,
        check_range: bool = True,
        verbose: bool = False,
        **from_pretrained_kwargs: Any,
    ) -> None:
        family = _family_of(model, from_pretrained_kwargs, verbose)
        if family == "clip":
            if features not in (None, *FEATURES):
                raise ValueError(
                    f"features: expected one of {', '.join(map(repr, FEATURES))} for a CLIP model, got {features!r}"
                )
            nn.Module.__init__(self)
            self._init_clip(
                model, input_range=input_range, crop=crop, features=features or "pooled", image_size=image_size,
                mean=mean, std=std, check_range=check_range, verbose=verbose,
                from_pretrained_kwargs=from_pretrained_kwargs,
            )  # fmt: skip
            return
        super().__init__()
        allowed = FAMILY_FEATURES[family]
        if features is None:
            features = allowed[0]
        if features not in allowed:
            raise ValueError(
                f"features: expected one of {', '.join(map(repr, allowed))} for a {family} model, got {features!r}"
            )
        lo, hi = _check_options(input_range, crop, "pooled", image_size, mean, std)
        processor: ProcessorConfig = {}
        config: Any
        if isinstance(model, nn.Module):
            if from_pretrained_kwargs:
                raise ValueError(
                    "from_pretrained_kwargs: only used when loading a checkpoint by id or path, got "
                    f"{sorted(from_pretrained_kwargs)} together with a model instance"
                )
            backbone, name = model, type(model).__name__
            if family == "module":
                missing = [n for n, v in (("mean", mean), ("std", std), ("image_size", image_size)) if v is None]
                if missing:
                    raise ValueError(
                        f"{', '.join(missing)}: required for a plain nn.Module ({name}), which carries no "
                        "preprocessing config; pass the mean, std and input size the model was trained with, e.g. "
                        "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), image_size=224 for ImageNet models"
                    )
                tower, config = model, None
            else:
                missing = [n for n, v in (("mean", mean), ("std", std)) if v is None]
                if missing:
                    raise ValueError(
                        f"{', '.join(missing)}: required for a {family} model instance, which carries no "
                        "preprocessor_config.json; pass the image_mean / image_std of its checkpoint's processor, "
                        "or pass the checkpoint's hub id or folder instead of the instance"
                    )
                tower, config = _family_tower(backbone, family)
        else:
            name = os.fspath(model)
            backbone, processor = _load_family(name, family, dict(from_pretrained_kwargs), verbose)
            tower, config = _family_tower(backbone, family)
            if (mean is None or std is None) and not processor:
                raise ValueError(
                    f"mean, std: {name!r} has no preprocessor_config.json to read them from; pass the mean and std "
                    "the model was trained with"
                )
        size: int
        resize_size: ResizeSize
        embedding_dim: int | None
        if config is not None:
            native_size = int(config.image_size)
            size, resize_size = _geometry(processor, native_size, image_size, family in ("vit", "siglip"))
            patch_size = getattr(config, "patch_size", None)
            if patch_size and size % patch_size:
                raise ValueError(
                    f"image_size: expected a multiple of the patch size {patch_size}, got {size} (the pixels of a "
                    "partial patch would be ignored)"
                )
            embedding_dim = int(config.hidden_size)
            interpolate = size != native_size and family in ("siglip", "vit")
        else:  # a plain module, whose image_size was checked above
            assert image_size is not None
            size, resize_size = image_size, image_size
            embedding_dim, interpolate = None, False
        self._setup(
            backbone=backbone, tower=tower, projection=None, name=name, family=family, features=features,
            input_range=(lo, hi), crop=crop, size=size, resize_size=resize_size, interpolate=interpolate,
            mean=_per_channel("mean", mean if mean is not None else _processor_mean(processor)),
            std=_per_channel("std", std if std is not None else _processor_std(processor)),
            check_range=check_range, embedding_dim=embedding_dim, resample=_processor_resample(processor),
            patch_start=1 + int(getattr(config, "num_register_tokens", 0) or 0) if config is not None else 1,
        )  # fmt: skip

    def _init_clip(
        self, model: ModelSource | nn.Module, *, input_range: tuple[float, float], crop: str, features: str,
        image_size: int | None, mean: float | Sequence[float] | None, std: float | Sequence[float] | None,
        check_range: bool, verbose: bool, from_pretrained_kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        """Load or wrap a CLIP model and set up the encoder (FrozenCLIPEncoder, and FrozenEncoder for CLIP)."""
        lo, hi = _check_options(input_range, crop, features, image_size, mean, std)
        processor: ProcessorConfig = {}
        if isinstance(model, nn.Module):
            if from_pretrained_kwargs:
                raise ValueError(
                    "from_pretrained_kwargs: only used when loading a checkpoint by id or path, "
                    f"got {sorted(from_pretrained_kwargs)} together with a model instance"
                )
            clip, name, has_projection = model, type(model).__name__, True
        elif isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
            clip, processor, has_projection = _load_checkpoint(name, dict(from_pretrained_kwargs), verbose)
        else:
            raise TypeError(
                f"model: expected a hub id, a folder path or a transformers CLIP model, got {type(model).__name__}"
            )
        tower, projection, vision_config = _vision_parts(clip)
        if not has_projection:
            projection = None
        if features != "projected":
            projection = None
        elif projection is None:
            raise ValueError(
                f"features: 'projected' needs a visual projection, and {name!r} has none (a "
                "CLIPVisionModel checkpoint); use features='pooled' or a "
                "CLIPVisionModelWithProjection"
            )
        native_size = int(vision_config.image_size)
        size, resize_size = _geometry(processor, native_size, image_size)
        patch_size = getattr(vision_config, "patch_size", None)
        if patch_size and size % patch_size:
            raise ValueError(
                f"image_size: expected a multiple of the patch size {patch_size}, got {size} (the "
                "pixels of a partial patch would be ignored)"
            )
        self._setup(
            backbone=clip, tower=tower, projection=projection, name=name, family="clip", features=features,
            input_range=(lo, hi), crop=crop, size=size, resize_size=resize_size, interpolate=size != native_size,
            mean=_per_channel("mean", mean if mean is not None else _processor_mean(processor)),
            std=_per_channel("std", std if std is not None else _processor_std(processor)),
            check_range=check_range,
            embedding_dim=int(vision_config.hidden_size) if projection is None else projection.out_features,
        )  # fmt: skip

    def _setup(
        self, *, backbone: nn.Module, tower: nn.Module, projection: nn.Module | None, name: str, family: str,
        features: str, input_range: tuple[float, float], crop: str, size: int, resize_size: ResizeSize,
        interpolate: bool, mean: tuple[float, float, float], std: tuple[float, float, float], check_range: bool,
        embedding_dim: int | None, resample: str = "bicubic", patch_start: int = 1,
    ) -> None:  # fmt: skip
        """Freeze the backbone and store everything forward needs (shared by every family)."""
        backbone.eval()
        backbone.requires_grad_(False)
        # Plain attributes, not registered submodules: see the module docstring.
        object.__setattr__(self, "_backbone", backbone)
        self._tower_path = _submodule_path(backbone, tower)
        self._projection_path = None if projection is None else _submodule_path(backbone, projection)
        self._device_copies: dict[tuple[torch.device, torch.dtype], nn.Module] = {}
        self._is_replica = False
        self._name = name
        self._family = family
        self._input_range = input_range
        self._crop = crop
        self._features = features
        self._image_size = size
        self._resize_size = resize_size
        self._resample = resample
        self._interpolate_pos_encoding = interpolate
        self._patch_start = patch_start
        self._mean, self._std = mean, std
        self.check_range = check_range
        self._embedding_dim = embedding_dim
        # x -> ((x - lo) / (hi - lo) - mean) / std as one multiply-add; non-persistent buffers
        # follow .to(device) and stay out of the state_dict.
        lo, hi = input_range
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        scale = 1.0 / ((hi - lo) * std_t)
        shift = (-lo / (hi - lo) - mean_t) / std_t
        self.register_buffer("_scale", scale.view(3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(3, 1, 1), persistent=False)
        nn.Module.train(self, False)

    # ----------------------------------------------------------------------------------------
    # properties

    @property
    def model(self) -> nn.Module:
        """The wrapped model (frozen, in eval mode, not a registered submodule)."""
        return self._backbone

    @property
    def family(self) -> str:
        """``"clip"``, ``"siglip"``, ``"dinov2"``, ``"dinov3"``, ``"vit"`` or ``"module"``."""
        return self._family

    @property
    def embedding_dim(self) -> int | None:
        """D, the size of one embedding (``None`` for a plain module: known after a call)."""
        return self._embedding_dim

    @property
    def image_size(self) -> int:
        """The side of the square model input, in pixels."""
        return self._image_size

    @property
    def input_range(self) -> tuple[float, float]:
        return self._input_range

    @property
    def crop(self) -> str:
        return self._crop

    @property
    def features(self) -> str:
        return self._features

    @property
    def mean(self) -> tuple[float, float, float]:
        return self._mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self._std

    # ----------------------------------------------------------------------------------------
    # computation

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) images in ``input_range`` -> (N, 3, S, S) normalised model pixel values.

        S = :attr:`image_size`. Differentiable; float16/bfloat16 images are resized in float32
        (CPU bicubic kernels lack them). Raises ``ValueError`` on bad images (see
        :meth:`forward`).
        """
        self._check_images(images)
        if self._crop == "center":
            x = _center_crop(images, self._image_size)
        elif self._crop == "full":
            x = _resize(images, (self._image_size, self._image_size), self._resample)
        else:
            height, width = images.shape[-2:]
            x = _resize(images, _resized_shape(height, width, self._resize_size), self._resample)
            x = _center_crop(x, self._image_size)
        return x * self._scale.to(x.dtype) + self._shift.to(x.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) floating-point images in ``input_range`` -> (N, D) embeddings.

        Raises:
            TypeError: ``images`` is not a tensor.
            ValueError: not 4-D, not 3 channels, an empty batch, an integer/bool dtype, values
                outside ``input_range`` by more than ``RANGE_TOLERANCE`` of its width (also NaN),
                or, with ``crop="center"``, images smaller than :attr:`image_size`.
        """
        pixel_values = self.preprocess(images)
        backbone = self._backbone_for(pixel_values.device)
        pixel_values = pixel_values.to(_weight_dtype(backbone))
        tower = backbone.get_submodule(self._tower_path)
        embeddings: Tensor
        if self._family == "module":
            embeddings = tower(pixel_values).flatten(1)
            return embeddings
        extra = {"interpolate_pos_encoding": True} if self._interpolate_pos_encoding else {}
        output = tower(pixel_values=pixel_values, **extra)
        if self._features == "mean":
            start = self._patch_start if self._family in ("vit", "dinov2", "dinov3") else 0
            embeddings = output.last_hidden_state[:, start:].mean(dim=1)
        elif self._family == "vit":
            embeddings = output.last_hidden_state[:, 0]
        elif self._projection_path is None:
            embeddings = output.pooler_output
        else:
            embeddings = backbone.get_submodule(self._projection_path)(output.pooler_output)
        return embeddings

    # ----------------------------------------------------------------------------------------
    # nn.Module plumbing for the unregistered model

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FrozenEncoder:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch
        if recurse:
            self._backbone._apply(fn)
            self._device_copies.clear()
        return self

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stays in eval mode whatever ``mode`` says: the encoder is frozen."""
        return super().train(False)

    def _replicate_for_data_parallel(self) -> FrozenEncoder:
        # nn.DataParallel copies registered parameters to each device, never plain attributes;
        # a replica therefore fetches (and caches) a copy of the backbone on its input's device.
        replica: FrozenEncoder = super()._replicate_for_data_parallel()  # type: ignore[no-untyped-call]  # as _apply
        replica._is_replica = True
        return replica

    def _backbone_for(self, device: torch.device) -> nn.Module:
        """The backbone itself, or for a DataParallel replica on another device a cached copy there."""
        backbone = self._backbone
        own = _weight_device(backbone)
        if not self._is_replica or own is None or device == own:
            return backbone
        key = (device, _weight_dtype(backbone))
        with _DEVICE_COPIES_LOCK:
            copy_on_device = self._device_copies.get(key)
            if copy_on_device is None:
                copy_on_device = copy.deepcopy(backbone).to(device)
                self._device_copies[key] = copy_on_device
        return copy_on_device

    def extra_repr(self) -> str:
        return (
            f"model={self._name!r}, family={self._family!r}, crop={self._crop!r}, features={self._features!r}, "
            f"image_size={self._image_size}, embedding_dim={self._embedding_dim}, "
            f"input_range={self._input_range} (frozen; weights not in state_dict)"
        )

    # ----------------------------------------------------------------------------------------
    # internals

    def _weight_dtype(self) -> torch.dtype:
        return _weight_dtype(self._backbone)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(
                "images: expected an (N, 3, H, W) batch of RGB images, got a "
                f"{images.dim()}-D tensor of shape {tuple(images.shape)}"
            )
        if images.shape[1] != 3:
            raise ValueError(
                "images: expected 3 (RGB) channels in an (N, 3, H, W) batch, got "
                f"{images.shape[1]} channels in shape {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError("images: expected at least one image, got an empty batch")
        if not images.is_floating_point():
            lo, hi = self._input_range
            raise ValueError(
                f"images: expected a floating-point tensor with values in input_range=({lo:g}, "
                f"{hi:g}), got dtype {images.dtype}; convert 8-bit images with "
                "images.float() / 255 and pass input_range=(0, 1)"
            )
        height, width = images.shape[-2:]
        size = self._image_size
        if self._crop == "center" and (height < size or width < size):
            raise ValueError(
                f"images: crop='center' takes the central {size}x{size} square without resizing, "
                f"so images must be at least {size} pixels high and wide, got {height}x{width}; "
                "resize them first, or use crop='resize' or crop='full'"
            )
        if self.check_range and not torch.compiler.is_compiling():
            _check_range(images, self._input_range)


class FrozenCLIPEncoder(FrozenEncoder):
    r"""Frozen CLIP image encoder: (N, 3, H, W) images in ``input_range`` -> (N, D) embeddings.

    Args:
        model: a hub id (loaded from the local Hugging Face cache, or downloaded unless offline),
            a local folder written by ``save_pretrained``, or an already built transformers CLIP
            model (``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``; it is
            put in eval mode and frozen in place). Full ``CLIPModel`` checkpoints load too: only
            the vision tower and the visual projection are kept.
        input_range: ``(lo, hi)``, the value range of the images: ``(-1, 1)`` for a tanh
            generator (the paper), ``(0, 1)`` for one that outputs [0, 1].
        crop: how an H x W image becomes CLIP's ``image_size`` x ``image_size`` input:

            - ``"center"`` (the paper): the central square, no resizing; for 256 x 256 images and
              a 224 model exactly ``x[..., 16:240, 16:240]``, i.e. (224/256)^2 = 77 % of the
              pixels (at 512 px only 19 %). Pixels outside it get no gradient; images smaller than
              ``image_size`` are an error. Use it to reproduce the paper.
            - Recommended otherwise: ``"full"`` when every pixel should be under the loss
              (translation, where the border must not drift), ``"resize"`` to match what the
              checkpoint saw in training (its processor's resize and crop).
            - ``"resize"``: what transformers' CLIP image processor does: the shortest edge to
              the processor's size (bicubic, antialiased; the long edge floored), then the
              central crop (offsets floored). Unlike the processor, values are not rounded to
              8 bits nor clipped after resizing, so the gradient is never cut.
            - ``"full"``: the whole image resized (bicubic, antialiased) to ``image_size`` x
              ``image_size``: every pixel is under CLIP's control and receives gradient.
        features: ``"pooled"`` (the post-layernorm CLS token, what the original code used;
            D = hidden size) or ``"projected"`` (CLIP's joint-space ``image_embeds``, not
            normalised; D = projection size).
        image_size: the side of CLIP's input. Default: the processor's crop size, else the
            model's ``config.image_size``. Another size than the model's own interpolates the
            position embeddings; it must be a multiple of the patch size. Setting it also sets
            the shortest edge of ``crop="resize"``.
        mean, std: CLIP's per-channel normalisation (3 numbers each, or one for all channels).
            Default: ``image_mean``/``image_std`` of the checkpoint's ``preprocessor_config.json``,
            else :data:`OPENAI_CLIP_MEAN`/:data:`OPENAI_CLIP_STD`.
        check_range: check that the images lie in ``input_range`` (one reduction and one
            device-to-host synchronisation per call; skipped inside ``torch.compile``).
        verbose: let transformers print its loading report and progress bars (default: silent;
            transformers' own settings are restored afterwards).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``,
            ``local_files_only``, ``dtype``/``torch_dtype``, ``token`` ...). SDPA attention is
            requested unless ``attn_implementation`` is given; ``trust_remote_code`` is refused.

    Raises:
        ValueError: an invalid option; a checkpoint that is not a CLIP vision checkpoint; a
            checkpoint without a visual projection for ``features="projected"``.
        CheckpointNotFoundError: (a ``FileNotFoundError``) the weights are not available locally.

    Example:
        >>> encoder = FrozenCLIPEncoder("openai/clip-vit-large-patch14").to(device)
        >>> with torch.no_grad():
        ...     emb_src = encoder(x)
        >>> loss = adversarial + lam * travel_loss(emb_src, encoder(generator(x)))
    """

    def __init__(
        self,
        model: ModelSource | nn.Module = "openai/clip-vit-large-patch14",
        *,
        input_range: tuple[float, float] = (-1.0, 1.0),
        crop: Crop = "center",
        features: Features = "pooled",
        image_size: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        check_range: bool = True,
        verbose: bool = False,
        **from_pretrained_kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        self._init_clip(
            model, input_range=input_range, crop=crop, features=features, image_size=image_size, mean=mean,
            std=std, check_range=check_range, verbose=verbose, from_pretrained_kwargs=from_pretrained_kwargs,
        )  # fmt: skip

    @classmethod
    def from_config(
        cls,
        vision_config: CLIPVisionConfig | dict[str, Any],
        *,
        seed: int | None = None,
        **options: Any,
    ) -> FrozenCLIPEncoder:
        """An encoder with *random* weights built from a config, without any file or download.

        The paper's random-CLIP ablation, and a cheap stand-in in tests and benchmarks. The
        normalisation defaults to OpenAI's constants.

        Args:
            vision_config: a ``CLIPVisionConfig``, a ``CLIPConfig`` (its vision part is used) or
                a dict of ``CLIPVisionConfig`` arguments.
            seed: seeds the initialisation (the global RNG is left untouched); ``None`` draws from
                the global RNG.
            **options: the keyword options of :class:`FrozenCLIPEncoder` (``crop``,
                ``features``, ``input_range``, ``image_size``, ``mean``, ``std``, ``check_range``).
        """
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        unknown = sorted(set(options) - _OPTION_NAMES)
        if unknown:
            raise ValueError(f"options: unknown keyword arguments {unknown}; expected some of {sorted(_OPTION_NAMES)}")
        _check_options(
            options.get("input_range", (-1.0, 1.0)),
            options.get("crop", "center"),
            options.get("features", "pooled"),
            options.get("image_size"),
            options.get("mean"),
            options.get("std"),
        )
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        vision_config = getattr(vision_config, "vision_config", vision_config)
        if not isinstance(vision_config, CLIPVisionConfig):
            raise TypeError(
                "vision_config: expected a CLIPVisionConfig, a CLIPConfig or a dict, got "
                f"{type(vision_config).__name__}"
            )
        config = copy.deepcopy(vision_config)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = CLIPVisionModelWithProjection._from_config(config, attn_implementation="sdpa")
        return cls(model, **options)


class EncoderEnsemble(nn.Module):
    r"""Several encoders side by side, each with its own preprocessing: images -> a tuple of
    (N, D_k) embeddings, one per encoder.

    :func:`travel_loss` takes such tuples and returns the mean of the per-encoder losses, e.g. a
    ViT and a ResNet CLIP together (the authors' proposed future work):

    .. math::  L = \frac{1}{K} \sum_{k=1}^{K} L_\mathrm{travel}(E_k(x), E_k(G(x)))

    >>> ensemble = EncoderEnsemble(FrozenCLIPEncoder(vit_id), FrozenCLIPEncoder(other_id))
    >>> loss = travel_loss(ensemble(x), ensemble(generator(x)))

    Registered as an ``nn.ModuleList``, so ``.to()``, ``.train()`` and ``state_dict()`` reach each
    encoder (a :class:`FrozenCLIPEncoder` contributes nothing to a ``state_dict``).
    """

    def __init__(self, *encoders: nn.Module) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("encoders: expected at least one encoder, got none")
        for index, encoder in enumerate(encoders):
            if not isinstance(encoder, nn.Module):
                raise TypeError(
                    f"encoders[{index}]: expected an nn.Module mapping images to (N, D) "
                    f"embeddings, got {type(encoder).__name__}"
                )
        self.encoders = nn.ModuleList(encoders)

    if TYPE_CHECKING:
        # nn.Module.__call__ is typed (...) -> Any; calling the ensemble runs forward.
        def __call__(self, images: Tensor) -> tuple[Tensor, ...]: ...

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """(N, 3, H, W) images -> tuple of K tensors, the k-th (N, D_k)."""
        return tuple(encoder(images) for encoder in self.encoders)

    @property
    def embedding_dims(self) -> tuple[int | None, ...]:
        """D_k of each encoder (``None`` for an encoder without an ``embedding_dim``)."""
        return tuple(getattr(encoder, "embedding_dim", None) for encoder in self.encoders)

    def __len__(self) -> int:
        return len(self.encoders)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.encoders)


# --------------------------------------------------------------------------------------------
# geometry


def _center_crop(images: Tensor, size: int) -> Tensor:
    """The central size x size square; offsets floored like the CLIP image processor's."""
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def _resize(images: Tensor, shape: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Bicubic (a = -0.5, as PIL) or bilinear, antialiased when shrinking; identity at the same shape."""
    if tuple(images.shape[-2:]) == tuple(shape):
        return images
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    return F.interpolate(images, size=shape, mode=mode, antialias=True, align_corners=False)


def _resized_shape(height: int, width: int, resize_size: ResizeSize) -> tuple[int, int]:
    """Output (height, width) of the processor's resize: an int is the shortest edge, the long
    edge becomes ``int(edge * long / short)`` (floored, as transformers computes it)."""
    if not isinstance(resize_size, int):
        return resize_size
    if width <= height:
        return int(resize_size * height / width), resize_size
    return resize_size, int(resize_size * width / height)


def _geometry(
    processor: ProcessorConfig, native_size: int, image_size: int | None, int_size_is_square: bool = False
) -> tuple[int, ResizeSize]:
    """(image_size, resize size) from an explicit size, the processor config, or the model.

    A legacy int ``size`` is the shortest edge for CLIP's and DINOv2's (Bit) processors and a
    square (s, s) for ViT's and SigLIP's (``int_size_is_square``), as transformers reads them."""
    if image_size is not None:
        return image_size, image_size
    resize_size = _processor_size("size", processor.get("size"))
    if int_size_is_square and isinstance(resize_size, int):
        resize_size = (resize_size, resize_size)
    crop_entry = None
    if processor.get("do_center_crop", True):
        crop_entry = _processor_size("crop_size", processor.get("crop_size"))
    crop_size: int
    if isinstance(crop_entry, tuple):
        if crop_entry[0] != crop_entry[1]:
            raise ValueError(f"preprocessor_config.json: expected a square crop_size, got {crop_entry}")
        crop_size = crop_entry[0]
    elif crop_entry is not None:
        crop_size = crop_entry
    elif isinstance(resize_size, tuple) and resize_size[0] == resize_size[1]:
        crop_size = resize_size[0]
    else:
        crop_size = native_size
    if resize_size is None:
        resize_size = crop_size
    too_small = resize_size < crop_size if isinstance(resize_size, int) else min(resize_size) < crop_size
    if too_small:
        raise ValueError(f"preprocessor_config.json: size {resize_size} is smaller than crop_size {crop_size}")
    return crop_size, resize_size


def _processor_size(key: str, value: Any) -> ResizeSize | None:
    """A processor size entry: legacy int, {"shortest_edge": s} or {"height": h, "width": w}."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if value.get("shortest_edge") is not None:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("width") is not None:
            return int(value["height"]), int(value["width"])
    raise ValueError(
        f"preprocessor_config.json: {key}: expected an int, {{'shortest_edge': s}} or "
        f"{{'height': h, 'width': w}}, got {value!r}"
    )


def _processor_mean(processor: ProcessorConfig) -> Sequence[float]:
    if processor.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0)
    return processor.get("image_mean") or OPENAI_CLIP_MEAN


def _processor_std(processor: ProcessorConfig) -> Sequence[float]:
    if processor.get("do_normalize", True) is False:
        return (1.0, 1.0, 1.0)
    return processor.get("image_std") or OPENAI_CLIP_STD


# --------------------------------------------------------------------------------------------
# loading


_OPTION_NAMES = frozenset({"input_range", "crop", "features", "image_size", "mean", "std", "check_range"})


def _load_checkpoint(
    name: str, kwargs: dict[str, Any], verbose: bool = False
) -> tuple[nn.Module, ProcessorConfig, bool]:
    """(CLIPVisionModelWithProjection, its preprocessor config or {}, whether the checkpoint
    holds a visual projection) from a folder or a hub id."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    if kwargs.pop("trust_remote_code", False):
        raise ValueError(
            "trust_remote_code: FrozenCLIPEncoder never runs code shipped with a checkpoint; "
            "load the model yourself and pass the instance"
        )
    kwargs.pop("output_loading_info", None)
    if getattr(CLIPVisionModelWithProjection, "_supports_sdpa", False):
        kwargs.setdefault("attn_implementation", "sdpa")
    folder = os.path.expanduser(name)
    source = folder if os.path.isdir(folder) else name
    # transformers' own load report lists every text-tower key of a full CLIP checkpoint as
    # unexpected; missing keys, the ones that matter, are checked below instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    model: nn.Module
    info: dict[str, list[str]]
    try:
        with _quiet(verbose):
            # With output_loading_info=True it returns (model, info); the stub knows only the model.
            model, info = CLIPVisionModelWithProjection.from_pretrained(  # type: ignore[misc]
                source, output_loading_info=True, **kwargs
            )
    except OSError as error:
        raise CheckpointNotFoundError(_not_found_message(name, source, kwargs, error)) from None
    except Exception as error:
        raise _damaged_weights_error(name, source, error) from error
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    tower_missing = [key for key in missing if not key.startswith("visual_projection")]
    if tower_missing:
        raise ValueError(
            f"model: {name!r} is not a CLIP vision checkpoint: it has no weights for "
            f"{len(tower_missing)} vision-tower tensors, e.g. {tower_missing[:3]}"
        )
    # Only the projection missing: a CLIPVisionModel checkpoint, whose projection is random.
    return model, _read_processor_config(source, kwargs), not missing


def _read_processor_config(source: str, kwargs: dict[str, Any]) -> ProcessorConfig:
    """The checkpoint's preprocessor_config.json as a dict, {} where it has none.

    Resolved like the weights (folder, or HF cache honouring ``HF_HUB_OFFLINE`` and
    ``local_files_only``, downloading only when online)."""
    from transformers.utils.hub import cached_file

    lookup = {key: kwargs[key] for key in _HUB_LOOKUP_KEYS if key in kwargs}
    try:
        path = cached_file(
            source,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **lookup,
        )
    except OSError:
        return {}
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            config: ProcessorConfig = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"model: {path} is damaged: not a JSON preprocessor config ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"model: {path} is damaged: expected a JSON object, got {type(config).__name__}")
    return config


def _damaged_weights_error(name: str, source: str, error: Exception) -> Exception:
    """A weights file that exists but does not load (truncated, overwritten): one line naming it.

    Errors that are not about a file (a bug, a wrong argument) are returned unchanged."""
    from_safetensors = type(error).__module__.split(".")[0] == "safetensors"
    if not from_safetensors and not isinstance(error, (EOFError, RuntimeError)):
        return error
    files = sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin"))
    where = ", ".join(str(f) for f in files) if files else f"the weights of {name!r}"
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return ValueError(f"model: {where} is damaged and cannot be loaded ({type(error).__name__}: {reason})")


def _not_found_message(name: str, source: str, kwargs: dict[str, Any], error: OSError, kind: str = "CLIP") -> str:
    kind = f"{kind} " if kind else ""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if os.path.isdir(source):
        return (
            f"model: no {kind}checkpoint in the folder {source!r} (expected config.json and "
            "model.safetensors, as written by save_pretrained); pass the folder of a saved "
            f"checkpoint or a hub id. ({reason})"
        )
    from huggingface_hub import constants

    if _looks_like_path(name):
        return (
            f"model: {kind}weights not found locally: there is no folder {name!r}. To fix: pass "
            "an existing folder written by save_pretrained, or a hub id whose weights are in "
            "the local Hugging Face cache (download them once with network access, or set "
            "HF_HOME to the directory whose cache holds them)."
        )
    offline = bool(constants.HF_HUB_OFFLINE or kwargs.get("local_files_only"))
    cache = os.fspath(kwargs.get("cache_dir") or constants.HF_HUB_CACHE)
    why = (
        "offline mode (HF_HUB_OFFLINE or local_files_only) allows no download"
        if offline
        else f"the download failed: {reason}"
    )
    return (
        f"model: {kind}weights {name!r} were not found locally (not a folder, and not in the "
        f"Hugging Face cache {cache!r}); {why}. To fix: download them once with network "
        f"access (`hf download {name}`), or pass the path of a local folder holding the "
        "checkpoint, or set HF_HOME to the directory whose cache holds them."
    )


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'namespace/name'; anything else can only be meant as a folder."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )


def _vision_parts(clip: nn.Module) -> tuple[nn.Module, nn.Linear | None, Any]:
    """(vision tower returning ``pooler_output``, visual projection or None, vision config)."""
    config = getattr(clip, "config", None)
    config = getattr(config, "vision_config", config)
    if config is None or getattr(config, "image_size", None) is None:
        raise TypeError(f"model: expected a transformers CLIP model with a vision config, got {type(clip).__name__}")
    # transformers 4: every CLIP class holds a CLIPVisionTransformer as .vision_model;
    # transformers 5: CLIPVisionModel is the tower itself.
    tower = getattr(clip, "vision_model", None)
    if tower is None:
        tower = clip
    projection = getattr(clip, "visual_projection", None)
    return tower, projection, config


# --------------------------------------------------------------------------------------------
# families


# The features each family offers, the default first.
FAMILY_FEATURES: dict[str, tuple[str, ...]] = {
    "clip": FEATURES,
    "siglip": ("pooled", "mean"),
    "dinov2": ("cls", "mean"),
    "dinov3": ("cls", "mean"),
    "vit": ("cls", "mean"),
    "module": (None,),  # type: ignore[dict-item]
}
# config.json model_type -> (family, transformers class that loads the vision backbone).
_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "clip": ("clip", "CLIPVisionModelWithProjection"),
    "clip_vision_model": ("clip", "CLIPVisionModelWithProjection"),
    "siglip": ("siglip", "SiglipVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
    "dinov3_vit": ("dinov3", "DINOv3ViTModel"),
    "vit": ("vit", "ViTModel"),
}
# PIL resampling codes of preprocessor_config.json -> torch interpolation modes.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}

_DEVICE_COPIES_LOCK = threading.Lock()


def _model_type_family(model_type: str | None, where: str) -> str:
    if model_type == "siglip2":
        raise ValueError(
            f"model: {where} is a NaFlex SigLIP 2 model (model_type 'siglip2'), which takes variable-length "
            "patch sequences, not fixed-size images; use a fixed-resolution SigLIP 2 checkpoint (model_type "
            "'siglip', e.g. google/siglip2-base-patch16-224)"
        )
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"model: {where} has model_type {model_type!r}; supported: {', '.join(sorted(_MODEL_TYPES))}. For "
            "another backbone, pass an nn.Module returning (N, D) features with explicit mean, std and image_size"
        )
    return _MODEL_TYPES[model_type][0]


def _family_of(model: Any, kwargs: dict[str, Any], verbose: bool) -> str:
    """The family of a checkpoint (from its config.json) or of a model instance."""
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None and not hasattr(config, "vision_config"):
            return "module"
        return _model_type_family(model_type, type(model).__name__)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a hub id, a folder path or an nn.Module, got {type(model).__name__}")
    if kwargs.get("trust_remote_code"):
        raise ValueError(
            "trust_remote_code: FrozenEncoder never runs code shipped with a checkpoint; load the model "
            "yourself and pass the instance"
        )
    from transformers import AutoConfig

    name = os.fspath(model)
    folder = os.path.expanduser(name)
    source = folder if os.path.isdir(folder) else name
    lookup = {key: kwargs[key] for key in _HUB_LOOKUP_KEYS if key in kwargs}
    try:
        with _quiet(verbose):
            config = AutoConfig.from_pretrained(source, **lookup)
    except OSError as error:
        raise CheckpointNotFoundError(_not_found_message(name, source, kwargs, error, kind="")) from None
    return _model_type_family(getattr(config, "model_type", None), repr(name))


def _load_family(name: str, family: str, kwargs: dict[str, Any], verbose: bool) -> tuple[nn.Module, ProcessorConfig]:
    """(vision backbone, preprocessor config or {}) of a non-CLIP checkpoint."""
    import transformers
    from transformers import AutoConfig

    kwargs.pop("output_loading_info", None)
    folder = os.path.expanduser(name)
    source = folder if os.path.isdir(folder) else name
    lookup = {key: kwargs[key] for key in _HUB_LOOKUP_KEYS if key in kwargs}
    with _quiet(verbose):
        model_type = AutoConfig.from_pretrained(source, **lookup).model_type
    model_class = getattr(transformers, _MODEL_TYPES[model_type][1])
    if getattr(model_class, "_supports_sdpa", False):
        kwargs.setdefault("attn_implementation", "sdpa")
    if family == "vit":
        kwargs.setdefault("add_pooling_layer", False)  # the CLS token is the embedding, not the pooler
    try:
        with _quiet(verbose):
            model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as error:
        raise CheckpointNotFoundError(_not_found_message(name, source, kwargs, error, kind="")) from None
    except Exception as error:
        raise _damaged_weights_error(name, source, error) from error
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(
            f"model: {name!r} is not a complete {family} vision checkpoint: it has no weights for "
            f"{len(missing)} tensors, e.g. {missing[:3]}"
        )
    return model, _read_processor_config(source, kwargs)


def _family_tower(model: nn.Module, family: str) -> tuple[nn.Module, Any]:
    """(the module called with pixel_values, its vision config) of a transformers backbone."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    if config is None or getattr(config, "image_size", None) is None:
        raise TypeError(
            f"model: expected a transformers {family} model with a vision config, got {type(model).__name__}"
        )
    tower = getattr(model, "vision_model", None) if family == "siglip" else None
    return (tower if tower is not None else model), config


def _processor_resample(processor: ProcessorConfig) -> str:
    return _RESAMPLE_MODES.get(processor.get("resample", 3), "bicubic")


def _submodule_path(root: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``root`` ("" for root itself), for get_submodule on copies."""
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return str(name)  # named_modules is unannotated in torch
    raise ValueError(f"model: {type(module).__name__} is not a submodule of {type(root).__name__}")


def _weight_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        return tensor.dtype
    return torch.get_default_dtype()


def _weight_device(module: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence transformers' logging and progress bars (and huggingface_hub's) unless verbose;
    the previous settings are restored on exit."""
    if verbose:
        yield
        return
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars:
            enable_progress_bars()


# --------------------------------------------------------------------------------------------
# validation


def _check_options(
    input_range: Any, crop: Any, features: Any, image_size: Any, mean: Any, std: Any
) -> tuple[float, float]:
    if (
        not isinstance(input_range, (tuple, list))
        or len(input_range) != 2
        or not all(_is_real(value) and math.isfinite(value) for value in input_range)
        or not input_range[0] < input_range[1]
    ):
        raise ValueError(
            f"input_range: expected (lo, hi) with finite lo < hi, e.g. (-1, 1) or (0, 1), got {input_range!r}"
        )
    if crop not in CROPS:
        raise ValueError(f"crop: expected one of {', '.join(map(repr, CROPS))}, got {crop!r}")
    if features not in FEATURES:
        raise ValueError(f"features: expected one of {', '.join(map(repr, FEATURES))}, got {features!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
    if mean is not None:
        _per_channel("mean", mean)
    if std is not None:
        _per_channel("std", std)
    return float(input_range[0]), float(input_range[1])


def _per_channel(name: str, value: Any) -> tuple[float, float, float]:
    try:
        values = (float(value),) * 3 if _is_real(value) else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    valid = len(values) == 3 and all(math.isfinite(v) for v in values)
    if valid and name == "std":
        valid = all(v > 0 for v in values)
    if not valid:
        condition = "positive, finite" if name == "std" else "finite"
        raise ValueError(f"{name}: expected 3 {condition} numbers (one per channel), got {value!r}")
    if max(abs(v) for v in values) > (1.5 if name == "mean" else 2.0):
        raise ValueError(
            f"{name}: expected values on the [0, 1] scale that the images are mapped to (e.g. CLIP's mean "
            f"0.481, 0.458, 0.408, std 0.269, 0.261, 0.276), got {value!r}; on a 0-255 scale? divide by 255"
        )
    return values  # type: ignore[return-value]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(images: Tensor, input_range: tuple[float, float]) -> None:
    lo, hi = input_range
    tolerance = RANGE_TOLERANCE * (hi - lo)
    extremes = torch.aminmax(images.detach())
    smallest, largest = float(extremes.min), float(extremes.max)
    if lo - tolerance <= smallest and largest <= hi + tolerance:
        return
    hint = " (pass input_range=(0, 1) for images in [0, 1])" if (lo, hi) != (0, 1) else ""
    raise ValueError(
        f"images: expected values in input_range=({lo:g}, {hi:g}), got min {smallest:.4g} and "
        f"max {largest:.4g}{hint}; 8-bit images need images.float() / 255"
    )
