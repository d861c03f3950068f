r"""A frozen image encoder to put between a generator and :func:`travel_loss`, and an ensemble.

The encoder maps a batch of images in the generator's value range to image embeddings,

.. math::  E(x) = f_\theta\Bigl(\frac{P(x) - lo}{(hi - lo)\,\sigma} - \frac{\mu}{\sigma}\Bigr),

where :math:`P` is a crop and/or resize to the model's ``image_size`` (the *crop policy*),
``(lo, hi)`` the ``input_range``, :math:`\mu, \sigma` the model's per-channel mean and std, and
:math:`f_\theta` the frozen vision tower. Every step is a differentiable torch op, so gradients
reach the images, and no parameter ever requires a gradient. Loading the tower and reading its
preprocessing settings (CLIP, SigLIP, DINOv2, DINOv3, ViT checkpoints) is :mod:`travel_loss.hub`'s.

Why the weights are not part of a parent's ``state_dict``: a generator that holds the encoder
would otherwise save (and require on load) the 1.2 GB of ViT-L/14 with every checkpoint. The
transformers model is kept *outside* the registered-module tree, as a plain attribute, so that

- ``state_dict()``, ``load_state_dict()``, ``parameters()`` and ``apply()`` of a parent never see
  it (an optimizer built from ``generator.parameters()`` cannot touch it; ``init_weights`` cannot
  re-initialise it);
- ``parent.train()`` cannot switch it out of eval mode (and :meth:`FrozenEncoder.train`
  keeps the wrapper itself in eval mode);
- ``parent.to(device)``, ``.cuda()``, ``.half()``, ``.to(dtype)`` still move and cast it, because
  :meth:`FrozenEncoder._apply` forwards them.

The wrapped model stays reachable as :attr:`FrozenEncoder.model`.
:meth:`FrozenEncoder.forward_with_tokens` returns the embeddings and the patch tokens (CLS and
register tokens dropped) of the same forward pass, for :func:`travel_loss.self_similarity_loss`.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from travel_loss.hub import (
    FAMILIES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Checkpoint,
    CheckpointNotFoundError,
    Family,
    ModelSource,
    ProcessorConfig,
    ResizeSize,
    family_of_instance,
    find_checkpoint,
    processor_geometry,
    processor_mean_std,
    processor_resample,
    vision_parts,
)

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
CROPS: tuple[str, ...] = get_args(Crop)
# CLIP's features (FAMILIES["clip"].features), for FrozenCLIPEncoder's signature.
Features = Literal["pooled", "projected"]

# How far (as a fraction of hi - lo) images may stray outside input_range before it is an error.
RANGE_TOLERANCE = 0.01

# The family of a model that is no transformers backbone: its output is the embedding.
_PLAIN_MODULE = "module"

_DEVICE_COPIES_LOCK = threading.Lock()


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

    # The one family this class wraps, every model read as one of it (FrozenCLIPEncoder: CLIP);
    # None: the family comes from the checkpoint's config.json or the instance's config.
    _only_family: ClassVar[Family | None] = None

    # The backbone, a plain attribute (set through object.__setattr__, not a registered submodule),
    # and the normalisation, non-persistent buffers.
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
        super().__init__()
        lo, hi = _check_options(input_range, crop, image_size, mean, std)
        name, family, checkpoint = self._locate(model, from_pretrained_kwargs, verbose)
        if family is None:  # a plain module: its output is the embedding
            features = _check_features(features, (None,), _PLAIN_MODULE)
            missing = [n for n, v in (("mean", mean), ("std", std), ("image_size", image_size)) if v is None]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)}: required for a plain nn.Module ({name}), which carries no "
                    "preprocessing config; pass the mean, std and input size the model was trained with, e.g. "
                    "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), image_size=224 for ImageNet models"
                )
            assert isinstance(model, nn.Module) and image_size is not None
            self._store(
                backbone=model, tower=model, projection=None, name=name, family=_PLAIN_MODULE, features=features,
                readout="output", input_range=(lo, hi), crop=crop, size=image_size, resize_size=image_size,
                resample=processor_resample({}, None), interpolate=False, mean=_per_channel("mean", mean),
                std=_per_channel("std", std), check_range=check_range, embedding_dim=None, patch_start=1,
            )  # fmt: skip
            return

        # The message names the family, unless the class wraps that one family only (FrozenCLIPEncoder).
        features = _check_features(features, tuple(family.features), None if self._only_family else family.label)
        assert features is not None
        readout = family.features[features]
        processor: ProcessorConfig = {}
        if checkpoint is None:
            assert isinstance(model, nn.Module)
            backbone, has_projection = model, True
            if not family.mean_std_optional and (mean is None or std is None):
                missing_names = ", ".join(n for n, v in (("mean", mean), ("std", std)) if v is None)
                raise ValueError(
                    f"{missing_names}: required for a {family.name} model instance, which carries no "
                    "preprocessor_config.json; pass the image_mean / image_std of its checkpoint's processor, "
                    "or pass the checkpoint's hub id or folder instead of the instance"
                )
        else:
            backbone, processor, has_projection = checkpoint.load()
        tower, projection, config = vision_parts(backbone, family)
        if readout != "projection" or not has_projection:
            projection = None
        if readout == "projection" and projection is None:
            raise ValueError(
                f"features: 'projected' needs a visual projection, and {name!r} has none (a "
                "CLIPVisionModel checkpoint); use features='pooled' or a "
                "CLIPVisionModelWithProjection"
            )
        if checkpoint is not None and not family.mean_std_optional and (mean is None or std is None) and not processor:
            raise ValueError(
                f"mean, std: {name!r} has no preprocessor_config.json to read them from; pass the mean and std "
                "the model was trained with"
            )
        native_size = int(config.image_size)
        size, resize_size = processor_geometry(processor, family, native_size, image_size)
        patch_size = getattr(config, "patch_size", None)
        if patch_size and size % patch_size:
            raise ValueError(
                f"image_size: expected a multiple of the patch size {patch_size}, got {size} (the pixels of a "
                "partial patch would be ignored)"
            )
        processor_mean, processor_std = processor_mean_std(processor)
        self._store(
            backbone=backbone, tower=tower, projection=projection, name=name, family=family.name,
            features=features, readout=readout, input_range=(lo, hi), crop=crop, size=size,
            resize_size=resize_size, resample=processor_resample(processor, family),
            interpolate=size != native_size and family.takes_interpolate_pos_encoding,
            mean=_per_channel("mean", mean if mean is not None else processor_mean),
            std=_per_channel("std", std if std is not None else processor_std), check_range=check_range,
            embedding_dim=int(config.hidden_size) if projection is None else projection.out_features,
            patch_start=1 + int(getattr(config, "num_register_tokens", 0) or 0) if family.cls_token else 0,
            patch_size=int(patch_size) if patch_size else None,
        )  # fmt: skip

    def _locate(
        self, model: ModelSource | nn.Module, from_pretrained_kwargs: dict[str, Any], verbose: bool
    ) -> tuple[str, Family | None, Checkpoint | None]:
        """(the model's name, its family or None for a plain module, its checkpoint or None for an
        instance); reads the checkpoint's config.json unless the class wraps one family only."""
        only = self._only_family
        if isinstance(model, nn.Module):
            if from_pretrained_kwargs:
                raise ValueError(
                    "from_pretrained_kwargs: only used when loading a checkpoint by id or path, got "
                    f"{sorted(from_pretrained_kwargs)} together with a model instance"
                )
            return type(model).__name__, only or family_of_instance(model), None
        if isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
            checkpoint = find_checkpoint(
                name, from_pretrained_kwargs, family=only, caller=type(self).__name__, verbose=verbose
            )
            return name, checkpoint.family, checkpoint
        accepted = f"a transformers {only.label} model" if only else "an nn.Module"
        raise TypeError(f"model: expected a hub id, a folder path or {accepted}, got {type(model).__name__}")

    def _store(
        self, *, backbone: nn.Module, tower: nn.Module, projection: nn.Module | None, name: str, family: str,
        features: str | None, readout: str, input_range: tuple[float, float], crop: str, size: int,
        resize_size: ResizeSize, resample: str, interpolate: bool, mean: tuple[float, float, float],
        std: tuple[float, float, float], check_range: bool, embedding_dim: int | None, patch_start: int,
        patch_size: int | None = None,
    ) -> None:  # fmt: skip
        """Freeze the backbone and store everything forward needs."""
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
        self._readout = readout
        self._image_size = size
        self._resize_size = resize_size
        self._resample = resample
        self._interpolate_pos_encoding = interpolate
        self._patch_start = patch_start
        self._token_grid = None if patch_size is None else (size // patch_size, size // patch_size)
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
        """The output used as the embedding (``None`` for a plain module)."""
        return self._features  # type: ignore[return-value]  # None only for a plain module

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
        embeddings, _ = self._run(images, with_tokens=False, layer=None)
        return embeddings

    def forward_with_tokens(self, images: Tensor, *, layer: int | None = None) -> tuple[Tensor, Tensor]:
        r"""(N, 3, H, W) images -> ((N, D) embeddings, (N, L, C) patch tokens) from ONE forward pass.

        The embeddings are :meth:`forward`'s (the same preprocessing, the same ``features``); the
        tokens are the spatial features for :func:`travel_loss.self_similarity_loss`: the L = h w
        patch tokens in row-major order on the :attr:`token_grid` (h, w), every CLS and register
        token dropped (CLIP, DINOv2, DINOv3, ViT: a CLS token first, then
        ``config.num_register_tokens`` registers (DINOv2 with registers, DINOv3); SigLIP: none).

        Args:
            layer: None: the tower's ``last_hidden_state`` (after the final layer norm where the
                family applies one there: SigLIP, DINOv2, DINOv3, ViT; CLIP's is before its
                post-layernorm); an int k: ``hidden_states[k]`` (0: the embeddings, k: after block
                k, negative counts from the end), e.g. an intermediate layer with more spatial
                detail. C is the hidden size.

        A plain ``nn.Module`` gives tokens if it has a ``forward_with_tokens(pixel_values) ->
        (embeddings, tokens)`` or a ``tokens(pixel_values)`` method (then run besides its
        forward), returning (N, L, C) tokens or (N, C, H, W) maps as they are; ``layer`` must
        be None. Raises ``ValueError`` otherwise, and as :meth:`forward` on bad images.
        """
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"layer: expected None or an int index into hidden_states, got {layer!r}")
        if self._readout == "output":
            if layer is not None:
                raise ValueError(f"layer: a plain module ({self._name}) has no hidden_states to index; pass None")
            if not _module_gives_tokens(self._backbone):
                raise ValueError(
                    f"model: the plain module {self._name} gives no spatial tokens; give it a "
                    "forward_with_tokens(pixel_values) -> (embeddings, tokens) or a tokens(pixel_values) method"
                )
        embeddings, tokens = self._run(images, with_tokens=True, layer=layer)
        assert tokens is not None
        return embeddings, tokens

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """(h, w) of the patch tokens of :meth:`forward_with_tokens` (``None`` for a plain module)."""
        return self._token_grid

    def _run(self, images: Tensor, *, with_tokens: bool, layer: int | None) -> tuple[Tensor, Tensor | None]:
        """One forward of the tower: the embeddings and, ``with_tokens``, the patch tokens."""
        pixel_values = self.preprocess(images)
        backbone = self._backbone_for(pixel_values.device)
        pixel_values = pixel_values.to(_weight_dtype(backbone))
        tower = backbone.get_submodule(self._tower_path)
        embeddings: Tensor
        if self._readout == "output":  # a plain module
            if not with_tokens:
                embeddings = tower(pixel_values).flatten(1)
                return embeddings, None
            module: Any = tower  # its own token method, checked by forward_with_tokens
            if hasattr(module, "forward_with_tokens"):
                embeddings, tokens = module.forward_with_tokens(pixel_values)
                return embeddings.flatten(1), tokens
            return module(pixel_values).flatten(1), module.tokens(pixel_values)
        extra: dict[str, Any] = {"interpolate_pos_encoding": True} if self._interpolate_pos_encoding else {}
        if with_tokens and layer is not None:
            extra["output_hidden_states"] = True
        output = tower(pixel_values=pixel_values, **extra)
        if self._readout == "patch_mean":  # (N, T, D) tokens -> mean over the patch tokens
            embeddings = output.last_hidden_state[:, self._patch_start :].mean(dim=1)
        elif self._readout == "first_token":
            embeddings = output.last_hidden_state[:, 0]
        elif self._projection_path is None:  # "pooler"
            embeddings = output.pooler_output
        else:  # "projection"
            embeddings = backbone.get_submodule(self._projection_path)(output.pooler_output)
        if not with_tokens:
            return embeddings, None
        if layer is None:
            hidden = output.last_hidden_state
        else:
            states = output.hidden_states
            if not -len(states) <= layer < len(states):
                raise ValueError(
                    f"layer: expected an index into the {len(states)} hidden_states (embeddings and each block), "
                    f"got {layer}"
                )
            hidden = states[layer]
        return embeddings, hidden[:, self._patch_start :]

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

    A :class:`FrozenEncoder` that reads every model as CLIP (the CLIP row of
    :data:`travel_loss.hub.FAMILIES`, without looking up the model type), with CLIP's defaults.

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

    _only_family = FAMILIES["clip"]  # every model is read as a CLIP model

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
        super().__init__(
            model, input_range=input_range, crop=crop, features=features, mean=mean, std=std, image_size=image_size,
            check_range=check_range, verbose=verbose, **from_pretrained_kwargs,
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
            options.get("image_size"),
            options.get("mean"),
            options.get("std"),
        )
        _check_features(options.get("features", "pooled"), tuple(FAMILIES["clip"].features), None)
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


# --------------------------------------------------------------------------------------------
# validation

# The keyword options FrozenCLIPEncoder.from_config passes on.
_OPTION_NAMES = frozenset({"input_range", "crop", "features", "image_size", "mean", "std", "check_range"})


def _check_options(input_range: Any, crop: Any, image_size: Any, mean: Any, std: Any) -> tuple[float, float]:
    """Validate the options every family shares; ``(lo, hi)`` as floats."""
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
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
    if mean is not None:
        _per_channel("mean", mean)
    if std is not None:
        _per_channel("std", std)
    return float(input_range[0]), float(input_range[1])


def _check_features(features: Any, allowed: tuple[str | None, ...], family: str | None) -> str | None:
    """``features``, or the family's default (the first allowed) for None; ``family`` names the
    family in the message (None where the encoder class wraps one family only)."""
    if features is None:
        return allowed[0]
    if features not in allowed:
        for_family = f" for a {family} model" if family else ""
        raise ValueError(f"features: expected one of {', '.join(map(repr, allowed))}{for_family}, got {features!r}")
    return str(features)


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


# --------------------------------------------------------------------------------------------
# the unregistered backbone


def _submodule_path(root: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``root`` ("" for root itself), for get_submodule on copies."""
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return str(name)  # named_modules is unannotated in torch
    raise ValueError(f"model: {type(module).__name__} is not a submodule of {type(root).__name__}")


def _module_gives_tokens(module: nn.Module) -> bool:
    return callable(getattr(module, "forward_with_tokens", None)) or callable(getattr(module, "tokens", None))


def _weight_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        return tensor.dtype
    return torch.get_default_dtype()


def _weight_device(module: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None
