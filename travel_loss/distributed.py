r"""The travel loss over the *global* batch under data parallelism.

The paper's loss compares every pair of a batch of 128. Under DDP each rank holds only its own
rows, so pairs would never span ranks and the loss would change with the number of GPUs. Gather
the embeddings of all ranks first, with gradient::

    from travel_loss import travel_loss
    from travel_loss.distributed import all_gather_with_grad

    with torch.no_grad():
        emb_src = all_gather_with_grad(encoder(x))          # (world * n, D)
    emb_gen = all_gather_with_grad(encoder(generator(x)))   # gradient flows back to every rank
    loss_g = adversarial + lam * travel_loss(emb_src, emb_gen)
    loss_g.backward()                                       # DDP averages: exact global gradient

Gradient convention: every rank computes the same global loss, and the backward of the gather
*sums* the gradients that all ranks send to a rank's rows, so each rank receives
``world_size`` times the gradient of the global loss with respect to its own rows. DDP's
averaging of parameter gradients divides by ``world_size`` again, so the generator receives
exactly the gradient of the global-batch loss, the same as one process with the whole batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "is_distributed"]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's (n, \\*) rows in rank order, keeping the autograd graph.

    Args:
        x: this rank's (n, \\*) tensor; n must be the same on every rank (use
            ``DistributedSampler(..., drop_last=True)`` and ``DataLoader(..., drop_last=True)``).
        group: the process group; the default group when ``None``.

    Returns:
        (world_size * n, \\*) tensor; ``x`` itself when no process group is initialised, so the
        same code runs in a single process. Its backward sums, over ranks, the gradients sent to
        this rank's rows (see the module docstring for why that is the right convention for DDP).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x: expected a tensor with a batch dimension, got a 0-D tensor")
    if not is_distributed():
        return x
    group = dist.group.WORLD if group is None else group
    if not x.requires_grad:
        gathered = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, x.contiguous(), group=group)
        return torch.cat(gathered)
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives) whose name changes
        # between releases; this one works from torch 2.4 on, on gloo and NCCL.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x, group=group))
