r"""CUT's multilayer patchwise contrastive loss (PatchNCE), a baseline of the reference trainer.

Park, Efros, Zhang and Zhu, "Contrastive Learning for Unpaired Image-to-Image Translation"
(ECCV 2020). For a source batch x and its translation G(x), at each chosen layer l of G's own
encoder (:meth:`reference.models.ResnetGenerator.encoder_features`):

1. the features :math:`F_l(x)` (keys, no gradient) and :math:`F_l(G(x))` (queries), both (N, C_l, H_l, W_l);
2. P_l = min(num_patches, H_l W_l) locations, drawn once per layer and shared by every image
   and by keys and queries (:func:`sample_locations`);
3. at those locations, a 2-layer MLP head :math:`h_l` (Linear(C_l, 256), ReLU, Linear(256, 256)),
   then L2 normalisation (:class:`PatchHeads`): :math:`k_{n,i} = h_l(F_l(x)_{n,:,p_i}) / \lVert\cdot\rVert`,
   :math:`q_{n,i}` likewise from G(x);
4. the InfoNCE loss of each query against its own key among the other P_l - 1 keys of the same
   image (:func:`patch_nce_loss`), averaged over patches, then over layers (:func:`patch_nce_per_image`).

The trainer adds :math:`\lambda_\mathrm{NCE}` times this to G's loss and trains the heads with
G's loss (``reference.steps.generator_step``). With CUT's ``nce_idt`` the same term on (y, G(y))
for target images y is averaged with it: :math:`(\mathrm{NCE}_X + \mathrm{NCE}_Y) / 2`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.models import init_weights

__all__ = ["PatchHeads", "patch_nce_loss", "patch_nce_per_image", "sample_locations"]


class PatchHeads(nn.Module):
    r"""CUT's PatchSampleF with MLPs: one head per layer, applied at given locations, L2-normalised.

    ``channels[l]`` is the channel count C_l of layer l's features. Head l is
    Linear(C_l, dim), ReLU, Linear(dim, dim) (CUT: dim = 256). Built eagerly; weights drawn from
    normal(0, 0.02) (biases 0) by a generator seeded with ``seed``, so the initial heads depend on
    ``seed`` alone and building them leaves torch's global random state as it was.
    """

    def __init__(self, channels: Sequence[int], dim: int = 256, seed: int = 0) -> None:
        super().__init__()
        if not channels or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in channels):
            raise ValueError(f"channels: expected a non-empty sequence of ints >= 1, got {channels!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(c, dim), nn.ReLU(), nn.Linear(dim, dim)) for c in channels
            )
            init_weights(self)

    def forward(self, features: Sequence[Tensor], locations: Sequence[Tensor]) -> list[Tensor]:
        """Per layer l: features (N, C_l, H_l, W_l) and locations (P_l,) flat indices into H_l W_l
        -> (N, P_l, dim) unit vectors (in at least float32)."""
        if len(features) != len(self.heads) or len(locations) != len(self.heads):
            raise ValueError(
                f"features, locations: expected {len(self.heads)} of each (one per head), "
                f"got {len(features)} and {len(locations)}"
            )
        embedded = []
        for head, feature, where in zip(self.heads, features, locations):
            patches = feature.flatten(2)[:, :, where].transpose(1, 2)  # (N, P_l, C_l)
            out = head(patches)
            embedded.append(F.normalize(out.to(torch.promote_types(out.dtype, torch.float32)), dim=-1, eps=1e-7))
        return embedded


def sample_locations(features: Sequence[Tensor], num_patches: int = 256) -> list[Tensor]:
    """Per layer, the flat indices (P_l,) into H_l W_l of the sampled patches, on the features' device.

    P_l = min(num_patches, H_l W_l): a random subset (torch's global CPU generator) where a layer
    has more locations than ``num_patches``, else all of them in order. One draw per layer for the
    whole batch (CUT's choice): every image, and keys and queries, use the same locations.
    """
    if not isinstance(num_patches, int) or isinstance(num_patches, bool) or num_patches < 1:
        raise ValueError(f"num_patches: expected an int >= 1, got {num_patches!r}")
    locations = []
    for feature in features:
        count = feature.shape[-2] * feature.shape[-1]
        where = torch.arange(count) if count <= num_patches else torch.randperm(count)[:num_patches]
        locations.append(where.to(feature.device))
    return locations


def patch_nce_loss(query: Tensor, key: Tensor, temperature: float = 0.07, reduction: str = "mean") -> Tensor:
    r"""The PatchNCE loss of one layer: each query against its own key among its image's keys.

    ``query``, ``key``: (N, P, D) unit vectors (P patches of N images). With
    :math:`s_{n,i,j} = \langle q_{n,i}, k_{n,j} \rangle / \tau`,

    .. math::  \ell_{n,i} = -\log \frac{\exp s_{n,i,i}}{\exp s_{n,i,i} + \sum_{j \ne i} \exp s_{n,i,j}}
               = \operatorname{logsumexp}_j s_{n,i,j} - s_{n,i,i}

    i.e. cross-entropy over [positive] ++ [the other P - 1 patches of the same image as negatives],
    the positive as target. (CUT writes the positive as logit 0 and fills the diagonal of the
    negatives with -10 before dividing by tau, which differs from removing it by a term of
    :math:`\exp(-10/\tau) \approx 10^{-62}` at tau = 0.07.) Keys are detached. Computed in at
    least float32. ``reduction``: "mean" (a scalar, the mean over the N P patches) or "none" (N, P).

    Bounds: :math:`\ell \ge 0`; about log P for unrelated features; with q = k and mutually
    orthogonal keys, :math:`\log(1 + (P - 1) e^{-1/\tau})`.
    """
    if query.dim() != 3 or query.shape != key.shape:
        raise ValueError(
            f"query, key: expected two (N, P, D) tensors of one shape, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, k = query.to(dtype), key.detach().to(dtype)
    logits = q @ k.transpose(1, 2) / temperature  # (N, P, P); row i: query i against every key
    losses = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=1, dim2=2)
    return losses.mean() if reduction == "mean" else losses


def patch_nce_per_image(
    features: Callable[[Tensor], Sequence[Tensor]],
    heads: nn.Module,
    sources: Tensor,
    translations: Tensor,
    *,
    num_patches: int = 256,
    temperature: float = 0.07,
    locations: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""The PatchNCE loss of each image, (N,): translations (queries) against their sources (keys).

    ``features`` maps images (N, 3, H, W) to the list of encoder features (e.g.
    ``ResnetGenerator.encoder_features``); ``heads`` a :class:`PatchHeads` for those layers (or
    a DDP view of one). The keys, :math:`h_l(F_l(\text{sources}))`, are computed without gradient;
    the queries carry the gradient into the translations (and so into G), into the encoder
    features' parameters and into the heads. Image n's loss is
    :math:`\frac{1}{L} \sum_l \frac{1}{P_l} \sum_i \ell^{(l)}_{n,i}` (:func:`patch_nce_loss`); the
    mean over images is CUT's NCE term. ``locations`` (one (P_l,) per layer): the patches to
    compare, e.g. the same for every chunk of a batch; None draws them (:func:`sample_locations`).
    """
    if sources.shape != translations.shape:
        raise ValueError(
            f"sources, translations: expected one shape, got {tuple(sources.shape)} and {tuple(translations.shape)}"
        )
    with torch.no_grad():
        source_features = features(sources)
        if locations is None:
            locations = sample_locations(source_features, num_patches)
        keys = heads(source_features, locations)
    queries = heads(features(translations), locations)
    per_layer = [patch_nce_loss(q, k, temperature, reduction="none").mean(1) for q, k in zip(queries, keys)]
    return torch.stack(per_layer).mean(0)
