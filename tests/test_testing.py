"""check_embedder passes correct frozen embedders and names each fault; the strategies deliver."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from hypothesis import find, given, settings
from torch import nn

import travel_loss
from travel_loss import travel_loss as travel_loss_fn
from travel_loss.testing import check_embedder, embedding_pairs, embeddings, image_batches

SMALL = (3, 16, 16)


# ------------------------------------------------------------------------------------------------
# Embedders, good and bad


def conv_pool_net(norm: nn.Module | None = None, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, stride=2)]
    if norm is not None:
        layers.append(norm)
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(32, 6))
    return nn.Sequential(*layers)


def frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def mean_pool(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(2, 3))


class Unfreezing(nn.Module):
    """Frozen from outside, but its forward makes the weights trainable again."""

    def __init__(self) -> None:
        super().__init__()
        self.net = frozen(conv_pool_net())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.net.requires_grad_(True)
        return self.net(images)


class UnfreezingForGradients(nn.Module):
    """Makes its weights trainable whenever the input requires grad."""

    def __init__(self) -> None:
        super().__init__()
        self.net = frozen(conv_pool_net())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.net.requires_grad_(images.requires_grad)
        return self.net(images)


class Detaching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = frozen(conv_pool_net())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.detach())


class DtypeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = frozen(conv_pool_net()).double()
        self.seen: list[torch.dtype] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.dtype)
        return self.net(images.double())


class WithMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = conv_pool_net()  # trainable: visible through the bound method

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


# ------------------------------------------------------------------------------------------------
# Passing


@pytest.mark.parametrize(
    "embedder",
    [
        pytest.param(frozen(conv_pool_net()), id="conv-pool"),
        pytest.param(frozen(conv_pool_net(norm=nn.BatchNorm2d(8))), id="batchnorm-eval"),
        pytest.param(frozen(conv_pool_net(dropout=0.5)), id="dropout-eval"),
        pytest.param(mean_pool, id="mean-pool-function"),
        pytest.param(lambda x: nn.functional.normalize(x.flatten(1), dim=1), id="unit-norm"),
    ],
)
def test_passes_correct_embedders(embedder):
    check_embedder(embedder, SMALL)


def test_passes_other_range_and_image_shape():
    check_embedder(mean_pool, (1, 5, 7), input_range=(0.0, 1.0), batch_size=2)


def test_images_take_the_dtype_of_the_embedder():
    embedder = DtypeRecorder()
    check_embedder(embedder, SMALL)
    assert set(embedder.seen) == {torch.float64}
    check_embedder(embedder, SMALL, dtype=torch.float32)
    assert embedder.seen[-1] == torch.float32


def test_images_are_in_input_range():
    seen = []

    def recording(images):
        seen.append(images.detach().clone())
        return mean_pool(images)

    check_embedder(recording, SMALL, input_range=(2.0, 3.0))
    everything = torch.cat([images.flatten() for images in seen])
    assert everything.min() >= 2.0 and everything.max() <= 3.0
    assert everything.std() > 0.2  # spread over the range, not a constant


def test_tolerance_separates_round_off_from_faults():
    generator = torch.Generator().manual_seed(0)  # new noise on every call, the same on every run

    def slightly_noisy(images):
        embedding = mean_pool(images)
        return embedding * (1 + 1e-6 * torch.randn(embedding.shape, generator=generator))

    check_embedder(slightly_noisy, SMALL)
    with pytest.raises(AssertionError, match="Two calls on the same images differ"):
        check_embedder(slightly_noisy, SMALL, atol=0.0, rtol=0.0)


def test_passes_frozen_clip_encoder(tiny_clip_dir):
    from travel_loss.encoder import FrozenCLIPEncoder

    for features in ("pooled", "projected"):
        check_embedder(FrozenCLIPEncoder(tiny_clip_dir, features=features), (3, 32, 32))
    check_embedder(FrozenCLIPEncoder(tiny_clip_dir, crop="full"), (3, 40, 48))
    check_embedder(FrozenCLIPEncoder(tiny_clip_dir, input_range=(0, 1)), (3, 36, 36), (0, 1))


def test_catches_unfrozen_weights_hidden_inside_clip_encoder(tiny_clip_dir):
    from travel_loss.encoder import FrozenCLIPEncoder

    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    encoder.model.requires_grad_(True)  # its weights are not among encoder.parameters()
    with pytest.raises(AssertionError, match="output requires grad although its input does not"):
        check_embedder(encoder, (3, 32, 32))


# ------------------------------------------------------------------------------------------------
# Failing, one fault at a time


def batch_normalised(images):
    embedding = mean_pool(images)
    return embedding - embedding.mean(dim=0, keepdim=True)


def position_dependent(images):
    return mean_pool(images) + torch.arange(images.shape[0], dtype=images.dtype)[:, None]


def in_place(images):
    return mean_pool(images.mul_(0.5))


def nan_output(images):
    embedding = mean_pool(images)
    return embedding / (embedding - embedding)  # 0 / 0


def nan_gradient(images):
    # sqrt at exactly 0: the value is 0 but the gradient is 0 * inf = NaN.
    return mean_pool(images) + ((images - images.detach()) ** 2).sum(dim=(2, 3)).sqrt()


def refuses_one_image(images):
    if images.shape[0] < 2:
        raise ValueError("expected at least 2 images")
    return mean_pool(images)


def no_grad_inside(images):
    with torch.no_grad():
        return mean_pool(images)


def whole_image_standardised(images):
    """Divides by the std over the whole image: fine on colour images, 0 / 0 on a flat one."""
    flat = images.flatten(1)
    return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)


CONSTANT_EMBEDDING = torch.ones(1, 4)


def constant_output(images):
    return CONSTANT_EMBEDDING.expand(images.shape[0], 4)


HIDDEN_LINEAR = nn.Linear(3, 4)  # trainable, out of sight of check_embedder


FAULTS = {
    "4-D output": (lambda x: x.mean(dim=1, keepdim=True), r"expected a 2-D \(N, D\) tensor"),
    "batch squeezed away": (lambda x: x.mean(dim=(0, 2, 3)), r"shape \(3,\).*do not squeeze"),
    "batch summed": (lambda x: x.mean(dim=(2, 3)).sum(0, keepdim=True), r"shape \(1, 3\)"),
    "empty D": (lambda x: x.flatten(1)[:, :0], r"D >= 1"),
    "tuple": (lambda x: (mean_pool(x),), r"returned a tuple.*expected an \(N, D\) tensor"),
    "integer": (lambda x: (x > 0).flatten(1).long(), r"dtype torch.int64.*floating-point"),
    "NaN": (nan_output, r"NaN or infinite value\(s\).*add an eps"),
    "in-place": (in_place, r"modified its input images in place.*out-of-place"),
    "dropout in train mode": (
        conv_pool_net(dropout=0.5).requires_grad_(False),
        r"Two calls on the same images differ.*not deterministic.*dropout.*embedder\.eval\(\)",
    ),
    "batchnorm in train mode": (
        conv_pool_net(norm=nn.BatchNorm2d(8)).requires_grad_(False),
        r"image 0 first in one batch and last in another batch differ"
        r".*BatchNorm in train mode.*embedder\.eval\(\)",
    ),
    "batch-normalised output": (batch_normalised, r"depend on its own image only"),
    "position in batch": (position_dependent, r"depend on its own image only"),
    "refuses one image": (refuses_one_image, r"on a batch of one image.*must accept a single"),
    "detach inside": (Detaching(), r"No gradient reaches the input images.*\.detach\(\)"),
    "no_grad inside": (no_grad_inside, r"No gradient reaches the input images.*torch\.no_grad"),
    "whole-image std": (whole_image_standardised, r"NaN or infinite value\(s\).*two flat images.*add an eps"),
    "constant output": (constant_output, r"does not depend on them: other images give the same embedding"),
    "zero gradient": (lambda x: mean_pool(torch.round(x * 4)), r"exactly zero for 4 of 4 images"),
    "NaN gradient": (nan_gradient, r"gradient with respect to the input images has .* NaN"),
    "trainable parameters": (
        conv_pool_net().eval(),
        r"4 parameter\(s\) of the embedder require grad \('0\.weight', '0\.bias', '4\.weight' and "
        r"1 more\).*requires_grad_\(False\).*FrozenCLIPEncoder",
    ),
    "trainable weights in a bound method's module": (
        WithMethod().embed,
        r"parameter\(s\) of the embedder require grad \('net\.0\.weight'",
    ),
    "trainable weights in a closure": (
        lambda x: HIDDEN_LINEAR(mean_pool(x)),
        r"output requires grad although its input does not.*requires_grad_\(False\)",
    ),
    "weights unfrozen in forward": (
        Unfreezing(),
        r"output requires grad although its input does not.*4 parameter\(s\) became trainable "
        r"during the call \('net\.0\.weight'.*requires_grad_\(True\)",
    ),
    "weights unfrozen when the input requires grad": (
        UnfreezingForGradients(),
        r"4 parameter\(s\) of the embedder received a gradient \('net\.0\.weight'.*"
        r"requires_grad_\(True\)",
    ),
    "wrong image size": (
        frozen(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))),
        r"raised RuntimeError on the test batch \(a \(4, 3, 16, 16\) float32 batch.*"
        r"pass image_shape",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_names_each_fault(fault):
    embedder, message = FAULTS[fault]
    with pytest.raises(AssertionError, match=message):
        check_embedder(embedder, SMALL)


def test_catches_a_fault_that_only_the_second_batch_shows():
    # Correct on the first batch and on repeats; wrong when image 0 comes last.
    def last_row_differs(images):
        embedding = mean_pool(images)
        return torch.cat([embedding[:-1], embedding[-1:] * 2])

    with pytest.raises(AssertionError, match="first in one batch and last in another batch"):
        check_embedder(last_row_differs, SMALL)


def test_catches_a_fault_that_only_a_batch_of_one_shows():
    # Correct for every batch of two or more images, so every other check passes; wrong alone.
    def doubled_alone(images):
        embedding = mean_pool(images)
        return 2 * embedding if images.shape[0] == 1 else embedding

    with pytest.raises(AssertionError, match="image 0 alone and in a batch of other images differ"):
        check_embedder(doubled_alone, SMALL)


# ------------------------------------------------------------------------------------------------
# The embedder is left as it was found


def test_restores_buffers_and_training_flags_after_a_failure():
    embedder = conv_pool_net(norm=nn.BatchNorm2d(8)).requires_grad_(False)
    before = {name: value.clone() for name, value in embedder.state_dict().items()}
    with pytest.raises(AssertionError, match="BatchNorm"):
        check_embedder(embedder, SMALL)
    assert embedder.training and all(module.training for module in embedder.modules())
    after = embedder.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("embedder", [Unfreezing(), UnfreezingForGradients()], ids=type)
def test_restores_parameter_flags_and_grads(embedder):
    with pytest.raises(AssertionError, match="parameter"):
        check_embedder(embedder, SMALL)
    assert all(not p.requires_grad and p.grad is None for p in embedder.parameters())


def test_keeps_existing_grads_and_eval_mode_of_a_passing_embedder():
    embedder = frozen(conv_pool_net(norm=nn.BatchNorm2d(8)))
    embedder[0].train()  # a mixed state must survive too
    existing = torch.ones_like(embedder[0].weight)
    embedder[0].weight.grad = existing
    flags = [module.training for module in embedder.modules()]
    before = {name: value.clone() for name, value in embedder.state_dict().items()}
    check_embedder(embedder, SMALL)
    assert embedder[0].weight.grad is existing and torch.equal(existing, torch.ones_like(existing))
    assert all(p.grad is None for name, p in embedder.named_parameters() if name != "0.weight")
    assert [module.training for module in embedder.modules()] == flags
    assert all(torch.equal(before[name], value) for name, value in embedder.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"embedder": 3}, "embedder: expected a callable"),
        ({"image_shape": (16, 16)}, r"image_shape: expected three positive ints"),
        ({"image_shape": (3, 0, 16)}, r"image_shape: expected three positive ints"),
        ({"input_range": (1.0, -1.0)}, r"input_range: expected .* low < high, got \(1.0, -1.0\)"),
        ({"input_range": (0.0, float("inf"))}, r"input_range: expected two finite numbers"),
        ({"batch_size": 1}, r"batch_size: expected an int >= 2, got 1"),
        ({"atol": -1.0}, r"atol: expected None or a number >= 0, got -1.0"),
        ({"rtol": "x"}, r"rtol: expected None or a number >= 0"),
    ],
)
def test_rejects_bad_arguments_before_calling(kwargs, message):
    calls = []

    def embedder(images):
        calls.append(1)
        return mean_pool(images)

    arguments = {"embedder": embedder, "image_shape": SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        check_embedder(**arguments)
    assert not calls


# ------------------------------------------------------------------------------------------------
# Strategies


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_embeddings_have_promised_shape_dtype_and_bounds(dtype):
    @settings(max_examples=25, deadline=None)
    @given(e=embeddings(3, 5, 2, 7, dtype, scale=4.0, max_offset=50.0))
    def check(e):
        assert e.dtype == dtype and e.device.type == "cpu"
        assert 3 <= e.shape[0] <= 5 and 2 <= e.shape[1] <= 7 and e.dim() == 2
        assert torch.isfinite(e).all()
        assert e.double().abs().max() <= 54.0 * (1 + torch.finfo(dtype).eps)

    check()


@settings(max_examples=25, deadline=None)
@given(e=embeddings(scale=2.0, max_offset=0.0, duplicates=False))
def test_embeddings_without_offset_stay_within_scale(e):
    assert e.abs().max() <= 2.0


def test_embeddings_reach_the_hard_cases():
    def copied_row(e):  # three distinct non-integers twice: independent draws almost never do that
        row = e[0].tolist()
        return torch.equal(e[0], e[1]) and len(set(row)) == 3 and all(value != int(value) for value in row)

    duplicated = find(
        embeddings(min_n=3, max_n=6, min_dim=3, max_dim=3, max_offset=0.0),
        copied_row,
        settings=settings(max_examples=2000, database=None, derandomize=True),
    )
    assert copied_row(duplicated)
    offset = find(
        embeddings(max_n=4, max_dim=3, scale=1.0),
        lambda e: bool((e.abs().min(dim=0).values > 100).all()),
        settings=settings(max_examples=2000, database=None, derandomize=True),
    )
    spread = (offset - offset.mean(dim=0)).abs().max()
    assert offset.abs().min() > 100 and spread <= 2.0  # a large offset over small differences


@settings(max_examples=40, deadline=None)
@given(pair=embedding_pairs(max_n=8, max_dim=16, dtype=torch.float64))
def test_embedding_pairs_have_one_shape(pair):
    src, gen = pair
    assert src.shape == gen.shape and src.dtype == gen.dtype == torch.float64
    assert 2 <= src.shape[0] <= 8 and 1 <= src.shape[1] <= 16


@settings(max_examples=40, deadline=None)
@given(e=embeddings())
def test_travel_loss_of_a_batch_with_itself_is_zero(e):
    # Only duplicate rows (zero-length vectors, cosine 0 by convention) cost anything; the
    # cosine of a vector with itself is 1 up to float64 round-off. "Duplicate" is travel_loss's
    # documented relative convention: a difference below 1e4 float64 eps of the centred rows.
    rows = e.double()
    centred_sq = ((rows - rows.mean(0)) ** 2).sum(1)
    diff_sq = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(2)
    duplicate = diff_sq <= 1e4 * torch.finfo(torch.float64).eps * (centred_sq[:, None] + centred_sq[None, :])
    duplicate.fill_diagonal_(False)
    cosine = travel_loss_fn(e, e, reduction="none")
    torch.testing.assert_close(cosine, duplicate.float(), rtol=0, atol=1e-12)
    assert torch.equal(travel_loss_fn(e, e, distance="squared_euclidean"), torch.tensor(0.0))


@settings(max_examples=40, deadline=None)
@given(pair=embedding_pairs(dtype=torch.bfloat16))
def test_travel_loss_is_finite_and_bounded_on_embedding_pairs(pair):
    loss = travel_loss_fn(*pair, reduction="none")
    assert torch.isfinite(loss).all() and loss.min() >= 0 and loss.max() <= 2


@settings(max_examples=40, deadline=None)
@given(images=image_batches(min_n=2, max_n=3, channels=2, sizes=[5, (6, 9)], input_range=(0, 255)))
def test_image_batches_have_promised_shape_and_range(images):
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert 2 <= images.shape[0] <= 3 and images.shape[1] == 2
    assert tuple(images.shape[2:]) in ((5, 5), (6, 9))
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 255


def test_image_batches_reach_flat_images_that_break_a_whole_image_std():
    images = find(
        image_batches(max_n=1, sizes=[4]),
        lambda x: bool((x == x.flatten()[0]).all()),
        settings=settings(max_examples=500, database=None, derandomize=True),
    )
    assert not torch.isfinite(whole_image_standardised(images)).all()


def test_image_batches_reach_both_ends_of_the_range():
    images = find(
        image_batches(max_n=1, sizes=[4]),
        lambda x: bool(x.min() == -1 and x.max() == 1),
        settings=settings(max_examples=500, database=None, derandomize=True),
    )
    assert images.min() == -1 and images.max() == 1


@settings(max_examples=10, deadline=None)
@given(images=image_batches(min_n=1, max_n=3, sizes=[16], dtype=torch.float64))
def test_image_batches_feed_an_embedder(images):
    embedder = frozen(conv_pool_net()).double()
    assert embedder(images).shape == (images.shape[0], 6)


@pytest.mark.parametrize(
    "strategy, kwargs, message",
    [
        (embeddings, {"min_n": 3, "max_n": 2}, r"min_n, max_n: expected ints with 1 <= min_n"),
        (embeddings, {"min_dim": 0}, r"min_dim, max_dim"),
        (embeddings, {"dtype": torch.int32}, r"dtype: expected one of"),
        (embeddings, {"scale": 0.0}, r"scale: expected a finite number > 0"),
        (embedding_pairs, {"max_offset": -1.0}, r"max_offset: expected a finite number >= 0"),
        (embedding_pairs, {"dtype": torch.float16, "max_offset": 1e5}, r"below the largest"),
        (image_batches, {"min_n": 0}, r"min_n, max_n"),
        (image_batches, {"channels": 0}, r"channels: expected an int >= 1"),
        (image_batches, {"sizes": []}, r"sizes: expected a non-empty sequence"),
        (image_batches, {"sizes": [(4, 0)]}, r"sizes: expected"),
        (image_batches, {"input_range": (1, 1)}, r"input_range: expected"),
        (image_batches, {"dtype": torch.int64}, r"dtype: expected a floating-point"),
    ],
)
def test_strategies_reject_bad_options(strategy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        strategy(**kwargs)


def test_check_embedder_works_without_hypothesis(monkeypatch):
    hypothesis_modules = ("hypothesis", "hypothesis.strategies", "hypothesis.extra.numpy")
    for name in hypothesis_modules:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import hypothesis` fail
    monkeypatch.delitem(sys.modules, "travel_loss.testing")
    monkeypatch.setattr(travel_loss, "testing", None, raising=False)
    fresh = importlib.import_module("travel_loss.testing")
    fresh.check_embedder(mean_pool, SMALL)
    for strategy in (fresh.embeddings, fresh.embedding_pairs, fresh.image_batches):
        with pytest.raises(ImportError, match=r"need hypothesis.*pip install hypothesis"):
            strategy()
