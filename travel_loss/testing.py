r"""A test kit for embedders used with :func:`travel_loss.travel_loss`.

:func:`check_embedder` checks that any callable mapping (N, 3, H, W) images to (N, D) embeddings
is fit to be the frozen embedder :math:`E` of the travel loss
:math:`\sum_{i \ne j} \mathrm{Dist}(E(x_i) - E(x_j),\ E(G(x_i)) - E(G(x_j)))`: a deterministic
function of each image alone, differentiable with respect to the image, with no trainable weights.

The Hypothesis strategies :func:`embeddings`, :func:`embedding_pairs` and :func:`image_batches` let
users write their own property tests. Hypothesis is needed only by the strategies (``pip install
hypothesis``); :func:`check_embedder` works without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hypothesis.strategies import DrawFn, SearchStrategy

__all__ = ["check_embedder", "embedding_pairs", "embeddings", "image_batches"]

Embedder = Callable[[Tensor], Tensor]
ImageSize = int | tuple[int, int]

# Default relative tolerance of "the same embedding", by output dtype, measured against the
# largest entry of the reference embedding. float32 allows for TF32 matmuls and for kernels that
# change with the batch size; a real fault (dropout, batch statistics) moves embeddings by O(1).
_DEFAULT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

_BATCH_ADVICE = (
    "An embedding must depend on its own image only. BatchNorm in train mode is the classic "
    "cause (it normalises with the statistics of the current batch): call embedder.eval(). "
    "Other causes: normalising over the batch dimension, or layers that mix images (attention "
    "or pooling across dim 0)."
)

_FREEZE_ADVICE = (
    "A frozen embedder needs no weight gradients: call embedder.requires_grad_(False) once after "
    "building it (for a CLIP checkpoint, travel_loss.FrozenCLIPEncoder does this for you)."
)


# ------------------------------------------------------------------------------------------------
# check_embedder


def check_embedder(
    embedder: Embedder,
    image_shape: Sequence[int] = (3, 224, 224),
    input_range: tuple[float, float] = (-1.0, 1.0),
    *,
    batch_size: int = 4,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    r"""Assert that ``embedder`` is a correct frozen embedder for the travel loss.

    It is called a few times on seeded random images of shape ``(batch_size, *image_shape)`` drawn
    uniformly from ``input_range``, and one backward pass is run through it. The checks, in order;
    the first one that fails raises ``AssertionError`` with what is wrong and how to fix it:

    1. No parameter requires grad (only for an ``nn.Module`` or a bound method of one).
    2. The output is a 2-D (N, D) floating-point tensor with the input's N, D >= 1.
    3. The output is finite, on random images and on flat ones (one value in every pixel and channel).
    4. The input images are not modified in place.
    5. The output does not require grad when the input does not (no trainable weight hidden
       inside a plain function).
    6. Two calls on the same images agree (dropout or other randomness in train mode breaks this).
    7. The embedding of an image depends on that image only: image 0 embedded alone, first in
       one batch and last in another batch of different images gives the same embedding
       (BatchNorm in train mode breaks this).
    8. A gradient reaches the input: for :math:`L = \sum_{n,d} w_{nd} E(x)_{nd}` with random
       :math:`w`, :math:`\partial L / \partial x` exists, is finite, and is non-zero for
       every image.
    9. That backward pass gives no parameter a gradient.

    "Agree" means :math:`\max|a - b| \le \mathrm{atol} + \mathrm{rtol} \max|b|`, computed in float64
    over one embedding (or one batch of them).

    The embedder is left as it was found: its buffers (e.g. BatchNorm running statistics), the
    ``requires_grad`` flags and ``.grad`` of its parameters and the ``training`` flag of each
    submodule are restored afterwards, also when a check fails.

    Args:
        embedder: any callable mapping an (N, C, H, W) tensor to an (N, D) tensor.
        image_shape: (C, H, W) of one image.
        input_range: (low, high), the value range the embedder expects, e.g. (0, 1).
        batch_size: N of the test batches, at least 2.
        atol: absolute tolerance; default: machine epsilon of the output dtype.
        rtol: relative tolerance; default by output dtype: float64 1e-7, float32 1e-3,
            float16 1e-2, bfloat16 5e-2.
        seed: seed of the test images and of the backward weights :math:`w`.
        device: where the images are made; default: the device of the embedder's first
            parameter or buffer, else CPU.
        dtype: dtype of the images; default: the dtype of the embedder's first floating-point
            parameter or buffer, else float32.

    Raises:
        AssertionError: a check above fails.
        ValueError: an argument is invalid (before anything is called).
    """
    _validate_check_arguments(embedder, image_shape, input_range, batch_size, atol, rtol)
    module = _module_of(embedder)
    device = torch.device(device) if device is not None else _default_device(module)
    dtype = dtype if dtype is not None else _default_dtype(module)
    low, high = float(input_range[0]), float(input_range[1])
    shape = (batch_size, *(int(size) for size in image_shape))
    batch, other_batch = _random_images(2, shape, low, high, seed, dtype, device)
    context = (
        f"a ({', '.join(map(str, shape))}) {str(dtype).removeprefix('torch.')} batch on {device} "
        f"with values in [{low:g}, {high:g}]"
    )

    with _restored_afterwards(module):
        if module is not None:
            _check_no_trainable_parameters(module)
        # Grad mode stays on so that an output requiring grad reveals trainable weights;
        # nothing builds a graph unless something inside the embedder requires grad.
        with torch.enable_grad():
            first = _checked_call(embedder, batch, context, "the test batch")
            second = _checked_call(embedder, batch, context, "the same batch again")
            _check_same(
                first,
                second,
                atol,
                rtol,
                what="Two calls on the same images",
                advice=(
                    "The embedder is not deterministic: dropout or another random layer is "
                    "active. Call embedder.eval() (a frozen encoder should stay in eval mode); "
                    "if it already is in eval mode, the randomness is in its forward itself "
                    "(F.dropout(training=True), added noise, sampling): remove it."
                ),
            )
            # Image 0 last among other images, then alone.
            mixed = torch.cat([other_batch[1:], batch[:1]])
            in_other_batch = _checked_call(embedder, mixed, context, "a batch of other images")
            _check_same(
                in_other_batch[-1:],
                first[:1],
                atol,
                rtol,
                what="The embeddings of image 0 first in one batch and last in another batch",
                advice=_BATCH_ADVICE,
            )
            alone = _checked_call(embedder, batch[:1], context, "a batch of one image")
            _check_same(
                alone,
                first[:1],
                atol,
                rtol,
                what="The embeddings of image 0 alone and in a batch of other images",
                advice=_BATCH_ADVICE,
            )
            # A flat image (one value in every pixel and channel) has zero std and zero contrast.
            flat = torch.full_like(batch[:2], (low + high) / 2)
            _checked_call(embedder, flat, context, "two flat images (one value in every pixel and channel)")
        _check_input_gradient(embedder, module, batch, context, seed)


def _validate_check_arguments(
    embedder: object,
    image_shape: Sequence[int],
    input_range: tuple[float, float],
    batch_size: int,
    atol: float | None,
    rtol: float | None,
) -> None:
    if not callable(embedder):
        raise ValueError(f"embedder: expected a callable, got {type(embedder).__name__}")
    if (
        not isinstance(image_shape, Sequence)
        or len(image_shape) != 3
        or not all(isinstance(size, int) and size >= 1 for size in image_shape)
    ):
        raise ValueError(f"image_shape: expected three positive ints (C, H, W), got {image_shape!r}")
    if (
        not isinstance(input_range, Sequence)
        or len(input_range) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in input_range)
        or not input_range[0] < input_range[1]
    ):
        raise ValueError(f"input_range: expected two finite numbers (low, high) with low < high, got {input_range!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size: expected an int >= 2, got {batch_size!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name}: expected None or a number >= 0, got {value!r}")


def _module_of(embedder: object) -> nn.Module | None:
    """The nn.Module behind ``embedder``: itself, or the owner of a bound method."""
    if isinstance(embedder, nn.Module):
        return embedder
    owner = getattr(embedder, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _tensors_of(module: nn.Module | None) -> Iterator[Tensor]:
    if module is not None:
        yield from module.parameters()
        yield from module.buffers()


def _default_device(module: nn.Module | None) -> torch.device:
    return next((tensor.device for tensor in _tensors_of(module)), torch.device("cpu"))


def _default_dtype(module: nn.Module | None) -> torch.dtype:
    floating = (tensor.dtype for tensor in _tensors_of(module) if tensor.is_floating_point())
    return next(floating, torch.float32)


def _random_images(
    count: int,
    shape: tuple[int, ...],
    low: float,
    high: float,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64))
        .clamp(low, high)
        .to(device=device, dtype=dtype)
        for _ in range(count)
    ]


@contextmanager
def _restored_afterwards(module: nn.Module | None) -> Iterator[None]:
    """Restores buffers, parameter flags and grads, and training flags of ``module`` on exit."""
    if module is None:
        yield
        return
    training = [(submodule, submodule.training) for submodule in module.modules()]
    parameters = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, requires_grad, grad in parameters:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
        for submodule, flag in training:
            submodule.training = flag


def _check_no_trainable_parameters(module: nn.Module) -> None:
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise AssertionError(
            f"{len(trainable)} parameter(s) of the embedder require grad ({_some_names(trainable)}). {_FREEZE_ADVICE}"
        )


def _some_names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _checked_call(embedder: Embedder, images: Tensor, context: str, what: str) -> Tensor:
    """Calls the embedder and checks type, shape, dtype, finiteness and that the input is intact."""
    original = images.detach().clone()
    try:
        output = embedder(images)
    except Exception as error:
        advice = (
            f"It must accept a single image. {_BATCH_ADVICE}"
            if images.shape[0] == 1
            else "If it expects another image size, value range, device or dtype, pass "
            "image_shape, input_range, device or dtype to check_embedder."
        )
        raise AssertionError(
            f"The embedder raised {type(error).__name__} on {what} ({context}): {error}. {advice}"
        ) from error
    n = images.shape[0]
    if not isinstance(output, Tensor):
        raise AssertionError(
            f"The embedder returned a {type(output).__name__} on {what}; expected an (N, D) "
            "tensor with N = number of images. Return a tensor (for a model output object, pick "
            "the embedding, e.g. output.pooler_output or output.image_embeds); for several "
            "encoders, check each one on its own."
        )
    if output.dim() != 2 or output.shape[0] != n or output.shape[1] < 1:
        raise AssertionError(
            f"The embedder returned shape {tuple(output.shape)} on {what} of N = {n} images; "
            f"expected a 2-D (N, D) tensor: one row per image, D >= 1. Flatten or pool the "
            "other dimensions (e.g. output.flatten(1)) and do not squeeze away N."
        )
    if not output.is_floating_point():
        raise AssertionError(
            f"The embedder returned dtype {output.dtype}; expected a floating-point tensor "
            "(integer or boolean embeddings have no gradient)."
        )
    bad = int((~torch.isfinite(output)).sum())
    if bad:
        raise AssertionError(
            f"The embedder returned {bad} NaN or infinite value(s) of {output.numel()} on {what} "
            f"({context}). Look for a division by a zero norm or std (add an eps), log or sqrt "
            "of 0, or overflow in float16; check that input_range is what the embedder expects."
        )
    if not torch.equal(images, original):
        raise AssertionError(
            "The embedder modified its input images in place (it would corrupt the generator's "
            "output and its gradient). Use out-of-place operations, e.g. x = (x - mean) / std "
            "instead of x.sub_(mean).div_(std)."
        )
    if output.requires_grad and not images.requires_grad:
        raise AssertionError(
            "The embedder's output requires grad although its input does not: a weight inside "
            f"it is trainable{_unfrozen_during_call(embedder)}. {_FREEZE_ADVICE}"
        )
    return output.detach()


def _unfrozen_during_call(embedder: Embedder) -> str:
    """Names the parameters that require grad now (all were frozen before the first call)."""
    module = _module_of(embedder)
    names = [] if module is None else [n for n, p in module.named_parameters() if p.requires_grad]
    if not names:
        return ""
    return (
        f": {len(names)} parameter(s) became trainable during the call ({_some_names(names)}), "
        "so its forward re-enables them (e.g. requires_grad_(True) on an inner model)"
    )


def _check_same(
    got: Tensor, expected: Tensor, atol: float | None, rtol: float | None, *, what: str, advice: str
) -> None:
    if got.shape != expected.shape:
        raise AssertionError(
            f"{what} have different shapes, {tuple(got.shape)} and {tuple(expected.shape)}: D "
            "must not depend on the batch."
        )
    rtol = _DEFAULT_RTOL.get(expected.dtype, 1e-3) if rtol is None else rtol
    atol = torch.finfo(expected.dtype).eps if atol is None else atol
    difference = float((got.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    tolerance = atol + rtol * scale
    if not difference <= tolerance:
        raise AssertionError(
            f"{what} differ by up to {difference:.3g} (largest entry {scale:.3g}, tolerance {tolerance:.3g}). {advice}"
        )


def _check_input_gradient(
    embedder: Embedder, module: nn.Module | None, images: Tensor, context: str, seed: int
) -> None:
    parameters = [] if module is None else list(module.named_parameters())
    for _, parameter in parameters:
        parameter.grad = None  # restored by _restored_afterwards
    leaf = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            output = embedder(leaf)
        except Exception as error:
            raise AssertionError(
                f"The embedder raised {type(error).__name__} when its input requires grad "
                f"({context}): {error}. It must be differentiable with respect to the images."
            ) from error
    no_graph_advice = (
        "Remove torch.no_grad(), torch.inference_mode(), .detach(), .numpy() or .item() from "
        "the embedder's forward: freeze its weights with requires_grad_(False) instead, so that "
        "the travel loss can reach the generator through it."
    )
    if not isinstance(output, Tensor) or not output.requires_grad:
        with torch.no_grad():
            other = embedder(1 - leaf.detach() if leaf.shape[0] else leaf.detach())
        if isinstance(output, Tensor) and isinstance(other, Tensor) and torch.equal(output.detach(), other):
            raise AssertionError(
                "No gradient reaches the input images because the output does not depend on them: "
                "other images give the same embedding. The embedder returns a constant (a stored "
                "tensor, a wrong attribute of a model output, or an input it ignores)."
            )
        raise AssertionError(
            f"No gradient reaches the input images: the output does not depend on them through "
            f"autograd. {no_graph_advice}"
        )
    generator = torch.Generator().manual_seed(seed + 1)
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    (output.double() * weights.to(output.device)).sum().backward()
    gradient = leaf.grad
    if gradient is None:
        raise AssertionError(f"No gradient reaches the input images. {no_graph_advice}")
    bad = int((~torch.isfinite(gradient)).sum())
    if bad:
        raise AssertionError(
            f"The gradient with respect to the input images has {bad} NaN or infinite value(s) "
            f"of {gradient.numel()}. Look for sqrt or norm at 0, division by a zero std or "
            "norm (add an eps), or overflow in float16."
        )
    zero_images = int((gradient.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero_images:
        raise AssertionError(
            f"The gradient with respect to the input is exactly zero for {zero_images} of "
            f"{images.shape[0]} images. The embedding must be differentiable in the image: "
            "look for rounding, quantisation, argmax or a comparison, or a constant output."
        )
    with_gradient = [name for name, p in parameters if p.grad is not None]
    if with_gradient:
        raise AssertionError(
            f"{len(with_gradient)} parameter(s) of the embedder received a gradient "
            f"({_some_names(with_gradient)}): something in its forward makes its weights "
            f"trainable again (e.g. requires_grad_(True) or .train() on an inner model). "
            f"{_FREEZE_ADVICE}"
        )


# ------------------------------------------------------------------------------------------------
# Hypothesis strategies


def _require_hypothesis() -> None:
    """Raise a clear ImportError where hypothesis (or numpy) is missing."""
    try:
        import hypothesis.extra.numpy  # noqa: F401, PLC0415
    except ImportError as error:
        raise ImportError(
            "The strategies of travel_loss.testing need hypothesis (and numpy): "
            "pip install hypothesis, or pip install 'travel-loss[test]'."
        ) from error


_NUMPY_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
_FLOAT_WIDTHS: dict[torch.dtype, Literal[16, 32, 64]] = {
    torch.float16: 16,
    torch.float32: 32,
    torch.float64: 64,
    torch.bfloat16: 32,
}


def embeddings(
    min_n: int = 2,
    max_n: int = 16,
    min_dim: int = 1,
    max_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 10.0,
    max_offset: float = 1e3,
    duplicates: bool = True,
) -> SearchStrategy[Tensor]:
    r"""Hypothesis strategy for one (N, D) tensor of embeddings, on the CPU.

    Entries are finite: :math:`e_{nd} = u_{nd} + c_d` with :math:`|u_{nd}| \le` ``scale`` and a
    common offset :math:`|c_d| \le` ``max_offset`` (shared by all rows, so pairwise differences
    stay small next to the values: a test of cancellation). With ``duplicates``, some rows may be
    copies of others (zero-length transformation vectors). Everything shrinks towards small N
    and D, zero offset, no duplicates and zero entries.

    Args:
        min_n, max_n: the range of N (``1 <= min_n <= max_n``).
        min_dim, max_dim: the range of D (``1 <= min_dim <= max_dim``).
        dtype: a floating-point torch dtype (float16, bfloat16, float32, float64).
        scale: bound of the entries before the offset, > 0.
        max_offset: bound of the common offset, >= 0 (0 for none).
        duplicates: whether rows may repeat.

    Example:
        >>> @given(e=embeddings())
        ... def test_zero_for_identity(e):
        ...     assert travel_loss(e, e, distance="squared_euclidean") == 0
    """
    _require_hypothesis()
    from hypothesis import strategies  # noqa: PLC0415

    _validate_embedding_options(min_n, max_n, min_dim, max_dim, dtype, scale, max_offset)

    @strategies.composite
    def strategy(draw: DrawFn) -> Tensor:
        n = draw(strategies.integers(min_n, max_n))
        dim = draw(strategies.integers(min_dim, max_dim))
        return draw(_embedding_of_shape(n, dim, dtype, scale, max_offset, duplicates))

    return strategy()


def embedding_pairs(
    min_n: int = 2,
    max_n: int = 16,
    min_dim: int = 1,
    max_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 10.0,
    max_offset: float = 1e3,
    duplicates: bool = True,
) -> SearchStrategy[tuple[Tensor, Tensor]]:
    """Hypothesis strategy for ``(emb_src, emb_gen)``: two (N, D) tensors of the same shape.

    Each is drawn as by :func:`embeddings` with the same options, independently (its own
    offset and duplicate rows).

    Example:
        >>> @given(pair=embedding_pairs())
        ... def test_symmetric(pair):
        ...     src, gen = pair
        ...     assert torch.allclose(travel_loss(src, gen), travel_loss(gen, src))
    """
    _require_hypothesis()
    from hypothesis import strategies  # noqa: PLC0415

    _validate_embedding_options(min_n, max_n, min_dim, max_dim, dtype, scale, max_offset)

    @strategies.composite
    def strategy(draw: DrawFn) -> tuple[Tensor, Tensor]:
        n = draw(strategies.integers(min_n, max_n))
        dim = draw(strategies.integers(min_dim, max_dim))
        one = _embedding_of_shape(n, dim, dtype, scale, max_offset, duplicates)
        return draw(one), draw(one)

    return strategy()


def _validate_embedding_options(
    min_n: int,
    max_n: int,
    min_dim: int,
    max_dim: int,
    dtype: torch.dtype,
    scale: float,
    max_offset: float,
) -> None:
    for low_name, low, high_name, high in (
        ("min_n", min_n, "max_n", max_n),
        ("min_dim", min_dim, "max_dim", max_dim),
    ):
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
            raise ValueError(
                f"{low_name}, {high_name}: expected ints with 1 <= {low_name} <= {high_name}, got {low!r} and {high!r}"
            )
    if dtype not in _FLOAT_WIDTHS:
        raise ValueError(f"dtype: expected one of {', '.join(map(str, _FLOAT_WIDTHS))}, got {dtype!r}")
    if not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    if not (isinstance(max_offset, (int, float)) and 0 <= max_offset < math.inf):
        raise ValueError(f"max_offset: expected a finite number >= 0, got {max_offset!r}")
    largest = float(torch.finfo(dtype).max)
    if scale + max_offset >= largest:
        raise ValueError(
            f"scale, max_offset: expected scale + max_offset below the largest {dtype} "
            f"({largest:g}), got {scale + max_offset:g}"
        )


def _embedding_of_shape(
    n: int,
    dim: int,
    dtype: torch.dtype,
    scale: float,
    max_offset: float,
    duplicates: bool,
) -> SearchStrategy[Tensor]:
    from hypothesis import strategies  # noqa: PLC0415
    from hypothesis.extra.numpy import arrays  # noqa: PLC0415

    width = _FLOAT_WIDTHS[dtype]
    numpy_dtype = _NUMPY_DTYPES.get(dtype, "float32")

    def floats(bound: float) -> SearchStrategy[float]:
        return strategies.floats(-bound, bound, allow_subnormal=False, width=width)

    @strategies.composite
    def strategy(draw: DrawFn) -> Tensor:
        values = torch.from_numpy(draw(arrays(numpy_dtype, (n, dim), elements=floats(scale))))
        values = values.to(torch.float64)
        if duplicates and n > 1:
            copies = draw(
                strategies.lists(
                    strategies.tuples(strategies.integers(0, n - 1), strategies.integers(0, n - 1)),
                    max_size=n // 2,
                )
            )
            for target, source in copies:
                values[target] = values[source]
        if max_offset > 0:
            offset = draw(arrays(numpy_dtype, (dim,), elements=floats(max_offset)))
            values = values + torch.from_numpy(offset).to(torch.float64)
        # One rounding per entry, identical for identical rows: duplicates stay exact.
        return values.to(dtype)

    return strategy()


_PATTERNS = ("noise", "constant", "flat", "extremes", "smooth")


def image_batches(
    min_n: int = 1,
    max_n: int = 4,
    channels: int = 3,
    sizes: Sequence[ImageSize] = (8, 16, 32),
    input_range: tuple[float, float] = (-1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> SearchStrategy[Tensor]:
    """Hypothesis strategy for an (N, C, H, W) batch of images with values in ``input_range``.

    Each image follows a pattern: uniform noise, a constant colour (constant per channel), a flat
    image (one value in every pixel and channel), pixels at the two ends of the range
    only, or smooth noise (bilinear upsampling of a coarse grid). Pixel values come from a torch
    generator seeded by a drawn integer, so large images are cheap; the batch shrinks towards
    N = ``min_n``, the first size, uniform noise and seed 0. All values are finite and lie in
    ``[low, high]`` (both ends included), on the CPU.

    Args:
        min_n, max_n: the range of N (``1 <= min_n <= max_n``).
        channels: C >= 1.
        sizes: image sizes to choose from: ints (square) or (H, W) pairs, each >= 1.
        input_range: (low, high), finite, low < high.
        dtype: a floating-point torch dtype.

    Example:
        >>> @given(images=image_batches(min_n=2, sizes=[256]))
        ... def test_encoder(images):
        ...     assert encoder(images).shape[0] == images.shape[0]
    """
    _require_hypothesis()
    from hypothesis import strategies  # noqa: PLC0415

    if not (isinstance(min_n, int) and isinstance(max_n, int) and 1 <= min_n <= max_n):
        raise ValueError(f"min_n, max_n: expected ints with 1 <= min_n <= max_n, got {min_n!r} and {max_n!r}")
    if not (isinstance(channels, int) and channels >= 1):
        raise ValueError(f"channels: expected an int >= 1, got {channels!r}")
    given_sizes = [_as_height_width(size) for size in sizes] if isinstance(sizes, Sequence) else []
    hw_sizes = [hw for hw in given_sizes if hw is not None]
    if not hw_sizes or len(hw_sizes) != len(given_sizes):
        raise ValueError(
            f"sizes: expected a non-empty sequence of positive ints or (height, width) pairs, got {sizes!r}"
        )
    if (
        not isinstance(input_range, Sequence)
        or len(input_range) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in input_range)
        or not input_range[0] < input_range[1]
    ):
        raise ValueError(f"input_range: expected two finite numbers (low, high) with low < high, got {input_range!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point torch dtype, got {dtype!r}")
    low, high = float(input_range[0]), float(input_range[1])

    @strategies.composite
    def strategy(draw: DrawFn) -> Tensor:
        n = draw(strategies.integers(min_n, max_n))
        height, width = draw(strategies.sampled_from(hw_sizes))
        pattern = strategies.sampled_from(_PATTERNS)
        patterns = draw(strategies.lists(pattern, min_size=n, max_size=n))
        seed = draw(strategies.integers(0, 2**32 - 1))
        generator = torch.Generator().manual_seed(seed)
        unit = torch.stack([_unit_image(pattern, (channels, height, width), generator) for pattern in patterns])
        return (low + (high - low) * unit).clamp(low, high).to(dtype)

    return strategy()


def _as_height_width(size: object) -> tuple[int, int] | None:
    if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
        return size, size
    if (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        return int(size[0]), int(size[1])
    return None


def _unit_image(pattern: str, shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """One (C, H, W) float64 image with values in [0, 1]."""
    channels, height, width = shape
    if pattern == "noise":
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    if pattern == "constant":  # one colour: constant per channel
        return torch.rand((channels, 1, 1), generator=generator, dtype=torch.float64).expand(shape)
    if pattern == "flat":  # one value in every pixel and channel: zero std over the whole image
        return torch.rand((1, 1, 1), generator=generator, dtype=torch.float64).expand(shape)
    if pattern == "extremes":
        return torch.randint(0, 2, shape, generator=generator).to(torch.float64)
    coarse_shape = (1, channels, max(1, height // 4), max(1, width // 4))
    coarse = torch.rand(coarse_shape, generator=generator, dtype=torch.float64)
    smooth = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return smooth[0]
