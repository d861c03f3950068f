r"""The travel loss at any batch size, batch 1 included: pairs with a queue of earlier rows.

Transformation vectors need pairs, so a batch of one image has no travel loss. The queue keeps
the (detached) source and translation embeddings of the last K rows seen and pairs every row of
the current batch with them as well as with the other current rows. With current rows
:math:`i \in B` (:math:`|B| = n`) and queued rows :math:`Q` (:math:`|Q| = q \le K`),

.. math::  L = \frac{1}{n\,(n + q - 1)} \sum_{i \in B} \sum_{j \in B \cup Q,\, j \ne i}
           d\bigl(s_i - s_j,\; g_i - g_j\bigr),

with the distance :math:`d` of :func:`travel_loss.travel_loss` (``1 - cos`` by default). Queued
rows are constants: the gradient flows through the current rows only. After the loss, the current
rows are pushed (detached) and the oldest ones beyond K dropped.

The bias: a queued translation :math:`g_j` was produced by an *earlier* generator, and a queued
source embedding by the same frozen encoder. The loss therefore asks the current translation of
:math:`x_i` to keep its transformation vector towards what older generators made of
:math:`x_j`: stale partners that lag by up to K / n steps. Keep K small next to the number of
steps over which the generator changes much (a few hundred rows are common for
batch-1 CycleGAN / CUT runs), and note that the loss of a batch is not the loss of the same
batch under :func:`travel_loss` when q > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from travel_loss.loss import (
    DISTANCES,
    REDUCTIONS,
    Distance,
    Reduction,
    _check_all_finite,
    _check_option,
    _check_views_option,
    _pair_distances,
    _result_dtype,
)
from travel_loss.views import RandomViews, embed_views

__all__ = ["TravelQueue"]


class TravelQueue(nn.Module):
    r"""Travel loss over current-batch pairs and pairs with the last ``size`` queued rows.

    Args:
        size: K >= 0, the number of earlier rows kept. With K = 0 and n >= 2 the result equals
            :func:`travel_loss.travel_loss` exactly.
        distance: as in :func:`travel_loss.travel_loss`.
        reduction: ``"mean"`` over the :math:`n(n + q - 1)` pairs, ``"sum"`` over them, or
            ``"none"`` for the (n, n + q) matrix of pair distances, columns ordered as the
            current rows then the queue from oldest to newest, zero where j = i.
        check_finite: raise ``ValueError`` on NaN or infinite embeddings (one host sync).
        encoder: None (the default: the queue takes embeddings), or a frozen encoder (N, 3, H, W)
            -> (N, D): the queue then takes images, ``queue(x, fake)``, embeds ``x`` under
            ``torch.no_grad()`` and ``fake`` with gradient, as :class:`~travel_loss.TravelLoss` does.
        views: None, or :class:`~travel_loss.RandomViews` (needs ``encoder``, and
            ``average="embeddings"``): the current rows are the view-averaged embeddings of
            :func:`~travel_loss.views.embed_views`, and those are what is queued. Random numbers come
            from ``generator=`` of the call, or torch's global RNG.

    Call it with the (n, D) embeddings ``emb_src`` :math:`s_i = E(x_i)` and ``emb_gen``
    :math:`g_i = E(G(x_i))` of the current batch (n >= 1; (n, \*) inputs are flattened). With an
    empty queue and n = 1 it returns a zero that is part of the graph of ``emb_gen`` (backward
    gives zero gradients), so a training loop needs no special case for the first step.

    The queue is saved by ``state_dict()`` (as extra state) and restored by
    ``load_state_dict()``, so a resumed run continues with the same partners. ``.to(device)``
    moves it; it is kept in float32 (float64 for float64 inputs). Cost per call:
    :math:`O((n + K)^2 D)` flops and :math:`O((n + K)^2)` memory.

    Example (CycleGAN's batch 1):
        >>> queue = TravelQueue(size=64)
        >>> with torch.no_grad():
        ...     emb_src = encoder(real_a)
        >>> loss_g = loss_g + lam * queue(emb_src, encoder(fake_b))
    """

    if TYPE_CHECKING:
        # nn.Module.__call__ is typed (...) -> Any; calling the queue runs forward.
        def __call__(self, emb_src: Tensor, emb_gen: Tensor, *, generator: torch.Generator | None = None) -> Tensor: ...

    def __init__(
        self,
        size: int,
        *,
        distance: Distance = "cosine",
        reduction: Reduction = "mean",
        check_finite: bool = True,
        encoder: nn.Module | None = None,
        views: RandomViews | None = None,
    ) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size: expected an int >= 0 (rows kept from earlier batches), got {size!r}")
        _check_option("distance", distance, DISTANCES)
        _check_option("reduction", reduction, REDUCTIONS)
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder: expected None or an nn.Module mapping images to embeddings, got {type(encoder).__name__}"
            )
        _check_views_option(views, encoder)
        if views is not None and views.average != "embeddings":
            raise ValueError(
                f"views: a TravelQueue queues view-averaged embeddings, so it expects average='embeddings', got "
                f"average={views.average!r}"
            )
        self.encoder = encoder
        self.views = views
        self.size = size
        self.distance = distance
        self.reduction = reduction
        self.check_finite = check_finite
        self._src: Tensor | None = None  # (q, D) queued source embeddings, oldest first
        self._gen: Tensor | None = None  # (q, D) queued translation embeddings

    # ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """q, the number of rows in the queue now."""
        return 0 if self._src is None else int(self._src.shape[0])

    @property
    def queued(self) -> tuple[Tensor | None, Tensor | None]:
        """The queued (q, D) source and translation embeddings, oldest first (None when empty)."""
        return self._src, self._gen

    def reset(self) -> None:
        """Empty the queue."""
        self._src = self._gen = None

    def forward(self, emb_src: Tensor, emb_gen: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``(emb_src, emb_gen)`` without an encoder; ``(x, fake)`` images with one."""
        if generator is not None and self.views is None:
            raise ValueError("generator: draws the random views, but this TravelQueue has none (views=None)")
        if self.encoder is not None:
            emb_src, emb_gen = self._embed(emb_src, emb_gen, generator)
        src, gen = self._validated(emb_src, emb_gen)
        n = src.shape[0]
        if n == 1 and self.size == 0:
            raise ValueError(
                "emb_src: a batch of 1 has no pair, and a TravelQueue of size 0 keeps no earlier rows to pair "
                "it with: the loss would be 0 on every step; use size >= 1"
            )
        dtype = _result_dtype(src.dtype)
        queued = len(self)
        if queued == 0 and n == 1:
            result = gen.sum().to(dtype) * 0.0 + 0.0  # + 0.0: never a negative zero
            if self.reduction == "none":
                result = result.reshape(1, 1)
        else:
            all_src, all_gen = src.to(dtype), gen.to(dtype)
            if queued:
                all_src = torch.cat([all_src, self._src.to(src.device, dtype)])  # type: ignore[union-attr]
                all_gen = torch.cat([all_gen, self._gen.to(src.device, dtype)])  # type: ignore[union-attr]
            pair_distances = _pair_distances(all_src, all_gen, self.distance)[:n]
            if self.reduction == "none":
                result = pair_distances.to(dtype)
            elif self.reduction == "sum":
                result = pair_distances.sum().to(dtype)
            else:
                result = (pair_distances.sum() / (n * (n + queued - 1))).to(dtype)
        self._push(src.detach().to(dtype), gen.detach().to(dtype))
        return result

    # ----------------------------------------------------------------------------------------
    # state

    def get_extra_state(self) -> dict[str, Any]:
        return {"size": self.size, "src": self._src, "gen": self._gen}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"size", "src", "gen"}:
            raise ValueError(f"state: expected a TravelQueue state with keys gen, size, src, got {state!r:.200}")
        if state["size"] != self.size:
            raise ValueError(
                f"state: saved by a TravelQueue of size {state['size']}, loaded into one of size {self.size}; "
                "construct the queue with the saved size to resume exactly"
            )
        src, gen = state["src"], state["gen"]
        self._src = None if src is None else src.detach().clone()
        self._gen = None if gen is None else gen.detach().clone()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TravelQueue:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch
        if self._src is not None and self._gen is not None:  # both or neither
            # Device moves only: the queue keeps its own float32/float64 dtype.
            self._src = fn(self._src).to(self._src.dtype)
            self._gen = fn(self._gen).to(self._gen.dtype)
        return self

    def extra_repr(self) -> str:
        views = "" if self.views is None else f", views={self.views!r}"
        return f"size={self.size}, distance={self.distance!r}, reduction={self.reduction!r}, queued={len(self)}{views}"

    # ----------------------------------------------------------------------------------------
    # internals

    def _embed(self, x: Tensor, fake: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        assert self.encoder is not None
        # Without views: one view with every transform off, i.e. E(x) under no_grad and E(fake).
        views = RandomViews() if self.views is None else self.views
        src, gen = embed_views(self.encoder, x, fake, views, generator=generator)
        for name, embeddings in (("encoder(x)", src), ("encoder(fake)", gen)):
            if not isinstance(embeddings, Tensor):
                raise TypeError(f"{name}: a TravelQueue expects one (n, D) tensor, got {type(embeddings).__name__}")
        return src, gen

    def _push(self, src: Tensor, gen: Tensor) -> None:
        if self.size == 0:
            return
        if self._src is not None:
            src = torch.cat([self._src.to(src.device, src.dtype), src])
            gen = torch.cat([self._gen.to(gen.device, gen.dtype), gen])  # type: ignore[union-attr]
        self._src, self._gen = src[-self.size :].clone(), gen[-self.size :].clone()

    def _validated(self, emb_src: Tensor, emb_gen: Tensor) -> tuple[Tensor, Tensor]:
        for name, tensor in (("emb_src", emb_src), ("emb_gen", emb_gen)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() < 2 or tensor.shape[0] < 1:
                raise ValueError(
                    f"{name}: expected an (n, D) tensor of n >= 1 embeddings, got shape {tuple(tensor.shape)}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
        if emb_src.shape != emb_gen.shape:
            raise ValueError(
                "emb_src, emb_gen: expected the same shape (row i of one belongs to row i of the other), got "
                f"{tuple(emb_src.shape)} and {tuple(emb_gen.shape)}"
            )
        if emb_src.device != emb_gen.device:
            raise ValueError(
                f"emb_src, emb_gen: expected tensors on one device, got {emb_src.device} and {emb_gen.device}"
            )
        src, gen = emb_src.flatten(1), emb_gen.flatten(1)
        if self._src is not None and self._src.shape[1] != src.shape[1]:
            raise ValueError(
                f"emb_src: expected embeddings of size D = {self._src.shape[1]} like the queued ones, got D = "
                f"{src.shape[1]}; call reset() when switching encoders"
            )
        if self.check_finite:
            _check_all_finite(("emb_src", src), ("emb_gen", gen))
        return src, gen
