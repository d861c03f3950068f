r"""Shared random views: the travel loss over embeddings that a generator cannot game as easily.

A frozen encoder :math:`E` is a fixed target, and a generator finds its blind spots: patterns that
move the embeddings where the loss wants them while the content stays wrong. CLIP-guided
generation (VQGAN+CLIP, CLIPDraw, StyleGAN-NADA) answers this by scoring many random,
differentiable augmentations of each image; DiffAugment (Zhao et al., 2020) does the same for a
discriminator. Here each source image and its translation are embedded under the *same* K random
views :math:`\tau_1, \dots, \tau_K`, so that their transformation vectors stay comparable:

.. math::

    \bar s_i = \frac{1}{K} \sum_{k} E(\tau_k(x_i)), \qquad
    \bar g_i = \frac{1}{K} \sum_{k} E(\tau_k(G(x_i))), \qquad
    L = L_\mathrm{travel}(\bar s, \bar g)

(``average="embeddings"``, the default), or :math:`L = \frac{1}{K} \sum_k L_\mathrm{travel}(
E(\tau_k(x)), E(\tau_k(G(x))))` (``average="loss"``). The encoder runs K times per image.

Every transform is a pure, differentiable function of an (N, C, H, W) batch and of explicit
per-image draws, so one :class:`ViewDraw` can be applied to x and to G(x). A view applies, in this
order: :func:`crop_and_resize`, :func:`shift`, :func:`flip`, :func:`blur`,
:func:`adjust_brightness`, :func:`adjust_saturation`, :func:`adjust_contrast`, :func:`add_noise`,
then clamps to ``value_range`` (frozen encoders such as :class:`~travel_loss.FrozenEncoder` check
their input range). Transforms keep the images' dtype and device.

Example:
    >>> views = RandomViews(count=2, shift=2, blur=0.5, noise=0.1)
    >>> loss_fn = TravelLoss(encoder=encoder, views=views)
    >>> loss_g = adversarial + lam * loss_fn(real_a, fake_b)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TRANSFORMS",
    "RandomViews",
    "ViewDraw",
    "add_noise",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "average_embeddings",
    "blur",
    "crop_and_resize",
    "embed_each_view",
    "embed_views",
    "flip",
    "shift",
]

# An encoder's output: (N, D) embeddings, or one such tensor per encoder (as travel_loss.loss.Embeddings).
Embeddings = Tensor | Sequence[Tensor]
Encoder = Callable[[Tensor], Embeddings]
Average = Literal["embeddings", "loss"]
AVERAGES: tuple[str, ...] = ("embeddings", "loss")
# The transforms' strength fields of RandomViews, in the order a view applies them.
TRANSFORMS: tuple[str, ...] = ("crop", "shift", "flip", "blur", "brightness", "saturation", "contrast", "noise")


# --------------------------------------------------------------------------------------------
# the transforms: pure functions of images and draws


def shift(images: Tensor, offsets: Tensor) -> Tensor:
    r"""Integer translation with reflection at the borders.

    Pixel (i, j) of image n of the result is pixel :math:`(r_H(i + dy_n), r_W(j + dx_n))` of the
    input, where :math:`r_L` reflects an index into [0, L) without repeating the edge (as
    ``F.pad(mode="reflect")``): the result equals the (H, W) window at
    :math:`(p + dy_n, p + dx_n)` of the image reflect-padded by :math:`p \ge |dy_n|, |dx_n|`.

    Args:
        images: (N, C, H, W).
        offsets: (N, 2) integers :math:`(dy_n, dx_n)` with :math:`|dy_n| < H`, :math:`|dx_n| < W`.
    """
    n, c, h, w = images.shape
    rows = _reflect(torch.arange(h, device=images.device) + offsets[:, :1].to(images.device), h)  # (N, H)
    cols = _reflect(torch.arange(w, device=images.device) + offsets[:, 1:].to(images.device), w)  # (N, W)
    images = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return images.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def crop_and_resize(images: Tensor, boxes: Tensor) -> Tensor:
    r"""A crop of each image resized back to (H, W) bilinearly: CLIP guidance's "cutout".

    Pixel centres are aligned at the corners: output pixel (i, j) samples the input at
    :math:`(t + i\,(h - 1)/(H - 1),\ l + j\,(w - 1)/(W - 1))`, so the result equals
    ``F.interpolate(images[n, :, t:t+h, l:l+w], (H, W), mode="bilinear", align_corners=True)``
    and never reads a pixel outside the box. float16/bfloat16 are resampled in float32.

    Args:
        images: (N, C, H, W).
        boxes: (N, 4) integers (top t, left l, height h, width w) of boxes inside the image.
    """
    n, _, h, w = images.shape
    # CPU grid_sample lacks float16/bfloat16 kernels; float64 stays float64.
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    top, left, height, width = boxes.to(images.device, work.dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=work.dtype)
    # Input coordinate = scale * output coordinate + offset, both in [-1, 1] pixel-centre units.
    theta[:, 0, 0] = (width - 1) / max(w - 1, 1)
    theta[:, 0, 2] = (2 * left + width - 1) / max(w - 1, 1) - 1
    theta[:, 1, 1] = (height - 1) / max(h - 1, 1)
    theta[:, 1, 2] = (2 * top + height - 1) / max(h - 1, 1) - 1
    grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=True)
    resampled = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return resampled.to(images.dtype)


def flip(images: Tensor, flips: Tensor) -> Tensor:
    """Horizontal flip of the images where ``flips`` (N,) bool is true."""
    return torch.where(_per_image(flips, images), images.flip(-1), images)


def blur(images: Tensor, blurs: Tensor) -> Tensor:
    r"""3x3 binomial blur :math:`\frac{1}{16}[1, 2, 1]^\top [1, 2, 1]` with reflection at the
    borders, of the images where ``blurs`` (N,) bool is true."""
    blurred = _binomial_1d(_binomial_1d(images, dim=2), dim=3)
    return torch.where(_per_image(blurs, images), blurred, images)


def adjust_brightness(images: Tensor, offsets: Tensor) -> Tensor:
    """Adds ``offsets`` (N,) to every pixel of each image (DiffAugment's brightness)."""
    return images + _per_image(offsets, images)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Scales each pixel's deviation from its channel mean by ``factors`` (N,) (DiffAugment's
    saturation; 0 gives grey, 1 the image)."""
    grey = images.mean(dim=1, keepdim=True)
    return grey + (images - grey) * _per_image(factors, images)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Scales each image's deviation from its mean over (C, H, W) by ``factors`` (N,)
    (DiffAugment's contrast)."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (images - mean) * _per_image(factors, images)


def add_noise(images: Tensor, noise: Tensor) -> Tensor:
    """Adds ``noise`` (N, C, H, W) (e.g. sigma times a standard normal draw) in the images' dtype."""
    return images + noise.to(images.device, images.dtype)


# --------------------------------------------------------------------------------------------
# the spec and its draws


@dataclass(frozen=True)
class ViewDraw:
    """The random numbers of one view of a batch of N images; None where a transform is off.

    Apply the same draw to x and to G(x) with :meth:`RandomViews.apply`.

    Attributes:
        crop: (N, 4) int64 boxes (top, left, height, width), see :func:`crop_and_resize`.
        shift: (N, 2) int64 offsets (dy, dx), see :func:`shift`.
        flip, blur: (N,) bool, the images to flip or blur.
        brightness: (N,) float32 offsets; saturation, contrast: (N,) float32 factors.
        noise: (N, C, H, W) float32 noise to add.
    """

    crop: Tensor | None = None
    shift: Tensor | None = None
    flip: Tensor | None = None
    blur: Tensor | None = None
    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    noise: Tensor | None = None


_APPLY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "crop": crop_and_resize,
    "shift": shift,
    "flip": flip,
    "blur": blur,
    "brightness": adjust_brightness,
    "saturation": adjust_saturation,
    "contrast": adjust_contrast,
    "noise": add_noise,
}


@dataclass(frozen=True)
class RandomViews:
    r"""K random views shared by each source image and its translation; every transform off by default.

    Args:
        count: K >= 1, the number of views; the encoder runs K times per image.
        crop: 0 <= c < 1; each view is a random box whose sides are a fraction uniform in
            [1 - c, 1] of the image's (rounded to whole pixels), resized back (CLIP guidance's
            cutouts use c of about 0.5-0.9).
        shift: integer s >= 0; a translation by (dy, dx) uniform in [-s, s]^2 pixels with
            reflection padding (DiffAugment: an eighth of the side). Needs s < H and s < W.
        flip: probability in [0, 1] of a horizontal flip (off for content where left/right matters).
        blur: probability in [0, 1] of a 3x3 binomial blur.
        brightness: b >= 0; adds a constant uniform in [-b, b] (DiffAugment: 0.5 for [-1, 1] images).
        saturation: 0 <= s <= 1; scales the colour around the grey by a factor uniform in
            [1 - s, 1 + s] (DiffAugment: 1).
        contrast: 0 <= c <= 1; scales around the image mean by a factor uniform in [1 - c, 1 + c]
            (DiffAugment: 0.5).
        noise: sigma >= 0 of additive Gaussian noise, in the images' units.
        average: ``"embeddings"`` (the loss of the view-averaged embeddings) or ``"loss"`` (the
            mean of the K per-view losses).
        value_range: (lo, hi): each view is clamped to it (images stay valid for encoders that check
            their input range; clamped pixels pass no gradient), or None for no clamp.

    The measured recipe against a gamed encoder: ``RandomViews(count=2, shift=2, blur=0.5, noise=0.1)``.

    Raises:
        ValueError: an option out of its range, naming it, what was expected and what came.
    """

    count: int = 1
    crop: float = 0.0
    shift: int = 0
    flip: float = 0.0
    blur: float = 0.0
    brightness: float = 0.0
    saturation: float = 0.0
    contrast: float = 0.0
    noise: float = 0.0
    average: Average = "embeddings"
    value_range: tuple[float, float] | None = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if not _is_int(self.count) or self.count < 1:
            raise ValueError(f"count: expected an int >= 1 (the number of views), got {self.count!r}")
        if not _is_int(self.shift) or self.shift < 0:
            raise ValueError(f"shift: expected an int >= 0 (the largest shift in pixels), got {self.shift!r}")
        if not (_is_real(self.crop) and 0 <= self.crop < 1):
            raise ValueError(f"crop: expected a number in [0, 1) (the largest share of a side cut), got {self.crop!r}")
        _check_strength("flip", self.flip, 0.0, 1.0, "a probability in [0, 1]")
        _check_strength("blur", self.blur, 0.0, 1.0, "a probability in [0, 1]")
        _check_strength("brightness", self.brightness, 0.0, math.inf, "a finite number >= 0")
        _check_strength("saturation", self.saturation, 0.0, 1.0, "a number in [0, 1]")
        _check_strength("contrast", self.contrast, 0.0, 1.0, "a number in [0, 1]")
        _check_strength("noise", self.noise, 0.0, math.inf, "a finite standard deviation >= 0")
        if self.average not in AVERAGES:
            raise ValueError(f"average: expected one of {', '.join(map(repr, AVERAGES))}, got {self.average!r}")
        if self.value_range is not None:
            valid = (
                isinstance(self.value_range, (tuple, list))
                and len(self.value_range) == 2
                and all(_is_real(v) and math.isfinite(v) for v in self.value_range)
                and self.value_range[0] < self.value_range[1]
            )
            if not valid:
                raise ValueError(f"value_range: expected None or finite (lo, hi), lo < hi, got {self.value_range!r}")
            object.__setattr__(self, "value_range", (float(self.value_range[0]), float(self.value_range[1])))

    @classmethod
    def parse(cls, spec: str) -> RandomViews:
        """Views from a ``"name=value,..."`` string, e.g. ``"count=2,shift=2,blur=0.5,noise=0.1"``
        (for command lines and configs; ``""`` is no transform). Names: ``count``, ``average``
        and those of :data:`TRANSFORMS`."""
        if not isinstance(spec, str):
            raise TypeError(f"spec: expected a string like 'count=2,shift=2,noise=0.1', got {type(spec).__name__}")
        known = ("count", *TRANSFORMS, "average")
        options: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, equals, text = (part.strip() for part in item.partition("="))
            if name not in known:
                raise ValueError(f"spec: unknown view option {name!r} in {spec!r}; expected one of {', '.join(known)}")
            if not equals or not text:
                raise ValueError(f"spec: expected name=value, got {item!r} in {spec!r}")
            try:
                options[name] = text if name == "average" else int(text) if name in ("count", "shift") else float(text)
            except ValueError:
                kind = "an int" if name in ("count", "shift") else "a number"
                raise ValueError(f"{name}: expected {kind}, got {text!r} in {spec!r}") from None
        return cls(**options)  # type: ignore[arg-type]  # the values' types are checked in __post_init__

    @property
    def is_identity(self) -> bool:
        """True when every transform is off: a view is then the image itself (and ``count`` copies
        of one embedding average to that embedding)."""
        return all(not getattr(self, name) for name in TRANSFORMS)

    def draw(self, images: Tensor, generator: torch.Generator | None = None) -> ViewDraw:
        """Random numbers for one view of ``images`` (only their shape and device are used).

        Drawn on ``generator``'s device (the global RNG on the images' device when None) and moved
        to the images' device: a generator on that device avoids a copy of the noise.
        """
        _check_images("images", images)
        self.check_image_size(images.shape[-2], images.shape[-1])
        n, c, h, w = images.shape
        device = images.device if generator is None else generator.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=device)

        draws: dict[str, Tensor] = {}
        if self.crop:
            fraction = 1 - self.crop * uniform(n)
            height = (fraction * h).round().clamp(1, h)
            width = (fraction * w).round().clamp(1, w)
            top = (uniform(n) * (h - height + 1)).floor().clamp_max(h - height)
            left = (uniform(n) * (w - width + 1)).floor().clamp_max(w - width)
            draws["crop"] = torch.stack([top, left, height, width], dim=1).long()
        if self.shift:
            draws["shift"] = torch.randint(-self.shift, self.shift + 1, (n, 2), generator=generator, device=device)
        if self.flip:
            draws["flip"] = uniform(n) < self.flip
        if self.blur:
            draws["blur"] = uniform(n) < self.blur
        if self.brightness:
            draws["brightness"] = (2 * uniform(n) - 1) * self.brightness
        if self.saturation:
            draws["saturation"] = 1 + (2 * uniform(n) - 1) * self.saturation
        if self.contrast:
            draws["contrast"] = 1 + (2 * uniform(n) - 1) * self.contrast
        if self.noise:
            draws["noise"] = self.noise * torch.randn((n, c, h, w), generator=generator, device=device)
        return ViewDraw(**{name: value.to(images.device) for name, value in draws.items()})

    def apply(self, images: Tensor, draw: ViewDraw) -> Tensor:
        """One view of (N, C, H, W) ``images`` under ``draw``: the same draw gives the same view of
        x and of G(x). Keeps dtype and device; returns ``images`` itself when every transform is off."""
        if self.is_identity:
            return images
        for name in TRANSFORMS:
            values = getattr(draw, name)
            if values is not None:
                images = _APPLY[name](images, values)
        if self.value_range is not None:
            images = images.clamp(*self.value_range)
        return images

    def check_image_size(self, height: int, width: int) -> None:
        """Raises ``ValueError`` when the shift cannot be reflected inside (height, width) images."""
        if self.shift >= min(height, width):
            raise ValueError(
                f"shift: expected fewer pixels than the image's sides (reflection padding), got shift={self.shift} "
                f"for {height}x{width} images"
            )


# --------------------------------------------------------------------------------------------
# embedding under views


@overload
def embed_views(
    encoder: Callable[[Tensor], Tensor],
    x: Tensor,
    fake: Tensor,
    views: RandomViews,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def embed_views(
    encoder: Encoder,
    x: Tensor,
    fake: Tensor,
    views: RandomViews,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Embeddings, Embeddings]: ...


def embed_views(
    encoder: Encoder,
    x: Tensor,
    fake: Tensor,
    views: RandomViews,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Embeddings, Embeddings]:
    r"""View-averaged embeddings :math:`\bar s = \frac1K \sum_k E(\tau_k(x))` (computed under
    ``torch.no_grad()``) and :math:`\bar g = \frac1K \sum_k E(\tau_k(G(x)))` (with its graph).

    Args:
        encoder: a frozen embedder, (M, C, H, W) -> (M, D) (or a tuple of such, one per encoder, as
            :class:`~travel_loss.EncoderEnsemble`). Called once on the K views of x stacked into a
            batch of K N images, and once on those of ``fake``.
        x: (N, C, H, W) source images, N >= 1; fake: (N, C, H, W) their translations G(x).
        views: the views; view k applies the same draw to x and to ``fake``.
        generator: the random numbers' source; None uses torch's global RNG.

    Returns:
        Two (N, D) tensors (tuples of them for a tuple-valued encoder), in the encoder's dtype.
    """
    src, gen = embed_each_view(encoder, x, fake, views, generator=generator)
    return average_embeddings(src), average_embeddings(gen)


def embed_each_view(
    encoder: Encoder,
    x: Tensor,
    fake: Tensor,
    views: RandomViews,
    *,
    generator: torch.Generator | None = None,
) -> tuple[list[Embeddings], list[Embeddings]]:
    """The K per-view embeddings ``[E(view_k(x))]`` (no graph) and ``[E(view_k(fake))]``, each (N, D)
    (a tuple of them for a tuple-valued encoder); arguments as in :func:`embed_views`."""
    _check_view_arguments(encoder, x, fake, views, generator)
    draws = [views.draw(x, generator) for _ in range(views.count)]
    with torch.no_grad():
        src = encoder(torch.cat([views.apply(x, draw) for draw in draws]))
    gen = encoder(torch.cat([views.apply(fake, draw) for draw in draws]))
    return _split_views(src, views.count, "encoder(x)"), _split_views(gen, views.count, "encoder(fake)")


def average_embeddings(per_view: Sequence[Embeddings]) -> Embeddings:
    """The mean of per-view (N, D) embeddings (per encoder for tuples)."""
    if isinstance(per_view[0], Tensor):
        return torch.stack(cast("list[Tensor]", list(per_view))).mean(dim=0)
    return tuple(torch.stack(list(members)).mean(dim=0) for members in zip(*per_view))


# --------------------------------------------------------------------------------------------
# internals


def _check_view_arguments(
    encoder: Encoder,
    x: Tensor,
    fake: Tensor,
    views: RandomViews,
    generator: torch.Generator | None,
    min_batch: int = 1,
) -> None:
    """Raises ``TypeError`` / ``ValueError`` naming the bad argument, before any work."""
    if not isinstance(views, RandomViews):
        raise TypeError(f"views: expected a travel_loss.RandomViews, got {type(views).__name__}")
    if not callable(encoder):
        raise TypeError(f"encoder: expected a callable mapping images to embeddings, got {type(encoder).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
    _check_images("x", x)
    _check_images("fake", fake)
    if x.shape != fake.shape:
        raise ValueError(
            f"x, fake: expected the same shape (view k applies one draw to both), got {tuple(x.shape)} and "
            f"{tuple(fake.shape)}"
        )
    if x.device != fake.device:
        raise ValueError(f"x, fake: expected tensors on one device, got {x.device} and {fake.device}")
    if x.shape[0] < min_batch:
        raise ValueError(
            f"x: expected a batch of at least {min_batch} images (transformation vectors need pairs), got "
            f"batch size {x.shape[0]}; raise the batch size, or use travel_loss.TravelQueue(size=K)"
        )
    views.check_image_size(x.shape[-2], x.shape[-1])


def _split_views(embeddings: Embeddings, count: int, name: str) -> list[Embeddings]:
    if isinstance(embeddings, Tensor):
        return list(embeddings.chunk(count))
    if isinstance(embeddings, (tuple, list)) and all(isinstance(e, Tensor) for e in embeddings):
        return [tuple(members) for members in zip(*(e.chunk(count) for e in embeddings))]
    raise TypeError(f"{name}: expected a tensor or a tuple of tensors (one per encoder), got {type(embeddings)}")


def _check_images(name: str, images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point (N, C, H, W) batch of images, got a {images.dim()}-D {images.dtype} "
            f"tensor of shape {tuple(images.shape)}"
        )


def _check_strength(name: str, value: object, lo: float, hi: float, expected: str) -> None:
    if not (_is_real(value) and math.isfinite(value) and lo <= value <= hi):  # type: ignore[arg-type, operator]
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices reflected into [0, size) without repeating the edge (-1 -> 1, size -> size - 2);
    valid for -size < index < 2 * size - 1."""
    if size == 1:
        return torch.zeros_like(index)
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _binomial_1d(images: Tensor, dim: int) -> Tensor:
    size = images.shape[dim]
    middle = torch.arange(size, device=images.device)
    before = images.index_select(dim, _reflect(middle - 1, size))
    after = images.index_select(dim, _reflect(middle + 1, size))
    return (before + 2 * images + after) / 4


def _per_image(values: Tensor, images: Tensor) -> Tensor:
    """(N,) values shaped (N, 1, 1, 1) on the images' device, in their dtype (bool stays bool)."""
    values = values.to(images.device)
    if values.dtype != torch.bool:
        values = values.to(images.dtype)
    return values.reshape(-1, *([1] * (images.dim() - 1)))
