"""A user's own frozen embedder in the trainer: ``--encoder-mode module --encoder SPEC``.

``SPEC`` names a factory, a callable that returns an ``nn.Module``:

- ``path/to/file.py:FACTORY`` - a Python file, loaded by path (it need not be on ``sys.path``);
- ``package.module:FACTORY`` - an importable module.

The factory is called with keyword ``image_size=<the trainer's --size>`` when its signature
accepts that name, else with no arguments. The module it returns maps images (N, 3, S, S) in
the trainer's range [-1, 1] to (N, D) or (N, ...) features (flattened to (N, D)). The trainer
freezes it (eval mode, no parameter requires grad) and checks it with
``travel_loss.testing.check_embedder`` before the first step; a failing embedder stops the run
with the kit's message.

The structure term (``--lambda-structure``) needs spatial features too: the module provides them
with a ``tokens(images)`` method returning (N, L, C) tokens or (N, C, H, W) maps, or with
``forward_with_tokens(images) -> (features, tokens)`` (one pass for both). Without either, a run
with a structure term stops before the first step, naming the flag.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["EmbedderSpecError", "FlattenFeatures", "build_user_embedder", "load_factory"]


class EmbedderSpecError(ValueError):
    """``--encoder`` does not name a usable factory, or the embedder it builds fails the checks."""


def _load_file_module(path: Path) -> Any:
    name = f"travel_loss_user_embedder_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EmbedderSpecError(f"encoder: cannot load {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise EmbedderSpecError(f"encoder: importing {str(path)!r} failed: {type(error).__name__}: {error}") from error
    return module


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable that ``spec`` (``FILE.py:NAME`` or ``package.module:NAME``) names."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise EmbedderSpecError(f"encoder: expected FILE.py:FACTORY or package.module:FACTORY, got {spec!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise EmbedderSpecError(f"encoder: no such file {where!r} (from {spec!r})")
        module = _load_file_module(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise EmbedderSpecError(f"encoder: cannot import module {where!r} (from {spec!r}): {error}") from error
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise EmbedderSpecError(f"encoder: {where!r} has no callable named {name!r}")
    return factory


class FlattenFeatures(nn.Module):
    """Wraps an embedder so that its (N, ...) features come out as (N, D)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: Tensor) -> Tensor:
        return self.embedder(images).flatten(1)

    @property
    def gives_tokens(self) -> bool:
        """Whether the embedder has spatial features for the structure term (see the module docstring)."""
        return any(callable(getattr(self.embedder, name, None)) for name in ("forward_with_tokens", "tokens"))

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """The embedder's ``token_grid`` (h, w) for (N, L, C) tokens, if it says; maps carry their own."""
        return getattr(self.embedder, "token_grid", None)

    def forward_with_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """((N, D) features, the embedder's tokens): one call of its ``forward_with_tokens``, or its
        forward and its ``tokens``."""
        embedder: Any = self.embedder  # its own methods, looked up by name
        if callable(getattr(embedder, "forward_with_tokens", None)):
            features, tokens = embedder.forward_with_tokens(images)
            return features.flatten(1), tokens
        if not self.gives_tokens:
            raise ValueError(
                f"embedder: {type(self.embedder).__name__} has no tokens(images) or forward_with_tokens(images) method"
            )
        return self(images), embedder.tokens(images)


def build_user_embedder(spec: str, image_size: int, *, check: bool = True) -> nn.Module:
    """Build, freeze and check the embedder that the factory named by ``spec`` returns.

    Returns a frozen module in eval mode with (N, D) output. Raises :class:`EmbedderSpecError`
    when the spec, the factory call or ``travel_loss.testing.check_embedder`` fails.
    """
    factory = load_factory(spec)
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = {"image_size": image_size} if "image_size" in parameters else {}
    try:
        embedder = factory(**kwargs)
    except Exception as error:
        raise EmbedderSpecError(f"encoder: calling {spec!r} failed: {type(error).__name__}: {error}") from error
    if not isinstance(embedder, nn.Module):
        raise EmbedderSpecError(f"encoder: {spec!r} must return an nn.Module, got {type(embedder).__name__}")
    frozen = FlattenFeatures(embedder).requires_grad_(False).eval()
    if check:
        from travel_loss.testing import check_embedder

        try:
            check_embedder(frozen, image_shape=(3, image_size, image_size), input_range=(-1.0, 1.0))
        except AssertionError as error:
            raise EmbedderSpecError(
                f"encoder: the embedder from {spec!r} fails travel_loss.testing.check_embedder: {error}"
            ) from error
    return frozen
