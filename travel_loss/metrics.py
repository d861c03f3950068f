r"""Travel consistency of a translator over a whole evaluation set, batch by batch, DDP-aware.

The travel consistency is the mean cosine between the transformation vectors of the sources and
of their translations over all ordered pairs :math:`i \ne j` of the set,

.. math::  C = \frac{1}{N(N-1)} \sum_{i \ne j} \cos\bigl(s_i - s_j,\; g_i - g_j\bigr)
           = 1 - L_\mathrm{travel}(S, G) \in [-1, 1],

1 when every transformation vector kept its direction. Pairs span batches (and ranks), so the
metric keeps the embeddings themselves, the sufficient statistics of a mean over all pairs of
cosines: :math:`O(ND)` memory, and :meth:`TravelConsistency.compute` builds :math:`N \times N`
Gram matrices (fine up to several thousand rows; subsample larger sets).
:meth:`TravelConsistency.flip_scores` gives the per-image audit of :func:`travel_loss.flip_scores`
over the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from travel_loss.audit import Method, flip_scores
from travel_loss.loss import travel_loss

__all__ = ["TravelConsistency"]

Embeddings = Tensor | Sequence[Tensor]


class TravelConsistency:
    r"""Accumulates (n, D) embedding pairs with :meth:`update`; :meth:`compute` gives C over all rows.

    Args:
        sync: inside an initialised ``torch.distributed`` process group, :meth:`compute` gathers
            the rows of every rank (ranks may hold different numbers of rows), so every rank
            returns the metric of the union of all ranks' rows, ordered by rank. Without a process
            group it does nothing. :meth:`compute` is then a collective: call it on every rank.
        group: the process group (the default group when ``None``).

    ``update`` also takes equally long sequences of tensors, one per encoder (the output of an
    :class:`~travel_loss.EncoderEnsemble`); ``compute`` then gives the mean over the encoders,
    as :func:`~travel_loss.travel_loss` does. The value equals
    ``1 - travel_loss(cat(S), cat(G), distance="cosine", reduction="mean")``.

    >>> metric = TravelConsistency()
    >>> for x in loader:
    ...     with torch.no_grad():
    ...         metric.update(encoder(x), encoder(generator(x)))
    >>> consistency = float(metric.compute())
    """

    def __init__(self, *, sync: bool = True, group: dist.ProcessGroup | None = None) -> None:
        self.sync = bool(sync)
        self.group = group
        self.reset()

    def reset(self) -> None:
        """Forget every row seen."""
        self._src: list[list[Tensor]] = []  # per encoder, a list of (n, D_k) chunks
        self._gen: list[list[Tensor]] = []
        self._as_sequence: bool | None = None

    def __len__(self) -> int:
        """Rows accumulated on this rank."""
        return sum(chunk.shape[0] for chunk in self._src[0]) if self._src else 0

    def update(self, emb_src: Embeddings, emb_gen: Embeddings) -> None:
        """Add n rows: ``emb_src`` (n, D) embeddings of sources, ``emb_gen`` of their translations
        (row i of one belongs to row i of the other; (n, \\*) inputs are flattened). Detached."""
        as_sequence = isinstance(emb_src, (list, tuple))
        if as_sequence != isinstance(emb_gen, (list, tuple)):
            raise TypeError(
                "emb_src, emb_gen: expected two tensors or two sequences of tensors (one per encoder), got "
                f"{type(emb_src).__name__} and {type(emb_gen).__name__}"
            )
        # Elements as given; _checked rejects what is not a tensor.
        srcs: list[Any] = list(emb_src) if as_sequence else [emb_src]
        gens: list[Any] = list(emb_gen) if as_sequence else [emb_gen]
        if len(srcs) != len(gens) or not srcs:
            raise ValueError(
                f"emb_src, emb_gen: expected equally long, non-empty sequences, got lengths {len(srcs)} and {len(gens)}"
            )
        if self._as_sequence is not None and (as_sequence, len(srcs)) != (self._as_sequence, len(self._src)):
            raise ValueError(
                f"emb_src: expected the same kind of input as before ({len(self._src)} encoder(s), "
                f"{'sequence' if self._as_sequence else 'tensor'}), got {len(srcs)}; call reset() first"
            )
        checked = [self._checked(k, s, g) for k, (s, g) in enumerate(zip(srcs, gens))]
        if self._as_sequence is None:
            self._as_sequence = as_sequence
            self._src, self._gen = [[] for _ in srcs], [[] for _ in srcs]
        for k, (s, g) in enumerate(checked):
            self._src[k].append(s)
            self._gen[k].append(g)

    def compute(self) -> Tensor:
        """C over every row seen (on all ranks with ``sync``), a 0-D float32 (float64) tensor."""
        values = [
            1.0 - travel_loss(src, gen, distance="cosine", reduction="mean") for src, gen in self._all_rows("compute")
        ]
        return torch.stack(values).mean(dim=0)

    def flip_scores(self, *, method: Method = "row_mean", neighbours: int = 10, chunk_size: int = 1024) -> Tensor:
        """:func:`~travel_loss.flip_scores` of every row seen, an (N,) tensor, higher = more likely flipped.

        Rows are scored against all rows (on all ranks with ``sync``: a collective, call it on every
        rank), and come back in the order they were given: this rank's updates in order, ranks in
        rank order (with a ``DistributedSampler`` without shuffling, rank r's rows are the data
        set's items r, r + W, r + 2W, ...). Sequences of encoders give the mean of their scores.
        """
        rows = self._all_rows("flip_scores")
        return flip_scores(
            [src for src, _ in rows],
            [gen for _, gen in rows],
            method=method,
            neighbours=neighbours,
            chunk_size=chunk_size,
        )

    def _all_rows(self, caller: str) -> list[tuple[Tensor, Tensor]]:
        """Per encoder, the (N, D_k) sources and translations of every row (of every rank with ``sync``)."""
        synced = self.sync and dist.is_available() and dist.is_initialized()
        if not self._src and not synced:
            raise ValueError(f"{caller}: no rows yet; call update() with at least 2 rows in total first")
        rows = []
        for k in range(len(self._src) if self._src else 1):
            src = torch.cat(self._src[k]) if self._src else None
            gen = torch.cat(self._gen[k]) if self._gen else None
            if synced:
                src, gen = _gather_rows(src, self.group), _gather_rows(gen, self.group)
            if src is None or gen is None or src.shape[0] < 2:
                got = 0 if src is None else src.shape[0]
                raise ValueError(f"{caller}: expected at least 2 rows in total (pairs), got {got}")
            rows.append((src, gen))
        return rows

    def _checked(self, k: int, src: Tensor, gen: Tensor) -> tuple[Tensor, Tensor]:
        suffix = f"[{k}]" if self._as_sequence or k else ""
        for name, tensor in ((f"emb_src{suffix}", src), (f"emb_gen{suffix}", gen)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() < 2 or tensor.shape[0] < 1 or not tensor.is_floating_point():
                raise ValueError(
                    f"{name}: expected a floating-point (n, D) tensor with n >= 1, got shape {tuple(tensor.shape)} "
                    f"and dtype {tensor.dtype}"
                )
        if src.shape != gen.shape:
            raise ValueError(
                f"emb_src{suffix}, emb_gen{suffix}: expected the same shape, got {tuple(src.shape)} and "
                f"{tuple(gen.shape)}"
            )
        src, gen = src.detach().flatten(1), gen.detach().flatten(1)
        if self._src and self._src[k][0].shape[1] != src.shape[1]:
            raise ValueError(
                f"emb_src{suffix}: expected D = {self._src[k][0].shape[1]} as in earlier updates, got {src.shape[1]}"
            )
        return src, gen


def _gather_rows(rows: Tensor | None, group: dist.ProcessGroup | None) -> Tensor | None:
    """Concatenate every rank's (n_r, D) rows in rank order (n_r may differ; a rank may have none)."""
    world = dist.get_world_size(group)
    meta = None if rows is None else (rows.shape[0], rows.shape[1], str(rows.dtype).replace("torch.", ""))
    metas: list[tuple[int, int, str] | None] = [None] * world
    dist.all_gather_object(metas, meta, group=group)
    known = [m for m in metas if m is not None]
    if not known:
        return None
    width, dtype = known[0][1], getattr(torch, known[0][2])
    if rows is None:
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        rows = torch.zeros(0, width, dtype=dtype, device=device)
    counts = [0 if m is None else m[0] for m in metas]
    longest = max(counts)
    padded = torch.zeros(longest, width, dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([chunk[:count] for chunk, count in zip(gathered, counts)])
