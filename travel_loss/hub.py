"""Loading a transformers vision backbone and its preprocessing settings from a folder or hub id.

:data:`FAMILIES` is the one table of supported backbones: one :class:`Family` row per family
(CLIP, SigLIP, DINOv2, DINOv3, ViT) says which ``config.json`` model types it covers, which
transformers class loads each, where the vision tower and its projection sit in the model, which
``features`` it offers and how to read each, and how its ``preprocessor_config.json`` is read.
Every family, CLIP included, goes through the same two steps:

1. :func:`find_checkpoint` locates the checkpoint and reads its ``config.json`` to pick the row
   (skipped when the caller already names the family, as :class:`~travel_loss.FrozenCLIPEncoder`
   does);
2. :meth:`Checkpoint.load` reads the weights and the preprocessor config.

Nothing runs code shipped with a checkpoint, and weights that are not available locally raise
:class:`CheckpointNotFoundError` in one line saying how to get them. transformers is imported only
here, and only when a checkpoint is loaded, so that ``import travel_loss`` stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

__all__ = [
    "FAMILIES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Checkpoint",
    "CheckpointNotFoundError",
    "Family",
    "family_of_instance",
    "find_checkpoint",
    "processor_geometry",
    "processor_mean_std",
    "processor_resample",
    "vision_parts",
]

# The fallback normalisation for CLIP checkpoints without a preprocessor_config.json (OpenAI's CLIP).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# What names a checkpoint: a hub id or a folder.
ModelSource = str | os.PathLike[str]
# A checkpoint's preprocessor_config.json, as read by json.load ({} where it has none).
ProcessorConfig = dict[str, Any]
# A resize target: an int is the shortest edge (aspect ratio kept), a pair is (height, width).
ResizeSize = int | tuple[int, int]
# How an embedding is read from the tower's output: its pooler_output; the projection of the
# pooler_output; the first token of last_hidden_state (the CLS token); the mean of the patch tokens
# of last_hidden_state (after any CLS and register tokens).
Readout = Literal["pooler", "projection", "first_token", "patch_mean"]

# Keyword arguments of from_pretrained that also locate config.json and preprocessor_config.json.
_HUB_LOOKUP_KEYS = ("cache_dir", "revision", "local_files_only", "token", "subfolder", "proxies")
# PIL resampling codes of preprocessor_config.json -> torch interpolation modes.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


class CheckpointNotFoundError(FileNotFoundError):
    """The weights of a checkpoint are neither in a local folder nor in the local HF cache."""


@dataclass(frozen=True)
class Family:
    """One row of :data:`FAMILIES`: how a family of transformers vision backbones is loaded and read."""

    name: str
    """The family, as :attr:`FrozenEncoder.family <travel_loss.FrozenEncoder.family>` reports it."""
    label: str
    """How error messages name the family."""
    model_types: Mapping[str, str]
    """``config.json`` model_type -> the transformers class that loads the vision backbone; the first
    is used when the caller names the family instead of reading ``config.json``."""
    features: Mapping[str, Readout]
    """The ``features`` the family offers (the default first) -> how each is read."""
    tower: str | None = None
    """The attribute holding the vision tower, where the loaded class wraps one; else the model itself."""
    projection: str | None = None
    """The attribute holding the linear projection of the pooled output. Its weights may be missing
    from a checkpoint (which then serves no ``"projection"`` readout)."""
    cls_token: bool = True
    """The token sequence starts with a CLS token (and ``config.num_register_tokens`` registers)."""
    int_size_is_square: bool = False
    """A legacy int ``size`` in the processor config is a square (s, s), not the shortest edge."""
    takes_interpolate_pos_encoding: bool = True
    """The tower needs ``interpolate_pos_encoding=True`` at another image size than its own."""
    mean_std_optional: bool = False
    """Without a preprocessor config, mean and std default to OpenAI's CLIP constants instead of
    being required."""
    resample: str | None = None
    """A fixed torch interpolation mode; ``None`` reads ``resample`` from the processor config."""
    load_options: Mapping[str, Any] = field(default_factory=dict)
    """Defaults for ``from_pretrained`` keyword arguments."""
    silence_load_report: bool = False
    """Keep transformers' load report quiet even when verbose (its unexpected keys are expected)."""


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="clip",
            label="CLIP",
            model_types={"clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModelWithProjection"},
            features={"pooled": "pooler", "projected": "projection"},  # post-layernorm CLS; joint-space embedding
            tower="vision_model",  # transformers 4: every CLIP class; transformers 5: the model is the tower
            projection="visual_projection",  # absent from CLIPVisionModel checkpoints
            mean_std_optional=True,
            resample="bicubic",  # OpenAI's preprocessing, whatever the processor config says
            silence_load_report=True,  # it lists every text-tower key of a full CLIPModel checkpoint
        ),
        Family(
            name="siglip",  # SigLIP and fixed-resolution SigLIP 2
            label="siglip",
            model_types={"siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"},
            features={"pooled": "pooler", "mean": "patch_mean"},  # attention-pooling head; mean of the tokens
            tower="vision_model",
            cls_token=False,
            int_size_is_square=True,
        ),
        Family(
            name="dinov2",
            label="dinov2",
            model_types={"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"},
            features={"cls": "pooler", "mean": "patch_mean"},  # the pooler is the layer-normed CLS token
            takes_interpolate_pos_encoding=False,  # always interpolates
        ),
        Family(
            name="dinov3",
            label="dinov3",
            model_types={"dinov3_vit": "DINOv3ViTModel"},
            features={"cls": "pooler", "mean": "patch_mean"},
            takes_interpolate_pos_encoding=False,
        ),
        Family(
            name="vit",
            label="vit",
            model_types={"vit": "ViTModel"},
            features={"cls": "first_token", "mean": "patch_mean"},  # the CLS token, not the tanh pooler
            int_size_is_square=True,
            load_options={"add_pooling_layer": False},
        ),
    )
}
# config.json model_type -> (its family, the transformers class that loads it).
_MODEL_TYPES: dict[str, tuple[Family, str]] = {
    model_type: (family, class_name)
    for family in FAMILIES.values()
    for model_type, class_name in family.model_types.items()
}


def family_of_instance(model: nn.Module) -> Family | None:
    """The family of a transformers model instance; ``None`` for any other module (no config)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None and not hasattr(config, "vision_config"):
        return None
    return _family_of_model_type(model_type, type(model).__name__)[0]


def vision_parts(model: nn.Module, family: Family) -> tuple[nn.Module, nn.Linear | None, Any]:
    """(the tower called with ``pixel_values``, the projection or None, the vision config) of a
    transformers backbone read as a model of ``family``."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    if config is None or getattr(config, "image_size", None) is None:
        raise TypeError(
            f"model: expected a transformers {family.label} model with a vision config, got {type(model).__name__}"
        )
    tower = getattr(model, family.tower, None) if family.tower else None
    projection = getattr(model, family.projection, None) if family.projection else None
    return (tower if tower is not None else model), projection, config


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint located and its family known; :meth:`load` reads its weights."""

    name: str
    """As the caller gave it (a hub id or a folder path)."""
    source: str
    """What transformers loads from: the folder (``~`` expanded) where it exists, else the hub id."""
    family: Family
    model_class: str
    """The name of the transformers class that loads it (a value of ``family.model_types``)."""
    from_pretrained_kwargs: Mapping[str, Any]
    verbose: bool = False

    def load(self) -> tuple[nn.Module, ProcessorConfig, bool]:
        """(the vision backbone in eval mode, its preprocessor config or {}, whether the checkpoint
        holds every weight; only the projection's may be missing).

        Raises:
            CheckpointNotFoundError: the weights are not available locally.
            ValueError: the weights file is damaged, or tensors other than the projection's are missing.
        """
        import transformers  # heavy: only when a checkpoint is loaded

        family = self.family
        kwargs = dict(self.from_pretrained_kwargs)
        model_class = getattr(transformers, self.model_class)
        if getattr(model_class, "_supports_sdpa", False):
            kwargs.setdefault("attn_implementation", "sdpa")
        for key, value in family.load_options.items():
            kwargs.setdefault(key, value)
        try:
            with _quiet(self.verbose, load_report=not family.silence_load_report):
                model, info = model_class.from_pretrained(self.source, output_loading_info=True, **kwargs)
        except OSError as error:
            message = _not_found_message(self.name, self.source, kwargs, error, family.label)
            raise CheckpointNotFoundError(message) from None
        except Exception as error:
            raise _damaged_weights_error(self.name, self.source, error) from error
        missing = sorted(info["missing_keys"])
        required = [key for key in missing if not (family.projection and key.startswith(family.projection))]
        if required and family.projection:
            raise ValueError(
                f"model: {self.name!r} is not a {family.label} vision checkpoint: it has no weights for "
                f"{len(required)} vision-tower tensors, e.g. {required[:3]}"
            )
        if required:
            raise ValueError(
                f"model: {self.name!r} is not a complete {family.label} vision checkpoint: it has no weights for "
                f"{len(required)} tensors, e.g. {required[:3]}"
            )
        # Only the projection missing (a CLIPVisionModel checkpoint): the projection is random.
        return model, _read_processor_config(self.source, kwargs), not missing


def find_checkpoint(
    name: str,
    from_pretrained_kwargs: Mapping[str, Any],
    *,
    family: Family | None = None,
    caller: str = "FrozenEncoder",
    verbose: bool = False,
) -> Checkpoint:
    """Locate the checkpoint ``name`` (a folder, or a hub id in the local cache or downloaded unless
    offline) and pick its family from its ``config.json``, or take ``family`` as given.

    Raises:
        ValueError: ``trust_remote_code`` is set (``caller`` names the refusing class), or the
            model_type is not in :data:`FAMILIES`.
        CheckpointNotFoundError: no ``config.json`` is available locally.
    """
    kwargs = dict(from_pretrained_kwargs)
    if kwargs.pop("trust_remote_code", False):
        raise ValueError(
            f"trust_remote_code: {caller} never runs code shipped with a checkpoint; load the model yourself "
            "and pass the instance"
        )
    kwargs.pop("output_loading_info", None)
    folder = os.path.expanduser(name)
    source = folder if os.path.isdir(folder) else name
    if family is not None:
        return Checkpoint(name, source, family, next(iter(family.model_types.values())), kwargs, verbose)
    from transformers import AutoConfig  # heavy: only when a checkpoint is loaded

    try:
        with _quiet(verbose):
            config = AutoConfig.from_pretrained(source, **_lookup_kwargs(kwargs))
    except OSError as error:
        raise CheckpointNotFoundError(_not_found_message(name, source, kwargs, error, kind="")) from None
    family, model_class = _family_of_model_type(getattr(config, "model_type", None), repr(name))
    return Checkpoint(name, source, family, model_class, kwargs, verbose)


def _family_of_model_type(model_type: str | None, where: str) -> tuple[Family, str]:
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
    return _MODEL_TYPES[model_type]


def _lookup_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in _HUB_LOOKUP_KEYS if key in kwargs}


# --------------------------------------------------------------------------------------------
# the preprocessor config


def processor_geometry(
    processor: ProcessorConfig, family: Family, native_size: int, image_size: int | None
) -> tuple[int, ResizeSize]:
    """(image_size, resize size) from an explicit size, the processor config, or the model.

    A legacy int ``size`` is the shortest edge for CLIP's and DINOv2's (Bit) processors and a
    square (s, s) for ViT's and SigLIP's (:attr:`Family.int_size_is_square`), as transformers
    reads them."""
    if image_size is not None:
        return image_size, image_size
    resize_size = _processor_size("size", processor.get("size"))
    if family.int_size_is_square and isinstance(resize_size, int):
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


def processor_mean_std(processor: ProcessorConfig) -> tuple[Sequence[float], Sequence[float]]:
    """(image_mean, image_std) of the processor config: (0, 1) per channel where it does not
    normalise, OpenAI's CLIP constants where it names none."""
    if processor.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return processor.get("image_mean") or OPENAI_CLIP_MEAN, processor.get("image_std") or OPENAI_CLIP_STD


def processor_resample(processor: ProcessorConfig, family: Family | None) -> str:
    """The torch interpolation mode: the family's fixed one, else the processor's (bicubic by default)."""
    if family is not None and family.resample is not None:
        return family.resample
    return _RESAMPLE_MODES.get(processor.get("resample", 3), "bicubic")


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


def _read_processor_config(source: str, kwargs: Mapping[str, Any]) -> ProcessorConfig:
    """The checkpoint's preprocessor_config.json as a dict, {} where it has none.

    Resolved like the weights (folder, or HF cache honouring ``HF_HUB_OFFLINE`` and
    ``local_files_only``, downloading only when online)."""
    from transformers.utils.hub import cached_file  # heavy: only when a checkpoint is loaded

    try:
        path = cached_file(
            source,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **_lookup_kwargs(kwargs),
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


# --------------------------------------------------------------------------------------------
# errors and silence


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


def _not_found_message(name: str, source: str, kwargs: Mapping[str, Any], error: OSError, kind: str) -> str:
    """One line: what is missing where, and how to get it; ``kind`` names the family once it is known."""
    kind = f"{kind} " if kind else ""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if os.path.isdir(source):
        return (
            f"model: no {kind}checkpoint in the folder {source!r} (expected config.json and "
            "model.safetensors, as written by save_pretrained); pass the folder of a saved "
            f"checkpoint or a hub id. ({reason})"
        )
    from huggingface_hub import constants  # only on this error path

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


@contextlib.contextmanager
def _quiet(verbose: bool, *, load_report: bool = True) -> Iterator[None]:
    """Silence transformers' logging and progress bars (and huggingface_hub's) unless verbose;
    ``load_report=False`` keeps transformers' logging silent even when verbose. The previous
    settings are restored on exit."""
    if verbose and load_report:
        yield
        return
    from huggingface_hub.utils.tqdm import (  # heavy: only when a checkpoint is loaded
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging  # as above

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if not verbose:
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not verbose and bars:
            hf_logging.enable_progress_bar()
        if not verbose and not hub_bars:
            enable_progress_bars()
