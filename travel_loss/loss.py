r"""The transformation-vector (TraVeL) loss of TraVeLGAN and CLIPTraVeLGAN, as pure functions.

For a batch of N source images with embeddings :math:`s_i = E(x_i)` and their translations with
embeddings :math:`g_i = E(G(x_i))`, the transformation vectors of an ordered pair :math:`i \ne j` are

.. math::  v_{ij} = s_i - s_j, \qquad z_{ij} = g_i - g_j,

and the loss is a distance between them summed or averaged over all :math:`N(N-1)` ordered pairs
(equation 2 of the CLIPTraVeLGAN paper, with the cosine distance):

.. math::  L_\mathrm{travel} = \frac{1}{N(N-1)} \sum_{i \ne j} \bigl(1 - \cos(v_{ij}, z_{ij})\bigr).

Nothing of size :math:`N \times N \times D` is ever built. Every pairwise quantity comes from
:math:`N \times N` Gram matrices, e.g. :math:`\|v_{ij}\|^2 = K_{ii} + K_{jj} - 2K_{ij}` with
:math:`K = S S^\top`, and :math:`\langle v_{ij}, z_{ij}\rangle = C_{ii} + C_{jj} - C_{ij} - C_{ji}`
with :math:`C = S G^\top`: :math:`O(N^2 D)` flops and :math:`O(N^2)` memory. Each set is centred
over the batch first (differences do not change, so the loss is exactly translation invariant, and
a large common offset cannot cause cancellation), and the Gram matrices are formed in float64
(float32 on devices without float64: MPS, XLA), so the closed form agrees with the per-pair
definition to float32 precision even where :math:`1 - \cos` is tiny.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor, nn

from travel_loss.views import Encoder, RandomViews, _check_view_arguments, average_embeddings, embed_each_view

__all__ = ["TravelLoss", "pairwise_squared_norms", "siamese_margin_loss", "travel_loss", "travel_loss_over_views"]

Distance = Literal["cosine", "squared_euclidean", "travelgan"]
Reduction = Literal["mean", "sum", "none"]
Embeddings = Tensor | Sequence[Tensor]

DISTANCES: tuple[str, ...] = ("cosine", "squared_euclidean", "travelgan")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# A pair whose squared transformation-vector length is below this fraction of the two
# embeddings' squared (centred) norms is a zero-length vector: its cosine is 0.  In float64 the
# Gram-form round-off of an exact duplicate is ~1e-16 relative, so 1e4 * eps leaves a wide margin.
_ZERO_LENGTH_RTOL_IN_EPS = 1e4


def travel_loss(
    emb_src: Embeddings,
    emb_gen: Embeddings,
    *,
    distance: Distance = "cosine",
    reduction: Reduction = "mean",
    check_finite: bool = True,
) -> Tensor:
    r"""TraVeL loss between the transformation vectors of a batch and of its translations.

    Args:
        emb_src: (N, D) embeddings :math:`E(x_i)` of N source images (compute them under
            ``torch.no_grad()``: the encoder is frozen). (N, \*) inputs are flattened to (N, D).
        emb_gen: (N, D) embeddings :math:`E(G(x_i))` of their translations; row i belongs to row i
            of ``emb_src``. Same shape as ``emb_src``.
            Both arguments may instead be equally long sequences of tensors, one per encoder (for
            example a ViT and a ResNet CLIP); the result is then the mean of the per-encoder losses.
        distance: the distance between :math:`v_{ij} = s_i - s_j` and :math:`z_{ij} = g_i - g_j`:

            - ``"cosine"`` (the paper): :math:`1 - \cos(v_{ij}, z_{ij})`, in [0, 2]. A zero-length
              vector (duplicate embeddings) has cosine 0, i.e. distance 1, as in
              :func:`torch.nn.functional.cosine_similarity`, and a finite gradient. "Zero
              length" is relative to the batch: :math:`\|v_{ij}\|^2 \le 10^4 \epsilon_{64}
              (\|c_i\|^2 + \|c_j\|^2)` with :math:`c` the batch-centred embeddings, i.e. a
              difference below float64 round-off of the embeddings themselves.
            - ``"squared_euclidean"``: :math:`\|v_{ij} - z_{ij}\|^2 / D` (TraVeLGAN's second term,
              the mean over pairs and dimensions).
            - ``"travelgan"``: the sum of the two, the original TraVeLGAN generator objective up
              to a constant.
        reduction: ``"mean"`` over the :math:`N(N-1)` ordered pairs (independent of the batch
            size; the default), ``"sum"`` over them (the paper's :math:`\sum_{i \ne j}`, the
            convention of its lambda values: ``sum = mean * N * (N - 1)``), or ``"none"`` for the
            (N, N) matrix of pair distances with a zero diagonal.
        check_finite: raise ``ValueError`` on NaN or infinite inputs. It costs one reduction over
            the inputs and one device-to-host synchronisation; pass ``False`` in a hot training
            loop that checks its losses elsewhere. Skipped inside ``torch.compile``.

    Returns:
        A scalar (``"mean"``, ``"sum"``) or an (N, N) tensor (``"none"``), float32 for
        float16/bfloat16/float32 inputs and float64 for float64 inputs.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: N < 2, 0-D or 1-D inputs, mismatched shapes, integer/bool/complex dtypes,
            different devices, non-finite values, or an unknown ``distance``/``reduction``.

    Example:
        >>> with torch.no_grad():
        ...     emb_src = encoder(x)
        >>> loss = adversarial + lam * travel_loss(emb_src, encoder(generator(x)))
    """
    _check_option("distance", distance, DISTANCES)
    _check_option("reduction", reduction, REDUCTIONS)
    if isinstance(emb_src, (list, tuple)) or isinstance(emb_gen, (list, tuple)):
        return _travel_loss_over_encoders(
            emb_src, emb_gen, distance=distance, reduction=reduction, check_finite=check_finite
        )
    # Not lists or tuples: tensors, or anything else, which the check rejects with a TypeError.
    src, gen = _validated_pair(cast(Tensor, emb_src), cast(Tensor, emb_gen), "emb_src", "emb_gen", check_finite)
    pair_distances = _pair_distances(src, gen, distance)
    return _reduce(pair_distances, reduction).to(_result_dtype(src.dtype))


def travel_loss_over_views(
    encoder: Encoder,
    x: Tensor,
    fake: Tensor,
    views: RandomViews,
    *,
    generator: torch.Generator | None = None,
    distance: Distance = "cosine",
    reduction: Reduction = "mean",
    check_finite: bool = True,
) -> Tensor:
    r"""The travel loss under K random views shared by x and G(x) (see :mod:`travel_loss.views`).

    With draws :math:`\tau_1, \dots, \tau_K` applied alike to both batches, ``views.average``
    chooses between the loss of the view-averaged embeddings (``"embeddings"``)

    .. math::  L = L_\mathrm{travel}\Bigl(\tfrac1K \textstyle\sum_k E(\tau_k(x)),\
               \tfrac1K \sum_k E(\tau_k(G(x)))\Bigr)

    and the mean of the per-view losses (``"loss"``),
    :math:`\frac1K \sum_k L_\mathrm{travel}(E(\tau_k(x)), E(\tau_k(G(x))))`. The source views are
    embedded under ``torch.no_grad()``; gradients reach ``fake`` only. One view with every
    transform off is exactly ``travel_loss(E(x), E(fake))``.

    Args:
        encoder: a frozen embedder (N, C, H, W) -> (N, D), or one returning a tuple per encoder.
        x: (N, C, H, W) source images, N >= 2; fake: their translations, the same shape.
        views: a :class:`~travel_loss.RandomViews`.
        generator: the source of the views' random numbers (None: torch's global RNG).
        distance, reduction, check_finite: as in :func:`travel_loss`.

    Returns:
        As :func:`travel_loss`: a scalar, or (N, N) pair distances for ``reduction="none"``.

    Raises:
        TypeError, ValueError: a bad argument, named in the message, before the encoder runs.
    """
    _check_option("distance", distance, DISTANCES)
    _check_option("reduction", reduction, REDUCTIONS)
    _check_view_arguments(encoder, x, fake, views, generator, min_batch=2)
    src, gen = embed_each_view(encoder, x, fake, views, generator=generator)
    options = dict(distance=distance, reduction=reduction, check_finite=check_finite)
    if views.average == "embeddings":
        return travel_loss(average_embeddings(src), average_embeddings(gen), **options)  # type: ignore[arg-type]
    per_view = [travel_loss(s, g, **options) for s, g in zip(src, gen)]  # type: ignore[arg-type]
    return torch.stack(per_view).mean(dim=0)


def siamese_margin_loss(emb: Tensor, margin: float = 10.0, *, check_finite: bool = True) -> Tensor:
    r"""TraVeLGAN's margin term that keeps a *trainable* Siamese embedder from collapsing.

    .. math::  L_\mathrm{margin} = \frac{1}{N(N-1)} \sum_{i \ne j} \max(0, m - \|e_i - e_j\|^2)

    Only needed when the embedder is trained together with the generator (the TraVeLGAN
    baseline); a frozen CLIP encoder cannot collapse.

    Args:
        emb: (N, D) embeddings ((N, \*) inputs are flattened) of N images, N >= 2.
        margin: m >= 0, the squared distance below which pairs are pushed apart (10 in TraVeLGAN).
        check_finite: as in :func:`travel_loss`.

    Returns:
        A scalar, float32 (float64 for float64 input).
    """
    if not isinstance(margin, (int, float)) or not margin >= 0:
        raise ValueError(f"margin: expected a non-negative number, got {margin!r}")
    (flat,) = _validated_embeddings(("emb", emb), check_finite=check_finite)
    centred = _centred(flat.to(_compute_dtype(flat.device)))
    squared = pairwise_squared_norms(centred @ centred.mT)
    hinge = torch.relu(margin - squared)
    return _reduce(_zero_diagonal(hinge), "mean").to(_result_dtype(flat.dtype))


class TravelLoss(nn.Module):
    r"""Module form of :func:`travel_loss` that holds its options, and optionally the encoder.

    Without an encoder, ``TravelLoss(distance="cosine", reduction="mean")(emb_src, emb_gen)``
    equals ``travel_loss(emb_src, emb_gen, distance="cosine", reduction="mean")``.

    With ``encoder=E`` (e.g. a :class:`travel_loss.FrozenEncoder`), the module takes images, like
    lpips: ``loss(x, fake)`` with (N, 3, H, W) source images ``x`` and their translations
    ``fake`` embeds ``x`` under ``torch.no_grad()`` and ``fake`` with gradient and returns
    ``travel_loss(E(x), E(fake))``. N >= 2 is checked before either forward. The encoder is a
    registered submodule, so ``.to(device)`` moves it (a :class:`~travel_loss.FrozenEncoder`
    adds nothing to ``state_dict()`` or ``parameters()``).

    With ``views=RandomViews(...)`` as well (an encoder is then required), the loss is
    :func:`travel_loss_over_views`: x and ``fake`` are embedded under the same K random views,
    drawn from ``generator=`` of the call or from torch's global RNG. Without views (the default)
    the module is exactly as above.

    >>> loss_fn = TravelLoss(encoder=FrozenEncoder("google/siglip-base-patch16-224")).to(device)
    >>> loss_g = adversarial + lam * loss_fn(real_a, fake_b)
    >>> robust = TravelLoss(encoder=encoder, views=RandomViews(count=2, shift=2, blur=0.5, noise=0.1))
    """

    if TYPE_CHECKING:
        # nn.Module.__call__ is typed (...) -> Any; calling the module runs forward.
        def __call__(
            self, first: Embeddings, second: Embeddings, *, generator: torch.Generator | None = None
        ) -> Tensor: ...

    def __init__(
        self,
        distance: Distance = "cosine",
        reduction: Reduction = "mean",
        check_finite: bool = True,
        *,
        encoder: nn.Module | None = None,
        views: RandomViews | None = None,
    ) -> None:
        super().__init__()
        _check_option("distance", distance, DISTANCES)
        _check_option("reduction", reduction, REDUCTIONS)
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder: expected None or an nn.Module mapping images to embeddings, got {type(encoder).__name__}"
            )
        _check_views_option(views, encoder)
        self.distance = distance
        self.reduction = reduction
        self.check_finite = check_finite
        self.encoder = encoder
        self.views = views

    def forward(self, first: Embeddings, second: Embeddings, *, generator: torch.Generator | None = None) -> Tensor:
        """``(emb_src, emb_gen)`` without an encoder; ``(x, fake)`` images with one. ``generator``
        draws the views' random numbers (only with ``views``; None: torch's global RNG)."""
        if self.views is not None:
            return travel_loss_over_views(
                self.encoder,  # type: ignore[arg-type]  # checked in __init__: views need an encoder
                first,  # type: ignore[arg-type]  # images, checked there
                second,  # type: ignore[arg-type]
                self.views,
                generator=generator,
                distance=self.distance,
                reduction=self.reduction,
                check_finite=self.check_finite,
            )
        if generator is not None:
            raise ValueError("generator: draws the random views, but this TravelLoss has none (views=None)")
        if self.encoder is not None:
            first, second = self._embed(first, second)  # type: ignore[arg-type]
        return travel_loss(
            first,
            second,
            distance=self.distance,
            reduction=self.reduction,
            check_finite=self.check_finite,
        )

    def _embed(self, x: Tensor, fake: Tensor) -> tuple[Embeddings, Embeddings]:
        for name, images in (("x", x), ("fake", fake)):
            if not isinstance(images, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor of images, got {type(images).__name__}")
            if images.dim() < 1 or images.shape[0] < 2:
                got = images.shape[0] if images.dim() else "a 0-D tensor"
                raise ValueError(
                    f"{name}: expected a batch of at least 2 images (transformation vectors need pairs), got "
                    f"batch size {got}; raise the batch size, or use travel_loss.TravelQueue(size=K) on "
                    "the embeddings"
                )
        if x.shape[0] != fake.shape[0]:
            raise ValueError(
                f"x, fake: expected one translation per source image, got {x.shape[0]} sources and "
                f"{fake.shape[0]} translations"
            )
        with torch.no_grad():
            emb_src = self.encoder(x)  # type: ignore[misc]
        return emb_src, self.encoder(fake)  # type: ignore[misc]

    def extra_repr(self) -> str:
        views = "" if self.views is None else f", views={self.views!r}"
        return f"distance={self.distance!r}, reduction={self.reduction!r}{views}"


def pairwise_squared_norms(gram: Tensor) -> Tensor:
    r"""(N, N) squared lengths :math:`\|a_i - a_j\|^2 = K_{ii} + K_{jj} - 2K_{ij}` from the Gram
    matrix :math:`K = A A^\top` of (N, D) rows; clamped at 0 against round-off."""
    diagonal = gram.diagonal()
    return (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp_min(0)


# --------------------------------------------------------------------------------------------
# internals


def _pair_distances(src: Tensor, gen: Tensor, distance: str) -> Tensor:
    """(N, N) distances between transformation vectors, zero diagonal, in the compute dtype."""
    compute_dtype = _compute_dtype(src.device)
    s = _centred(src.to(compute_dtype))
    g = _centred(gen.to(compute_dtype))
    result = torch.zeros((), dtype=compute_dtype, device=s.device)
    if distance in ("cosine", "travelgan"):
        result = result + 1 - _pair_cosines(s, g)
    if distance in ("squared_euclidean", "travelgan"):
        # v_ij - z_ij = w_i - w_j with w = s - g, so one Gram matrix of w suffices, and it is
        # exactly zero when the two sets agree.
        w = s - g
        result = result + pairwise_squared_norms(w @ w.mT) / s.shape[1]
    return _zero_diagonal(result)


def _pair_cosines(s: Tensor, g: Tensor) -> Tensor:
    r"""(N, N) cosines between :math:`v_{ij}` and :math:`z_{ij}`; 0 where either has zero length."""
    gram_s, gram_g, cross = s @ s.mT, g @ g.mT, s @ g.mT
    squared_v, squared_z = pairwise_squared_norms(gram_s), pairwise_squared_norms(gram_g)
    cross_diagonal = cross.diagonal()
    dot = cross_diagonal[:, None] + cross_diagonal[None, :] - cross - cross.mT
    zero_length = (squared_v <= _zero_length_threshold(gram_s)) | (squared_z <= _zero_length_threshold(gram_g))
    # Zero-length pairs get a harmless denominator of 1 before the division, so that neither
    # branch of the final `where` has an infinite gradient that could leak through it as NaN.
    ones = torch.ones_like(squared_v)
    denominator = torch.sqrt(torch.where(zero_length, ones, squared_v)) * torch.sqrt(
        torch.where(zero_length, ones, squared_z)
    )
    cosine = (dot / denominator).clamp(-1.0, 1.0)
    return torch.where(zero_length, torch.zeros_like(cosine), cosine)


def _zero_length_threshold(gram: Tensor) -> Tensor:
    diagonal = gram.diagonal()
    rtol = _ZERO_LENGTH_RTOL_IN_EPS * torch.finfo(gram.dtype).eps
    return rtol * (diagonal[:, None] + diagonal[None, :])


def _centred(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _zero_diagonal(matrix: Tensor) -> Tensor:
    eye = torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    return matrix.masked_fill(eye, 0)


def _reduce(pair_values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return pair_values
    total = pair_values.sum()
    if reduction == "sum":
        return total
    n = pair_values.shape[0]
    return total / (n * (n - 1))


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type in ("mps", "xla") else torch.float64


def _result_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _travel_loss_over_encoders(emb_src: Embeddings, emb_gen: Embeddings, **options: object) -> Tensor:
    losses = [travel_loss(s, g, **options) for s, g in _encoder_pairs(emb_src, emb_gen)]  # type: ignore[arg-type]
    return torch.stack(losses).mean(dim=0)


def _encoder_pairs(emb_src: Embeddings, emb_gen: Embeddings) -> list[tuple[Tensor, Tensor]]:
    """(source, translation) embeddings per encoder, from two equally long sequences of tensors."""
    if not (isinstance(emb_src, (list, tuple)) and isinstance(emb_gen, (list, tuple))):
        raise TypeError(
            "emb_src, emb_gen: expected two tensors or two equally long sequences of tensors "
            f"(one per encoder), got {type(emb_src).__name__} and {type(emb_gen).__name__}"
        )
    if len(emb_src) != len(emb_gen) or not emb_src:
        raise ValueError(
            "emb_src, emb_gen: expected equally long, non-empty sequences (one tensor per "
            f"encoder), got lengths {len(emb_src)} and {len(emb_gen)}"
        )
    for name, sequence in (("emb_src", emb_src), ("emb_gen", emb_gen)):
        for index, member in enumerate(sequence):
            if not isinstance(member, Tensor):
                raise TypeError(
                    f"{name}: expected a tensor or a sequence of tensors (one per encoder), got a "
                    f"{type(sequence).__name__} whose item {index} is a {type(member).__name__}; "
                    "convert nested lists of numbers with torch.tensor(...)"
                )
    return list(zip(emb_src, emb_gen))


def _check_views_option(views: object, encoder: object) -> None:
    if views is None:
        return
    if not isinstance(views, RandomViews):
        raise TypeError(f"views: expected None or a travel_loss.RandomViews, got {type(views).__name__}")
    if encoder is None:
        raise ValueError("views: random views are of images, so they need encoder=...; got views without an encoder")


def _check_option(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")


def _validated_pair(
    emb_src: Tensor, emb_gen: Tensor, name_src: str, name_gen: str, check_finite: bool
) -> tuple[Tensor, Tensor]:
    src, gen = _validated_embeddings((name_src, emb_src), (name_gen, emb_gen), check_finite=False)
    if emb_src.shape != emb_gen.shape:
        raise ValueError(
            f"{name_src}, {name_gen}: expected the same shape (row i of one belongs to row i of "
            f"the other), got {tuple(emb_src.shape)} and {tuple(emb_gen.shape)}"
        )
    if src.device != gen.device:
        raise ValueError(f"{name_src}, {name_gen}: expected tensors on one device, got {src.device} and {gen.device}")
    if check_finite:
        _check_all_finite((name_src, src), (name_gen, gen))
    return src, gen


def _validated_embeddings(*named: tuple[str, Tensor], check_finite: bool) -> list[Tensor]:
    """Checks type, rank, batch size and dtype of each (name, tensor); returns them as (N, D)."""
    flattened = []
    for name, tensor in named:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() < 2:
            raise ValueError(
                f"{name}: expected an (N, D) tensor of N embeddings, got a {tensor.dim()}-D "
                f"tensor of shape {tuple(tensor.shape)}"
            )
        if tensor.shape[0] < 2:
            raise ValueError(
                f"{name}: expected at least 2 embeddings (transformation vectors need pairs), "
                f"got N = {tensor.shape[0]}: a batch size of {tensor.shape[0]} has no pairs; "
                "raise the batch size, or use travel_loss.TravelQueue(size=K), which pairs each "
                "row with the last K rows of earlier batches"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
        if tensor[0].numel() == 0:
            raise ValueError(f"{name}: expected embeddings of dimension D >= 1, got shape {tuple(tensor.shape)}")
        flattened.append(tensor.flatten(1))
    if check_finite:
        _check_all_finite(*zip((name for name, _ in named), flattened))
    return flattened


def _check_all_finite(*named: tuple[str, Tensor]) -> None:
    if torch.compiler.is_compiling():
        return
    finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named])
    if bool(finite.all()):
        return
    for (name, tensor), ok in zip(named, finite.tolist()):
        if not ok:
            count = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{name}: expected finite values, got {count} NaN or infinite entries of {tensor.numel()}")
