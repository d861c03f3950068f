r"""A structure loss from a frozen network's spatial features: self-similarity within each image.

The travel loss constrains how images relate to *each other*; nothing in it says where the parts of
one image sit. A self-similarity map does, without saying what colour they are: for the L spatial
features :math:`f_1 \dots f_L \in \mathbb{R}^C` of one image (a feature map's positions, or a
ViT's patch tokens), centred over the image (:math:`\bar f` their mean),

.. math::  S_{pq} = \cos\bigl(f_p - \bar f,\; f_q - \bar f\bigr),

and the loss compares the maps of a source image x and of its translation G(x), per image,

.. math::  \ell(x) = \frac{1}{|\Omega|} \sum_{(p, q) \in \Omega} \bigl|S^{x}_{pq} - S^{G(x)}_{pq}\bigr|
           \qquad(\text{or } (\cdot)^2 \text{ with } \mathtt{distance="squared"}),

over a set :math:`\Omega` of position pairs:

- **global** (``window=None``; Splice, Tumanyan et al., CVPR 2022, on DINO-ViT keys): every
  position :math:`q` for each row :math:`p`; :math:`O(L^2 C)`. ``positions=P`` keeps P sampled
  rows: :math:`O(P L C)`;
- **local** (``window=w``, odd; F-LSeSim, Zheng, Cham and Cai, CVPR 2021, on VGG16 features): the
  :math:`w \times w` neighbours :math:`q` of each centre :math:`p` on the (H, W) grid; centres are
  the positions whose window lies inside the grid, all of them or ``positions=P`` sampled ones:
  :math:`O(P w^2 C)`.

Invariances (exact, per image): the map is unchanged by an orthogonal transform of the channels,
a positive scale and a common offset of the features: :math:`f \mapsto s Q f + b`. Through a
*linear* extractor with orthonormal columns that covers per-pixel affine colour changes
:math:`x \mapsto s R x + b` (R orthogonal) in pixel space, polarity inversion included: a light
digit on dark paper and the same digit dark on light paper have the same map. A different
arrangement of the same features (a spatial permutation, a moved stroke) changes it.

Why the mean absolute difference (F-LSeSim's choice) by default: every entry lies in [-1, 1] and
pulls with a gradient of constant size until it agrees, so a few strongly disagreeing entries do not
dominate and small disagreements are not left alone; ``"squared"`` (Splice's Frobenius norm,
averaged) weighs large disagreements more and fades as the maps agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StructureLoss", "sample_positions", "self_similarity", "self_similarity_loss"]

StructureDistance = Literal["l1", "squared"]
StructureReduction = Literal["mean", "sum", "none"]
# None: every position (every valid centre); an int: that many drawn; a tensor: these flat indices.
Positions = int | Tensor | None

DISTANCES: tuple[str, ...] = ("l1", "squared")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# Features shorter than this (after centring) count as zero vectors: their cosine is 0.
_NORM_EPS = 1e-12


def sample_positions(
    grid: tuple[int, int],
    count: int,
    *,
    window: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``count`` distinct flat indices (row-major on the (H, W) ``grid``), drawn uniformly among the
    candidate positions: every position, or with ``window`` every centre whose window fits in the
    grid. A (count,) int64 CPU tensor; ``generator`` draws (None: torch's global RNG).

    Drawing once and passing the indices as ``positions=`` to several calls compares the same
    positions in each (e.g. chunks of one batch).
    """
    height, width = _check_grid(grid, None)
    _check_window(window, (height, width))
    candidates = _candidate_centres(height, width, window, torch.device("cpu"))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= candidates.numel():
        raise ValueError(
            f"count: expected an int in [1, {candidates.numel()}] (the candidate positions of a {height}x{width} "
            f"grid with window={window}), got {count!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]


def self_similarity(
    features: Tensor,
    *,
    grid: tuple[int, int] | None = None,
    window: int | None = None,
    positions: Positions = None,
    center: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Cosine self-similarity of each image's spatial features: (N, P, K) with entries in [-1, 1].

    Args:
        features: (N, C, H, W) feature maps, or (N, L, C) tokens (a ViT's patch tokens, a map
            flattened row-major).
        grid: (H, W) with H W = L for (N, L, C) tokens; needed with ``window``. For a map it is
            its own (H, W) (if given, it must agree).
        window: None: global, row p holds :math:`S_{pq}` for all K = L positions q. An odd int
            w >= 3: local, row p holds the K = w^2 neighbours of centre p in row-major order
            (centre included).
        positions: the rows p: None every position (global) or every centre whose window fits
            (local); an int P draws P distinct ones (:func:`sample_positions`, with
            ``generator``); a 1-D integer tensor gives their flat indices.
        center: subtract each image's mean feature over its L positions first (so that a common
            offset, e.g. a uniform paper colour, changes nothing).

    Computed in at least float32; differentiable.
    """
    tokens, (height, width) = _as_tokens("features", features, grid)
    _check_window(window, (height, width))
    rows = _resolve_positions(positions, (height, width), window, generator, tokens.device)
    tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    if center:
        tokens = tokens - tokens.mean(dim=1, keepdim=True)
    unit = F.normalize(tokens, dim=-1, eps=_NORM_EPS)
    centres = unit[:, rows]  # (N, P, C)
    if window is None:
        return centres @ unit.transpose(1, 2)  # (N, P, L)
    offsets = _window_offsets(window, width, tokens.device)  # (w^2,)
    neighbours = unit[:, (rows[:, None] + offsets[None, :]).flatten()]  # (N, P w^2, C)
    neighbours = neighbours.unflatten(1, (rows.numel(), offsets.numel()))  # (N, P, w^2, C)
    local: Tensor = (neighbours @ centres[..., None]).squeeze(-1)  # (N, P, w^2)
    return local


def self_similarity_loss(
    feat_src: Tensor,
    feat_gen: Tensor,
    *,
    grid: tuple[int, int] | None = None,
    window: int | None = None,
    positions: Positions = None,
    distance: StructureDistance = "l1",
    reduction: StructureReduction = "mean",
    center: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The structure loss: how far a translation's self-similarity maps are from its source's.

    .. math::  \ell_i = \operatorname{mean}_{p, k} \bigl|S^\mathrm{src}_{i,pk} - S^\mathrm{gen}_{i,pk}\bigr|
               \quad(\text{squared with } \mathtt{distance="squared"})

    with :math:`S` of :func:`self_similarity` at the *same* positions for both (drawn once per
    call when ``positions`` is an int). See the module docstring for the math and invariances.

    Args:
        feat_src: (N, C, H, W) maps or (N, L, C) tokens of N source images (compute them without
            gradient: the extractor is frozen).
        feat_gen: the same layout and shape, of their N translations, row i of one belonging to
            row i of the other.
        grid, window, positions, center, generator: as in :func:`self_similarity`.
        distance: ``"l1"`` (default) or ``"squared"``.
        reduction: ``"mean"`` over the N images, ``"sum"``, or ``"none"``: the (N,) per-image losses
            (a mean over images: chunks of a batch add up exactly to the batch's, weighted by
            their share of images).

    Returns a float tensor (at least float32): 0-D, or (N,) for ``reduction="none"``.

    Raises:
        TypeError, ValueError: naming the argument, before any work (not tensors, layouts or
        shapes that differ, integer dtypes, an empty batch, a grid that does not match L, an even
        or too large window, positions out of range, an unknown option).
    """
    _check_pair(feat_src, feat_gen)
    _check_choice("distance", distance, DISTANCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _, grid_shape = _as_tokens("feat_src", feat_src, grid)
    _check_window(window, grid_shape)
    rows = _resolve_positions(positions, grid_shape, window, generator, feat_src.device)
    options = dict(grid=grid_shape if feat_src.dim() == 3 else None, window=window, positions=rows, center=center)
    difference = self_similarity(feat_src, **options) - self_similarity(feat_gen, **options)  # type: ignore[arg-type]
    per_entry = difference.abs() if distance == "l1" else difference.square()
    per_image = per_entry.flatten(1).mean(dim=1)
    if reduction == "none":
        return per_image
    return per_image.sum() if reduction == "sum" else per_image.mean()


class StructureLoss(nn.Module):
    """Module form of :func:`self_similarity_loss` that holds its options.

    ``StructureLoss(window=5, positions=64)(feat_src, feat_gen, grid=(16, 16))`` equals
    ``self_similarity_loss(feat_src, feat_gen, grid=(16, 16), window=5, positions=64)``.

    >>> structure = StructureLoss(window=None)                        # Splice: every token pair
    >>> with torch.no_grad():
    ...     emb_src, tok_src = encoder.forward_with_tokens(x)
    >>> emb_gen, tok_gen = encoder.forward_with_tokens(fake)
    >>> loss_g = adversarial + lam * travel_loss(emb_src, emb_gen) + mu * structure(tok_src, tok_gen)
    """

    if TYPE_CHECKING:
        # nn.Module.__call__ is typed (...) -> Any; calling the module runs forward.
        def __call__(
            self,
            feat_src: Tensor,
            feat_gen: Tensor,
            *,
            grid: tuple[int, int] | None = None,
            generator: torch.Generator | None = None,
        ) -> Tensor: ...

    def __init__(
        self,
        *,
        window: int | None = None,
        positions: int | None = None,
        distance: StructureDistance = "l1",
        reduction: StructureReduction = "mean",
        center: bool = True,
    ) -> None:
        super().__init__()
        if window is not None:
            _check_window_value(window)
        if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
            raise ValueError(f"positions: expected None or an int >= 1, got {positions!r}")
        _check_choice("distance", distance, DISTANCES)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.window = window
        self.positions = positions
        self.distance: StructureDistance = distance
        self.reduction: StructureReduction = reduction
        self.center = center

    def forward(
        self,
        feat_src: Tensor,
        feat_gen: Tensor,
        *,
        grid: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`self_similarity_loss` of (N, C, H, W) maps or (N, L, C) tokens with ``grid``."""
        return self_similarity_loss(
            feat_src, feat_gen, grid=grid, window=self.window, positions=self.positions, distance=self.distance,
            reduction=self.reduction, center=self.center, generator=generator,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, positions={self.positions}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}, center={self.center}"
        )


# --------------------------------------------------------------------------------------------
# geometry


def _candidate_centres(height: int, width: int, window: int | None, device: torch.device) -> Tensor:
    """Flat indices of every position (global) or of every centre whose window fits (local)."""
    half = 0 if window is None else window // 2
    rows = torch.arange(half, height - half, device=device)
    cols = torch.arange(half, width - half, device=device)
    return (rows[:, None] * width + cols[None, :]).flatten()


def _window_offsets(window: int, width: int, device: torch.device) -> Tensor:
    """Flat offsets of a window's w^2 cells from its centre, row-major."""
    half = torch.arange(-(window // 2), window // 2 + 1, device=device)
    return (half[:, None] * width + half[None, :]).flatten()


def _resolve_positions(
    positions: Positions,
    grid: tuple[int, int],
    window: int | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """The rows p as flat indices on ``device``, checked against the grid and window."""
    height, width = grid
    if positions is None:
        return _candidate_centres(height, width, window, device)
    if isinstance(positions, int) and not isinstance(positions, bool):
        return sample_positions(grid, positions, window=window, generator=generator).to(device)
    if not isinstance(positions, Tensor) or positions.dim() != 1 or positions.numel() == 0:
        raise ValueError(
            "positions: expected None, an int or a non-empty 1-D tensor of flat indices, got "
            + (f"shape {tuple(positions.shape)}" if isinstance(positions, Tensor) else type(positions).__name__)
        )
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions: expected an integer tensor of flat indices, got dtype {positions.dtype}")
    half = 0 if window is None else window // 2
    row, col = positions // width, positions % width
    valid = (positions >= 0) & (row >= half) & (row < height - half) & (col >= half) & (col < width - half)
    if not bool(valid.all()):
        where = "inside the grid" if window is None else f"centres whose {window}x{window} window fits in the grid"
        raise ValueError(f"positions: expected flat indices of {where} ({height}x{width}), got {positions.tolist()}")
    return positions.to(device=device, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# validation


def _as_tokens(name: str, features: Tensor, grid: tuple[int, int] | None) -> tuple[Tensor, tuple[int, int]]:
    """(N, L, C) tokens and their (H, W) grid ((L, 1) for tokens without a grid)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(features).__name__}")
    if features.dim() not in (3, 4):
        raise ValueError(
            f"{name}: expected (N, C, H, W) feature maps or (N, L, C) tokens, got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {features.dtype}")
    if features.shape[0] == 0 or features.numel() == 0:
        raise ValueError(f"{name}: expected at least one image with features, got shape {tuple(features.shape)}")
    if features.dim() == 4:
        shape = (int(features.shape[2]), int(features.shape[3]))
        if grid is not None and _check_grid(grid, None) != shape:
            raise ValueError(f"grid: a feature map carries its own grid {shape}, got grid={grid!r}")
        return features.flatten(2).transpose(1, 2), shape
    length = int(features.shape[1])
    return features, (length, 1) if grid is None else _check_grid(grid, length)


def _check_grid(grid: object, length: int | None) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)
    ):
        raise ValueError(f"grid: expected (H, W), two positive ints, got {grid!r}")
    height, width = int(grid[0]), int(grid[1])
    if length is not None and height * width != length:
        raise ValueError(f"grid: expected H * W = L = {length} positions, got {grid!r} ({height * width})")
    return height, width


def _check_window_value(window: object) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"window: expected None (global) or an odd int >= 3, got {window!r}")


def _check_window(window: object, grid: tuple[int, int]) -> None:
    if window is None:
        return
    _check_window_value(window)
    assert isinstance(window, int)
    height, width = grid
    if window > min(height, width):
        hint = "" if width > 1 else "; tokens need grid=(H, W) for a local window"
        raise ValueError(f"window: expected at most the grid's smaller side {min(height, width)}, got {window}{hint}")


def _check_pair(feat_src: object, feat_gen: object) -> None:
    for name, value in (("feat_src", feat_src), ("feat_gen", feat_gen)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    assert isinstance(feat_src, Tensor) and isinstance(feat_gen, Tensor)
    if feat_src.shape != feat_gen.shape:
        raise ValueError(
            f"feat_gen: expected the shape of feat_src {tuple(feat_src.shape)}, got {tuple(feat_gen.shape)}"
        )
    if feat_src.device != feat_gen.device:
        raise ValueError(f"feat_gen: expected feat_src's device {feat_src.device}, got {feat_gen.device}")
    if not feat_gen.is_floating_point():
        raise ValueError(f"feat_gen: expected a floating-point tensor, got dtype {feat_gen.dtype}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
