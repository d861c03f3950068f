r"""Exact micro-batching of the travel loss: the gradient-cache technique (Gao et al., 2021).

The travel loss couples a whole batch of N images, but only through their (N, D) embeddings.
Its gradient with respect to the generator's parameters :math:`\theta` factors through them:

.. math::

    \frac{\partial L_\mathrm{travel}}{\partial \theta}
      = \sum_{c} \sum_{i \in c} \Bigl(\frac{\partial L_\mathrm{travel}}{\partial g_i}\Bigr)^{\!\top}
        \frac{\partial g_i}{\partial \theta}, \qquad g_i = E(G(x_i)),

so the batch can be processed in chunks c of M images, keeping the autograd graph of one chunk
at a time:

1. :func:`embed_in_chunks`: the (N, D) embeddings of all chunks, without graphs.
2. :func:`travel_loss_and_embedding_grads`: the loss and the cached gradient
   :math:`\partial L / \partial g` (N, D) (and :math:`\partial L / \partial s` for a trainable
   embedder of the sources).
3. For each chunk: recompute its embeddings with a graph and call :func:`backward_chunk`, which
   back-propagates :math:`\sum_{i \in c} \langle g_i, \partial L / \partial g_i \rangle` plus any
   per-chunk loss of your own (an adversarial term, scaled by its share M/N of a batch mean).

The parameter gradients then equal those of the whole batch (up to float round-off) at the
memory of one chunk, for about one extra forward of G and E. The recomputation must reproduce
the first pass exactly: no batch statistics (BatchNorm in training mode), and random layers
(dropout, random augmentations) must draw the same numbers (reset the RNG state) or be off.

Example (a frozen encoder, a per-sample adversarial loss averaged over the batch)::

    from travel_loss.gradcache import backward_chunk, embed_in_chunks, travel_loss_and_embedding_grads

    emb_src = embed_in_chunks(encoder, x, chunk_size=16)
    emb_gen = embed_in_chunks(lambda xs: encoder(generator(xs)), x, chunk_size=16)
    loss, grad_gen, _ = travel_loss_and_embedding_grads(emb_src, emb_gen)
    for x_c, grad_c in zip(x.split(16), grad_gen.split(16)):
        fake_c = generator(x_c)
        adv_c = adversarial_loss(discriminator(fake_c)) * len(x_c) / len(x)
        backward_chunk(encoder(fake_c), lam * grad_c, adv_c)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from travel_loss.distributed import is_distributed
from travel_loss.loss import travel_loss

__all__ = ["EmbeddingGrads", "backward_chunk", "embed_in_chunks", "travel_loss_and_embedding_grads"]


class EmbeddingGrads(NamedTuple):
    """The loss and its gradient with respect to the two sets of embeddings.

    Attributes:
        loss: the detached scalar loss.
        grad_gen: :math:`\\partial L / \\partial g`, shaped and typed like ``emb_gen``.
        grad_src: :math:`\\partial L / \\partial s`, shaped like ``emb_src``; ``None`` unless
            requested with ``src_grad=True``.
    """

    loss: Tensor
    grad_gen: Tensor
    grad_src: Tensor | None


def embed_in_chunks(embed: Callable[[Tensor], Tensor], inputs: Tensor, chunk_size: int) -> Tensor:
    """``embed(inputs)`` computed on chunks of ``chunk_size`` rows under ``torch.no_grad()``.

    Args:
        embed: maps an (m, \\*) batch to (m, D) embeddings, e.g. ``encoder`` or
            ``lambda x: encoder(generator(x))``; row i of the output must depend on input row i
            only (no batch statistics).
        inputs: (N, \\*) batch.
        chunk_size: M >= 1 rows per call; the last chunk holds the remaining N mod M rows.

    Returns:
        The (N, D) concatenated embeddings, detached.
    """
    if not callable(embed):
        raise TypeError(f"embed: expected a callable, got {type(embed).__name__}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs: expected a non-empty (N, *) batch, got shape {tuple(inputs.shape)}")
    _check_chunk_size(chunk_size)
    with torch.no_grad():
        chunks = [embed(chunk) for chunk in inputs.split(chunk_size)]
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, Tensor):
            raise TypeError(
                f"embed: expected it to return a torch.Tensor, got {type(chunk).__name__} for chunk {index}"
            )
    return torch.cat(chunks)


def travel_loss_and_embedding_grads(
    emb_src: Tensor,
    emb_gen: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    src_grad: bool = False,
    global_batch: bool = False,
    **travel_options: Any,
) -> EmbeddingGrads:
    r"""The loss of the whole batch and its gradient with respect to the embeddings.

    .. math::  \ell = L(S, G), \qquad \nabla_G \ell \in \mathbb{R}^{N \times D}
               \;(\text{and } \nabla_S \ell \text{ when } \texttt{src\_grad}),

    computed on detached copies of the embeddings, so that nothing is kept of the graphs that
    produced them. Back-propagating ``grad_gen[i]`` from the recomputed :math:`g_i` (see
    :func:`backward_chunk`) yields exactly :math:`\partial \ell / \partial \theta`.

    Args:
        emb_src: (N, D) source embeddings :math:`s_i = E(x_i)` (from :func:`embed_in_chunks`).
        emb_gen: (N, D) embeddings :math:`g_i = E(G(x_i))` of the translations, same shape.
        loss_fn: ``loss_fn(emb_src, emb_gen) -> scalar``; by default
            ``travel_loss(emb_src, emb_gen, **travel_options)``. Any loss that couples the batch
            only through the embeddings works (e.g. travel loss plus a margin term on ``emb_src``).
        src_grad: also return :math:`\nabla_S \ell` (a *trainable* embedder of the sources).
        global_batch: under ``torch.distributed``, pass this rank's (n, D) rows: the rows of all
            ranks are gathered (rank order, no graph), the loss is that of the global batch of
            ``world_size * n`` rows, and the returned gradients are this rank's n rows multiplied
            by ``world_size``, so that DDP's averaging of parameter gradients gives exactly the
            global-batch gradient (the convention of :mod:`travel_loss.distributed`). Without a
            process group it changes nothing.
        **travel_options: keyword arguments of :func:`travel_loss` (``distance``, ``reduction``,
            ``check_finite``); only without ``loss_fn``.

    Returns:
        :class:`EmbeddingGrads` ``(loss, grad_gen, grad_src)``; the gradients have the dtype of
        the embeddings given.
    """
    for name, value in (("emb_src", emb_src), ("emb_gen", emb_gen)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of embeddings, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if emb_src.shape != emb_gen.shape:
        raise ValueError(
            f"emb_src, emb_gen: expected the same shape, got {tuple(emb_src.shape)} and {tuple(emb_gen.shape)}"
        )
    if loss_fn is not None and travel_options:
        raise ValueError(
            f"travel_options: give either loss_fn or options of travel_loss, got both ({sorted(travel_options)})"
        )
    if loss_fn is None:

        def loss_fn(src: Tensor, gen: Tensor) -> Tensor:
            return travel_loss(src, gen, **travel_options)

    src, gen = emb_src.detach(), emb_gen.detach()
    rows, world_size, rank = src.shape[0], 1, 0
    if global_batch and is_distributed():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        src, gen = _all_gather(src), _all_gather(gen)
    src, gen = src.requires_grad_(src_grad), gen.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(src, gen)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn: expected it to return a scalar tensor, got {_describe(loss)}")
        grads = torch.autograd.grad(loss, [gen, src] if src_grad else [gen], allow_unused=True)
    own_rows = slice(rank * rows, (rank + 1) * rows)
    local = [None if grad is None else grad[own_rows] * world_size for grad in grads]
    grad_gen = torch.zeros_like(emb_gen) if local[0] is None else local[0]
    grad_src = None
    if src_grad:
        grad_src = torch.zeros_like(emb_src) if local[1] is None else local[1]
    return EmbeddingGrads(loss.detach(), grad_gen, grad_src)


def backward_chunk(
    emb_chunk: Tensor,
    grad_chunk: Tensor,
    chunk_loss: Tensor | None = None,
    *,
    inputs: Sequence[Tensor] | None = None,
) -> None:
    r"""Back-propagate one chunk: :math:`\sum_{i \in c} \langle e_i, \gamma_i \rangle + \ell_c`.

    One backward pass (one DDP reduction when the chunk went through a DDP module) of the
    recomputed embeddings ``emb_chunk`` :math:`e_i` with the cached gradient rows
    ``grad_chunk`` :math:`\gamma_i` (scale them by lambda first), plus an optional scalar
    ``chunk_loss`` :math:`\ell_c` of the same chunk. Gradients accumulate in ``.grad`` as with
    ``Tensor.backward``; over all chunks they sum to those of the whole batch.

    Args:
        emb_chunk: (m, D) embeddings of the chunk, computed with a graph.
        grad_chunk: the matching (m, D) rows of a cached gradient (any floating dtype; cast to
            ``emb_chunk``'s, as autograd does for a dtype cast in the forward).
        chunk_loss: a scalar loss of this chunk, or ``None``.
        inputs: as in ``Tensor.backward``: accumulate only into these tensors.
    """
    if not isinstance(emb_chunk, Tensor) or not isinstance(grad_chunk, Tensor):
        raise TypeError(
            f"emb_chunk, grad_chunk: expected torch.Tensors, got {type(emb_chunk).__name__} and "
            f"{type(grad_chunk).__name__}"
        )
    if emb_chunk.shape != grad_chunk.shape:
        raise ValueError(
            f"emb_chunk, grad_chunk: expected the same shape, got {tuple(emb_chunk.shape)} and "
            f"{tuple(grad_chunk.shape)} (split the cached gradient with the chunk size of the inputs)"
        )
    if not emb_chunk.requires_grad:
        raise ValueError("emb_chunk: expected embeddings computed with a graph (requires_grad), got a detached tensor")
    tensors, grads = [emb_chunk], [grad_chunk.to(emb_chunk.dtype)]
    if chunk_loss is not None:
        if not isinstance(chunk_loss, Tensor) or chunk_loss.numel() != 1:
            raise ValueError(f"chunk_loss: expected None or a scalar tensor, got {_describe(chunk_loss)}")
        tensors.append(chunk_loss)
        grads.append(torch.ones_like(chunk_loss))
    torch.autograd.backward(tensors, grads, inputs=None if inputs is None else list(inputs))


def _all_gather(x: Tensor) -> Tensor:
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


def _check_chunk_size(chunk_size: object) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
