r"""Label-free flip audit: which translations most likely lost their content?

For N sources with embeddings :math:`s_i` and their translations with embeddings :math:`g_i` (from
a frozen encoder), the travel distance of a pair is that of :func:`~travel_loss.travel_loss`,

.. math::  D_{ij} = 1 - \cos(s_i - s_j,\; g_i - g_j) \in [0, 2], \qquad D_{ii} = 0 .

A translation that kept its content keeps its transformation vectors to the other images; one
that flipped (a 0 painted as a 6) turns them. :func:`flip_scores` turns this into one score per
image, higher = more suspicious:

- ``"row_mean"`` (the default): :math:`r_i = \frac{1}{N-1}\sum_{j \ne i} D_{ij}`, the row mean of
  ``travel_loss(..., reduction="none")``.
- ``"local"``: the mean of :math:`D_{ij}` over :math:`j \in \mathcal N_i`, the ``neighbours``
  nearest sources of :math:`s_i` together with the ``neighbours`` nearest translations of
  :math:`g_i` (Euclidean, self excluded; a tie at the k-th distance takes all tied). Flips are
  local confusions: the pairs to the images a source was close to, and to those its translation
  now sits among, turn the most. Kept for comparison, not recommended: in the digit study it
  ranked the judge's flips below the row mean in 14 of 15 runs with the audit embedder
  (CycleGAN: AUROC 0.45-0.73 against 0.79-0.82).

Invariances: :math:`D`, and so both scores, do not change under an offset or a positive scale of
either set, nor under one orthogonal map applied to both sets. Both are 0 for every image when
the translations are the sources up to such a map, and equivariant under a permutation of the
images. Swapping the translations of two images i, k (the rest unchanged) gives exactly those
two the highest row means (:math:`D_{ik} = 2`, and every other nonzero entry of the matrix lies
in their rows and columns); the tests check the same for ``"local"``.

Cost: :math:`O(N^2 D)` flops, in row blocks of ``chunk_size``: memory :math:`O(\text{chunk}
\cdot N)`, about ten (chunk, N) float64 blocks (0.8 GB at N = 10,000 with the default chunk of
1024), never an :math:`N \times N` matrix, so N is bounded by time (quadratic), not memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from torch import Tensor

from travel_loss.loss import (
    _ZERO_LENGTH_RTOL_IN_EPS,
    _centred,
    _check_option,
    _compute_dtype,
    _encoder_pairs,
    _result_dtype,
    _validated_pair,
)

__all__ = ["METHODS", "flip_scores"]

Method = Literal["row_mean", "local"]
Embeddings = Tensor | Sequence[Tensor]

METHODS: tuple[str, ...] = ("row_mean", "local")


def flip_scores(
    emb_src: Embeddings,
    emb_gen: Embeddings,
    *,
    method: Method = "row_mean",
    neighbours: int = 10,
    chunk_size: int = 1024,
    check_finite: bool = True,
) -> Tensor:
    r"""One flip score per image, higher = more likely that the translation lost its content.

    Args:
        emb_src: (N, D) embeddings of the N sources by a frozen encoder ((N, \*) inputs are
            flattened); N >= 2. Audit with an encoder the generator was *not* trained against:
            a generator can game its own training encoder, and then scores low where it flipped.
        emb_gen: (N, D) embeddings of their translations, row i belonging to row i of ``emb_src``.
            Both may instead be equally long sequences of tensors, one per encoder; the result
            is then the mean of the per-encoder scores.
        method: ``"row_mean"`` or ``"local"`` (the module docstring gives the math).
        neighbours: k, the size of each image's neighbourhood in either space for ``"local"``
            (clipped to N - 1; ignored by ``"row_mean"``).
        chunk_size: rows scored at once; memory grows as ``chunk_size * N``.
        check_finite: as in :func:`~travel_loss.travel_loss`.

    Returns:
        (N,) scores in [0, 2] in input order, float32 (float64 for float64 inputs).

    Raises:
        TypeError, ValueError: as :func:`~travel_loss.travel_loss` for the embeddings (named in
        the message), or an unknown ``method``, or ``neighbours``/``chunk_size`` not an int >= 1.
    """
    _check_option("method", method, METHODS)
    for name, value in (("neighbours", neighbours), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(emb_src, (list, tuple)) or isinstance(emb_gen, (list, tuple)):
        pairs = _encoder_pairs(emb_src, emb_gen)
        scores = [
            flip_scores(s, g, method=method, neighbours=neighbours, chunk_size=chunk_size, check_finite=check_finite)
            for s, g in pairs
        ]
        return torch.stack(scores).mean(dim=0)
    src, gen = _validated_pair(cast(Tensor, emb_src), cast(Tensor, emb_gen), "emb_src", "emb_gen", check_finite)
    compute_dtype = _compute_dtype(src.device)
    s, g = _centred(src.to(compute_dtype)), _centred(gen.to(compute_dtype))
    score_rows = _SCORERS[method]
    k = min(neighbours, s.shape[0] - 1)
    parts = [score_rows(_RowBlock(s, g, start, chunk_size), k) for start in range(0, s.shape[0], chunk_size)]
    return torch.cat(parts).to(_result_dtype(src.dtype))


class _RowBlock:
    r"""Rows ``start : start + size`` of the pair quantities, from Gram blocks (nothing N x N x D):
    squared lengths :math:`\|s_i - s_j\|^2`, :math:`\|g_i - g_j\|^2` and the travel distances
    :math:`D_{ij}` (zero-length vectors have cosine 0, as in the loss), each (rows, N)."""

    def __init__(self, s: Tensor, g: Tensor, start: int, size: int) -> None:
        rows = slice(start, min(start + size, s.shape[0]))
        norms_s, norms_g = s.square().sum(1), g.square().sum(1)
        cross_diagonal = (s * g).sum(1)
        self.squared_src = _squared_distances(s[rows] @ s.mT, norms_s, rows)
        self.squared_gen = _squared_distances(g[rows] @ g.mT, norms_g, rows)
        dot = cross_diagonal[rows, None] + cross_diagonal[None, :] - s[rows] @ g.mT - g[rows] @ s.mT
        eps = _ZERO_LENGTH_RTOL_IN_EPS * torch.finfo(s.dtype).eps
        zero_length = (self.squared_src <= eps * (norms_s[rows, None] + norms_s[None, :])) | (
            self.squared_gen <= eps * (norms_g[rows, None] + norms_g[None, :])
        )
        denominator = (self.squared_src * self.squared_gen).sqrt().masked_fill(zero_length, 1.0)
        cosine = (dot / denominator).clamp(-1.0, 1.0).masked_fill(zero_length, 0.0)
        self.self_mask = torch.zeros_like(zero_length)
        index = torch.arange(rows.start, rows.stop, device=s.device)
        self.self_mask[index - rows.start, index] = True
        self.distances = (1.0 - cosine).masked_fill(self.self_mask, 0.0)


def _squared_distances(gram_rows: Tensor, norms: Tensor, rows: slice) -> Tensor:
    return (norms[rows, None] + norms[None, :] - 2 * gram_rows).clamp_min(0)


def _row_mean(block: _RowBlock, k: int) -> Tensor:
    del k
    return block.distances.sum(1) / (block.distances.shape[1] - 1)


def _local(block: _RowBlock, k: int) -> Tensor:
    neighbourhood = _nearest(block.squared_src, block.self_mask, k) | _nearest(block.squared_gen, block.self_mask, k)
    return (block.distances * neighbourhood).sum(1) / neighbourhood.sum(1)


def _nearest(squared: Tensor, self_mask: Tensor, k: int) -> Tensor:
    """(rows, N) mask of each row's k nearest others; a tie at the k-th distance takes every tied
    one (so the mask does not depend on the order of the images)."""
    others = squared.masked_fill(self_mask, float("inf"))
    kth = others.kthvalue(k, dim=1, keepdim=True).values
    return others <= kth


_SCORERS = {"row_mean": _row_mean, "local": _local}
