r"""Adversarial losses, differentiable augmentation of the discriminator's inputs, and the
original notebook's travel objective (for reproducing the paper's lambda values only).

Adversarial losses, for discriminator logits :math:`r = D(y)` on real images and
:math:`f = D(G(x))` on translations (every entry of a PatchGAN map counts as one logit, and
every loss is the mean over all of them):

=========  ========================================================  =====================================
kind       discriminator                                             generator
=========  ========================================================  =====================================
``bce``    :math:`\operatorname{softplus}(-r) + \operatorname{softplus}(f)`   :math:`\operatorname{softplus}(-f)`
           (binary cross-entropy with logits, targets 1 and 0)       (non-saturating: "D(G(x)) is real")
``lsgan``  :math:`(r - 1)^2 + f^2`                                   :math:`(f - 1)^2`
``hinge``  :math:`\max(0, 1 - r) + \max(0, 1 + f)`                   :math:`-f`
=========  ========================================================  =====================================

``bce`` is the paper's and TraVeLGAN's choice and the default. The discriminator loss is the
*sum* of its real and fake terms, as in the original notebook and TraVeLGAN (CycleGAN halves it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AUGMENT_OPS",
    "DEFAULT_AUGMENT_POLICY",
    "GAN_LOSSES",
    "diff_augment",
    "discriminator_adversarial_loss",
    "generator_adversarial_loss",
    "notebook_travel_loss",
]

GAN_LOSSES = ("bce", "lsgan", "hinge")


def _check_gan_loss(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"gan_loss: expected one of {', '.join(map(repr, GAN_LOSSES))}, got {kind!r}")


def generator_adversarial_loss(fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """The generator's adversarial loss on D's logits for translations (any shape), a float32 scalar
    (float64 for float64 logits)."""
    _check_gan_loss(kind)
    f = fake_logits.to(torch.promote_types(fake_logits.dtype, torch.float32))
    if kind == "bce":
        return F.softplus(-f).mean()  # = BCE-with-logits against target 1
    if kind == "lsgan":
        return (f - 1).square().mean()
    return -f.mean()


def discriminator_adversarial_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """The discriminator's loss on logits for real images and for (detached) translations, a float32 scalar."""
    _check_gan_loss(kind)
    r, f = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if kind == "lsgan":
        return (r - 1).square().mean() + f.square().mean()
    return F.relu(1 - r).mean() + F.relu(1 + f).mean()


# ---------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", 2020)
# ---------------------------------------------------------------------------------------------


def _brightness(x: Tensor, generator: torch.Generator | None) -> Tensor:
    shift = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype) - 0.5
    return x + shift


def _saturation(x: Tensor, generator: torch.Generator | None) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)
    factor = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype) * 2
    return (x - mean) * factor + mean


def _contrast(x: Tensor, generator: torch.Generator | None) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    factor = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype) + 0.5
    return (x - mean) * factor + mean


def _translation(x: Tensor, generator: torch.Generator | None, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to ``ratio`` of its size in x and y, filling with zeros."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    shift_y = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device, generator=generator)
    shift_x = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device, generator=generator)
    batch, rows, cols = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )
    rows = (rows + shift_y + 1).clamp(0, h + 1)
    cols = (cols + shift_x + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # the zero border is where shifted-out pixels read from
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: Tensor, generator: torch.Generator | None, ratio: float = 0.5) -> Tensor:
    """Zero one square of ``ratio`` times the image size per image, at a random place."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    offset_y = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device, generator=generator)
    offset_x = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device, generator=generator)
    batch, rows, cols = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(ch, device=x.device),
        torch.arange(cw, device=x.device),
        indexing="ij",
    )
    rows = (rows + offset_y - ch // 2).clamp(0, h - 1)
    cols = (cols + offset_x - cw // 2).clamp(0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[batch, rows, cols] = 0
    return x * mask.unsqueeze(1)


AUGMENT_OPS = {
    "color": (_brightness, _saturation, _contrast),
    "translation": (_translation,),
    "cutout": (_cutout,),
}
DEFAULT_AUGMENT_POLICY = "color,translation,cutout"


def diff_augment(
    images: Tensor, policy: str = DEFAULT_AUGMENT_POLICY, generator: torch.Generator | None = None
) -> Tensor:
    """Differentiable augmentation of a batch (N, C, H, W) in [-1, 1] before the discriminator.

    ``policy`` is a comma-separated list of :data:`AUGMENT_OPS` keys, applied in order, each
    with its own random parameters per image: ``color`` (brightness shift in [-0.5, 0.5],
    saturation factor in [0, 2], contrast factor in [0.5, 1.5]), ``translation`` (shift by up
    to 1/8 of the size, zero fill), ``cutout`` (a zeroed square of half the size). Apply the
    same policy to real and to generated batches, in the discriminator's step *and* in the
    generator's step, so D never sees un-augmented images and G gets gradients through the
    augmentation. ``""`` returns ``images`` unchanged. Randomness comes from ``generator`` or
    torch's global RNG.
    """
    if not isinstance(policy, str):
        raise ValueError(f"policy: expected a comma-separated string of {sorted(AUGMENT_OPS)}, got {policy!r}")
    names = [name.strip() for name in policy.split(",") if name.strip()]
    unknown = [name for name in names if name not in AUGMENT_OPS]
    if unknown:
        raise ValueError(f"policy: unknown augmentation(s) {unknown}; expected names from {sorted(AUGMENT_OPS)}")
    if images.dim() != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    for name in names:
        for op in AUGMENT_OPS[name]:
            images = op(images, generator)
    return images.contiguous()


# ---------------------------------------------------------------------------------------------
# The original notebook's travel objective
# ---------------------------------------------------------------------------------------------


def notebook_travel_loss(emb_src: Tensor, emb_gen: Tensor) -> Tensor:
    r"""The travel objective exactly as the authors' notebook computed it; for reproduction only.

    With :math:`s, g` the (N, D) embeddings, the notebook stacked the N - 1 cyclic shifts
    :math:`k = 1 .. N-1` of the batch into (N - 1, N, D) tensors of differences
    :math:`V_{k,i,:} = s_i - s_{(i+k) \bmod N}` and :math:`Z_{k,i,:} = g_i - g_{(i+k) \bmod N}`
    and took Keras' cosine similarity over **axis 1, the batch axis**:

    .. math::  L = \sum_{k=1}^{N-1} \sum_{d=1}^{D} \Bigl(1 - \frac{\langle V_{k,:,d}, Z_{k,:,d}\rangle}
               {\max(\|V_{k,:,d}\|, \epsilon)\,\max(\|Z_{k,:,d}\|, \epsilon)}\Bigr), \quad \epsilon = 10^{-6}

    (Keras' ``l2_normalize`` with its ``1e-12`` bound on the squared norm). It compares, per
    embedding dimension, the pattern of differences across the batch, not the direction of each
    pair's transformation vector; the paper's equation 2 is :func:`travel_loss.travel_loss`
    with ``distance="cosine"``. The sum has (N - 1) D terms, so lambda values tuned for it are
    relative to that scale. Computed in float32; O(N^2 D) memory. Returns a float32 scalar.
    """
    if not isinstance(emb_src, Tensor) or not isinstance(emb_gen, Tensor):
        raise TypeError(
            f"emb_src, emb_gen: expected tensors, got {type(emb_src).__name__} and {type(emb_gen).__name__}"
        )
    if emb_src.dim() != 2 or emb_src.shape != emb_gen.shape or emb_src.shape[0] < 2:
        raise ValueError(
            f"emb_src, emb_gen: expected two (N, D) tensors of one shape with N >= 2, "
            f"got {tuple(emb_src.shape)} and {tuple(emb_gen.shape)}"
        )
    s, g = emb_src.float(), emb_gen.float()
    n = s.shape[0]
    shifts = torch.arange(1, n, device=s.device)
    # rolled[k - 1, i] = x[(i + k) mod N]
    index = (torch.arange(n, device=s.device)[None, :] + shifts[:, None]) % n
    v = s[None] - s[index]  # (N - 1, N, D)
    z = g[None] - g[index]
    cosine = (F.normalize(v, dim=1, eps=1e-6) * F.normalize(z, dim=1, eps=1e-6)).sum(dim=1)  # (N - 1, D)
    return (1 - cosine).sum()
