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

import copy
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

__all__ = [
    "CheckpointNotFoundError",
    "EncoderEnsemble",
    "FrozenCLIPEncoder",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
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
ResizeSize = Union[int, tuple[int, int]]


class CheckpointNotFoundError(FileNotFoundError):
    """The weights of a CLIP checkpoint are neither in a local folder nor in the local HF cache."""


class FrozenCLIPEncoder(nn.Module):
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
              a 224 model exactly ``x[..., 16:240, 16:240]``. Pixels outside it get no gradient;
              images smaller than ``image_size`` are an error.
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
        model: Union[str, os.PathLike, nn.Module] = "openai/clip-vit-large-patch14",
        *,
        input_range: tuple[float, float] = (-1.0, 1.0),
        crop: Crop = "center",
        features: Features = "pooled",
        image_size: Optional[int] = None,
        mean: Union[float, Sequence[float], None] = None,
        std: Union[float, Sequence[float], None] = None,
        check_range: bool = True,
        **from_pretrained_kwargs: Any,
    ) -> None:
        super().__init__()
        lo, hi = _check_options(input_range, crop, features, image_size, mean, std)
        if isinstance(model, nn.Module):
            if from_pretrained_kwargs:
                raise ValueError(
                    "from_pretrained_kwargs: only used when loading a checkpoint by id or path, "
                    f"got {sorted(from_pretrained_kwargs)} together with a model instance"
                )
            clip, processor, name, has_projection = model, {}, type(model).__name__, True
        elif isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
            clip, processor, has_projection = _load_checkpoint(name, dict(from_pretrained_kwargs))
        else:
            raise TypeError(
                "model: expected a hub id, a folder path or a transformers CLIP model, got "
                f"{type(model).__name__}"
            )
        tower, projection, vision_config = _vision_parts(clip)
        if not has_projection:
            projection = None
        if features == "projected" and projection is None:
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
        mean = _per_channel("mean", mean if mean is not None else _processor_mean(processor))
        std = _per_channel("std", std if std is not None else _processor_std(processor))

        clip.eval()
        clip.requires_grad_(False)
        # Plain attributes, not registered submodules: see the module docstring.
        object.__setattr__(self, "_clip", clip)
        object.__setattr__(self, "_tower", tower)
        object.__setattr__(self, "_projection", projection if features == "projected" else None)

        self._name = name
        self._input_range = (lo, hi)
        self._crop = crop
        self._features = features
        self._image_size = size
        self._resize_size = resize_size
        self._interpolate_pos_encoding = size != native_size
        self._mean, self._std = mean, std
        self.check_range = check_range
        self._embedding_dim = int(
            projection.out_features if features == "projected" else vision_config.hidden_size
        )
        # x -> ((x - lo) / (hi - lo) - mean) / std as one multiply-add; non-persistent buffers
        # follow .to(device) and stay out of the state_dict.
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        scale = 1.0 / ((hi - lo) * std_t)
        shift = (-lo / (hi - lo) - mean_t) / std_t
        self.register_buffer("_scale", scale.view(3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(3, 1, 1), persistent=False)
        super().train(False)

    @classmethod
    def from_config(
        cls,
        vision_config: Union[CLIPVisionConfig, dict],
        *,
        seed: Optional[int] = None,
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
            raise ValueError(
                f"options: unknown keyword arguments {unknown}; expected some of "
                f"{sorted(_OPTION_NAMES)}"
            )
        _check_options(
            options.get("input_range", (-1.0, 1.0)), options.get("crop", "center"),
            options.get("features", "pooled"), options.get("image_size"), options.get("mean"),
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

    # ----------------------------------------------------------------------------------------
    # properties

    @property
    def model(self) -> nn.Module:
        """The wrapped transformers model (frozen, in eval mode, not a registered submodule)."""
        return self._clip

    @property
    def embedding_dim(self) -> int:
        """D, the size of one embedding: hidden size (pooled) or projection size (projected)."""
        return self._embedding_dim

    @property
    def image_size(self) -> int:
        """The side of the square CLIP input, in pixels."""
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
        """(N, 3, H, W) images in ``input_range`` -> (N, 3, S, S) normalised CLIP pixel values.

        S = :attr:`image_size`. Differentiable; float16/bfloat16 images are resized in float32
        (CPU bicubic kernels lack them). Raises ``ValueError`` on bad images (see
        :meth:`forward`).
        """
        self._check_images(images)
        if self._crop == "center":
            x = _center_crop(images, self._image_size)
        elif self._crop == "full":
            x = _resize(images, (self._image_size, self._image_size))
        else:
            height, width = images.shape[-2:]
            x = _resize(images, _resized_shape(height, width, self._resize_size))
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
        pixel_values = self.preprocess(images).to(self._weight_dtype())
        extra = {"interpolate_pos_encoding": True} if self._interpolate_pos_encoding else {}
        pooled = self._tower(pixel_values=pixel_values, **extra).pooler_output
        if self._projection is None:
            return pooled
        return self._projection(pooled)

    # ----------------------------------------------------------------------------------------
    # nn.Module plumbing for the unregistered model

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FrozenCLIPEncoder:
        super()._apply(fn, recurse)
        if recurse:
            self._clip._apply(fn)
        return self

    def train(self, mode: bool = True) -> FrozenCLIPEncoder:
        """Stays in eval mode whatever ``mode`` says: the encoder is frozen."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"model={self._name!r}, crop={self._crop!r}, features={self._features!r}, "
            f"image_size={self._image_size}, embedding_dim={self._embedding_dim}, "
            f"input_range={self._input_range} (frozen; weights not in state_dict)"
        )

    # ----------------------------------------------------------------------------------------
    # internals

    def _weight_dtype(self) -> torch.dtype:
        return next(self._tower.parameters()).dtype

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

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """(N, 3, H, W) images -> tuple of K tensors, the k-th (N, D_k)."""
        return tuple(encoder(images) for encoder in self.encoders)

    @property
    def embedding_dims(self) -> tuple[Optional[int], ...]:
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


def _resize(images: Tensor, shape: tuple[int, int]) -> Tensor:
    """Bicubic (a = -0.5, as PIL), antialiased when shrinking; identity at the same shape."""
    if tuple(images.shape[-2:]) == tuple(shape):
        return images
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    return F.interpolate(images, size=shape, mode="bicubic", antialias=True, align_corners=False)


def _resized_shape(height: int, width: int, resize_size: ResizeSize) -> tuple[int, int]:
    """Output (height, width) of the processor's resize: an int is the shortest edge, the long
    edge becomes ``int(edge * long / short)`` (floored, as transformers computes it)."""
    if not isinstance(resize_size, int):
        return resize_size
    if width <= height:
        return int(resize_size * height / width), resize_size
    return resize_size, int(resize_size * width / height)


def _geometry(
    processor: dict, native_size: int, image_size: Optional[int]
) -> tuple[int, ResizeSize]:
    """(image_size, resize size) from an explicit size, the processor config, or the model."""
    if image_size is not None:
        return image_size, image_size
    resize_size = _processor_size("size", processor.get("size"))
    crop_size = None
    if processor.get("do_center_crop", True):
        crop_size = _processor_size("crop_size", processor.get("crop_size"))
        if isinstance(crop_size, tuple):
            if crop_size[0] != crop_size[1]:
                raise ValueError(
                    f"preprocessor_config.json: expected a square crop_size, got {crop_size}"
                )
            crop_size = crop_size[0]
    if crop_size is None:
        square_resize = isinstance(resize_size, tuple) and resize_size[0] == resize_size[1]
        crop_size = resize_size[0] if square_resize else native_size  # type: ignore[index]
    if resize_size is None:
        resize_size = crop_size
    too_small = (
        resize_size < crop_size
        if isinstance(resize_size, int)
        else min(resize_size) < crop_size
    )
    if too_small:
        raise ValueError(
            f"preprocessor_config.json: size {resize_size} is smaller than crop_size {crop_size}"
        )
    return crop_size, resize_size


def _processor_size(key: str, value: Any) -> Optional[ResizeSize]:
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


def _processor_mean(processor: dict) -> Sequence[float]:
    if processor.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0)
    return processor.get("image_mean") or OPENAI_CLIP_MEAN


def _processor_std(processor: dict) -> Sequence[float]:
    if processor.get("do_normalize", True) is False:
        return (1.0, 1.0, 1.0)
    return processor.get("image_std") or OPENAI_CLIP_STD


# --------------------------------------------------------------------------------------------
# loading


_OPTION_NAMES = frozenset(
    {"input_range", "crop", "features", "image_size", "mean", "std", "check_range"}
)


def _load_checkpoint(name: str, kwargs: dict) -> tuple[nn.Module, dict, bool]:
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
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            source, output_loading_info=True, **kwargs
        )
    except OSError as error:
        raise CheckpointNotFoundError(_not_found_message(name, source, kwargs, error)) from None
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


def _read_processor_config(source: str, kwargs: dict) -> dict:
    """The checkpoint's preprocessor_config.json as a dict, {} where it has none.

    Resolved like the weights (folder, or HF cache honouring ``HF_HUB_OFFLINE`` and
    ``local_files_only``, downloading only when online)."""
    from transformers.utils import cached_file

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
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _not_found_message(name: str, source: str, kwargs: dict, error: OSError) -> str:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if os.path.isdir(source):
        return (
            f"model: no CLIP checkpoint in the folder {source!r} (expected config.json and "
            "model.safetensors, as written by save_pretrained); pass the folder of a saved "
            f"checkpoint or a hub id. ({reason})"
        )
    from huggingface_hub import constants

    if _looks_like_path(name):
        return (
            f"model: CLIP weights not found locally: there is no folder {name!r}. To fix: pass "
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
        f"model: CLIP weights {name!r} were not found locally (not a folder, and not in the "
        f"Hugging Face cache {cache!r}); {why}. To fix: download them once with network "
        f"access (`hf download {name}`), or pass the path of a local folder holding the "
        "checkpoint, or set HF_HOME to the directory whose cache holds them."
    )


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'namespace/name'; anything else can only be meant as a folder."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _vision_parts(clip: nn.Module) -> tuple[nn.Module, Optional[nn.Module], Any]:
    """(vision tower returning ``pooler_output``, visual projection or None, vision config)."""
    config = getattr(clip, "config", None)
    config = getattr(config, "vision_config", config)
    if config is None or getattr(config, "image_size", None) is None:
        raise TypeError(
            "model: expected a transformers CLIP model with a vision config, got "
            f"{type(clip).__name__}"
        )
    # transformers 4: every CLIP class holds a CLIPVisionTransformer as .vision_model;
    # transformers 5: CLIPVisionModel is the tower itself.
    tower = getattr(clip, "vision_model", None)
    if tower is None:
        tower = clip
    projection = getattr(clip, "visual_projection", None)
    return tower, projection, config


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
            f"input_range: expected (lo, hi) with finite lo < hi, e.g. (-1, 1) or (0, 1), got "
            f"{input_range!r}"
        )
    if crop not in CROPS:
        raise ValueError(f"crop: expected one of {', '.join(map(repr, CROPS))}, got {crop!r}")
    if features not in FEATURES:
        raise ValueError(
            f"features: expected one of {', '.join(map(repr, FEATURES))}, got {features!r}"
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
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
    return values  # type: ignore[return-value]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(images: Tensor, input_range: tuple[float, float]) -> None:
    lo, hi = input_range
    tolerance = RANGE_TOLERANCE * (hi - lo)
    smallest, largest = torch.aminmax(images.detach())
    smallest, largest = float(smallest), float(largest)
    if lo - tolerance <= smallest and largest <= hi + tolerance:
        return
    hint = " (pass input_range=(0, 1) for images in [0, 1])" if (lo, hi) != (0, 1) else ""
    raise ValueError(
        f"images: expected values in input_range=({lo:g}, {hi:g}), got min {smallest:.4g} and "
        f"max {largest:.4g}{hint}; 8-bit images need images.float() / 255"
    )
