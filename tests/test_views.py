"""Shared random views: each transform against a plain reference, the loss's properties, the options'
errors, and the gaming probe (a frozen embedder gamed without views, not with them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from travel_loss import RandomViews, TravelLoss, TravelQueue, embed_views, travel_loss, travel_loss_over_views
from travel_loss.loss import Distance
from travel_loss.views import (
    TRANSFORMS,
    ViewDraw,
    add_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    blur,
    crop_and_resize,
    embed_each_view,
    flip,
    shift,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DISTANCES = ("cosine", "squared_euclidean", "travelgan")
EVERY_TRANSFORM = RandomViews(
    count=3, crop=0.5, shift=2, flip=0.5, blur=0.5, brightness=0.3, saturation=0.5, contrast=0.5, noise=0.1
)
FAST = settings(max_examples=25, deadline=None)


def images(n: int = 4, size: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def conv_encoder(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small frozen conv net: (N, 3, H, W) -> (N, 8 * 4 * 4)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
    return net.to(dtype).eval().requires_grad_(False)


class CountingEncoder(nn.Module):
    """Wraps an encoder and counts the images it embeds."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images_seen = 0

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.images_seen += batch.shape[0]
        return self.inner(batch)


@st.composite
def random_views(draw: st.DrawFn, max_count: int = 3) -> RandomViews:
    """Any valid views for 12 px images (each transform on or off)."""
    return RandomViews(
        count=draw(st.integers(1, max_count)),
        crop=draw(st.sampled_from([0.0, 0.3, 0.9])),
        shift=draw(st.integers(0, 3)),
        flip=draw(st.sampled_from([0.0, 0.5, 1.0])),
        blur=draw(st.sampled_from([0.0, 0.5, 1.0])),
        brightness=draw(st.sampled_from([0.0, 0.5])),
        saturation=draw(st.sampled_from([0.0, 1.0])),
        contrast=draw(st.sampled_from([0.0, 0.5])),
        noise=draw(st.sampled_from([0.0, 0.1])),
        average=draw(st.sampled_from(["embeddings", "loss"])),
    )


# ------------------------------------------------------------------------------------------
# each transform against a straightforward reference


@FAST
@given(dy=st.integers(-5, 5), dx=st.integers(-5, 5), height=st.integers(6, 9), width=st.integers(6, 9))
def test_shift_is_a_window_of_the_reflect_padded_image(dy: int, dx: int, height: int, width: int) -> None:
    x = torch.rand(2, 3, height, width, dtype=torch.float64)
    padded = F.pad(x, (5, 5, 5, 5), mode="reflect")
    expected = padded[:, :, 5 + dy : 5 + dy + height, 5 + dx : 5 + dx + width]
    offsets = torch.tensor([[dy, dx], [0, 0]])
    got = shift(x, offsets)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], x[1])


@FAST
@given(data=st.data())
def test_crop_and_resize_is_interpolate_of_the_slice(data: st.DataObject) -> None:
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    boxes = []
    for _ in range(2):
        height, width = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 12))
        top, left = data.draw(st.integers(0, 10 - height)), data.draw(st.integers(0, 12 - width))
        boxes.append([top, left, height, width])
    got = crop_and_resize(x, torch.tensor(boxes))
    for n, (top, left, height, width) in enumerate(boxes):
        window = x[n : n + 1, :, top : top + height, left : left + width]
        expected = F.interpolate(window, size=(10, 12), mode="bilinear", align_corners=True)
        torch.testing.assert_close(got[n : n + 1], expected, rtol=1e-9, atol=1e-9)


def test_flip_is_torch_flip_where_drawn() -> None:
    x = images(3)
    got = flip(x, torch.tensor([True, False, True]))
    assert torch.equal(got[0], torch.flip(x[0], dims=[-1]))
    assert torch.equal(got[1], x[1])
    assert torch.equal(got[2], torch.flip(x[2], dims=[-1]))


def test_blur_is_the_binomial_convolution_of_the_reflect_padded_image() -> None:
    x = images(2, dtype=torch.float64)
    kernel_1d = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) / 4
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, 3, 3)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)
    got = blur(x, torch.tensor([True, False]))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], x[1])


def test_colour_transforms_follow_their_formulas() -> None:
    x = images(2, dtype=torch.float64)
    values = torch.tensor([0.5, 1.5], dtype=torch.float64)
    for n in range(2):
        grey = x[n].mean(dim=0, keepdim=True)
        mean = x[n].mean()
        torch.testing.assert_close(adjust_brightness(x, values)[n], x[n] + values[n])
        torch.testing.assert_close(adjust_saturation(x, values)[n], grey + (x[n] - grey) * values[n])
        torch.testing.assert_close(adjust_contrast(x, values)[n], mean + (x[n] - mean) * values[n])
    noise = torch.randn_like(x)
    assert torch.equal(add_noise(x, noise), x + noise)
    # Saturation 0 is grey; contrast 0 is the image's mean.
    assert torch.allclose(adjust_saturation(x, torch.zeros(2)), x.mean(dim=1, keepdim=True).expand_as(x))


@FAST
@given(views=random_views(), seed=st.integers(0, 2**31 - 1))
def test_draws_stay_in_their_ranges(views: RandomViews, seed: int) -> None:
    x = images(6)
    draw = views.draw(x, torch.Generator().manual_seed(seed))
    for name in TRANSFORMS:
        assert (getattr(draw, name) is None) == (not getattr(views, name)), name
    if draw.shift is not None:
        assert int(draw.shift.abs().max()) <= views.shift
    if draw.crop is not None:
        top, left, height, width = draw.crop.unbind(1)
        assert bool((top >= 0).all() and (left >= 0).all())
        assert bool((top + height <= 12).all() and (left + width <= 12).all())
        assert int(height.min()) >= round((1 - views.crop) * 12) - 1
    for name, centre, spread in (("brightness", 0.0, views.brightness), ("saturation", 1.0, views.saturation)):
        values = getattr(draw, name)
        if values is not None:
            assert float((values - centre).abs().max()) <= spread + 1e-6
    view = views.apply(x, draw)
    assert view.shape == x.shape
    assert float(view.min()) >= -1 and float(view.max()) <= 1  # clamped to value_range


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_views_keep_dtype_shape_and_device(dtype: torch.dtype) -> None:
    x = images(4, dtype=dtype)
    draw = EVERY_TRANSFORM.draw(x, torch.Generator().manual_seed(0))
    view = EVERY_TRANSFORM.apply(x, draw)
    assert view.dtype == dtype and view.shape == x.shape and view.device == x.device
    for name in TRANSFORMS:
        assert getattr(EVERY_TRANSFORM, name), "EVERY_TRANSFORM must switch every transform on"


def test_bfloat16_images_and_encoder_give_a_float32_loss_with_bfloat16_gradients() -> None:
    encoder = conv_encoder(dtype=torch.bfloat16)
    x = images(4, dtype=torch.bfloat16)
    fake = (x * 0.5).requires_grad_(True)
    src, gen = embed_views(encoder, x, fake, EVERY_TRANSFORM, generator=torch.Generator().manual_seed(0))
    assert src.dtype == gen.dtype == torch.bfloat16 and src.shape == gen.shape == (4, 128)
    loss = travel_loss_over_views(encoder, x, fake, EVERY_TRANSFORM, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert fake.grad is not None and fake.grad.dtype == torch.bfloat16


def test_transforms_pass_gradcheck_in_float64() -> None:
    x = images(2, size=6, dtype=torch.float64).requires_grad_(True)
    draws = {
        shift: torch.tensor([[1, -2], [0, 1]]),
        crop_and_resize: torch.tensor([[1, 0, 4, 5], [0, 0, 6, 6]]),
        blur: torch.tensor([True, False]),
        adjust_saturation: torch.tensor([0.5, 1.5]),
        adjust_contrast: torch.tensor([0.5, 1.5]),
    }
    for transform, draw in draws.items():
        assert torch.autograd.gradcheck(lambda images, t=transform, d=draw: t(images, d), (x,)), transform.__name__


# ------------------------------------------------------------------------------------------
# the loss under views


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("average", ["embeddings", "loss"])
def test_one_view_without_transforms_is_the_plain_loss_exactly(distance: str, reduction: str, average: str) -> None:
    encoder = conv_encoder()
    x, fake = images(5, seed=1), images(5, seed=2)
    plain = travel_loss(encoder(x), encoder(fake), distance=distance, reduction=reduction)  # type: ignore[arg-type]
    for count in (1, 2):
        views = RandomViews(count=count, average=average)  # type: ignore[arg-type]
        options = dict(distance=distance, reduction=reduction)
        assert torch.equal(travel_loss_over_views(encoder, x, fake, views, **options), plain)  # type: ignore[arg-type]
        module = TravelLoss(distance, reduction, encoder=encoder, views=views)  # type: ignore[arg-type]
        assert torch.equal(module(x, fake), plain)


@FAST
@given(views=random_views(), seed=st.integers(0, 2**31 - 1), distance=st.sampled_from(DISTANCES))
def test_the_identity_translation_has_zero_loss_under_any_views(
    views: RandomViews, seed: int, distance: Distance
) -> None:
    x = images(4, seed=seed % 1000)
    generator = torch.Generator().manual_seed(seed)
    loss = travel_loss_over_views(conv_encoder(), x, x.clone(), views, generator=generator, distance=distance)
    assert float(loss) <= 1e-6


@FAST
@given(views=random_views(), seed=st.integers(0, 2**31 - 1))
def test_the_same_seed_gives_the_same_views(views: RandomViews, seed: int) -> None:
    encoder, x, fake = conv_encoder(), images(4, seed=1), images(4, seed=2)
    first, second = (
        travel_loss_over_views(encoder, x, fake, views, generator=torch.Generator().manual_seed(seed)) for _ in range(2)
    )
    assert torch.equal(first, second)
    draws = [views.draw(x, torch.Generator().manual_seed(seed)) for _ in range(2)]
    for name in TRANSFORMS:
        a, b = getattr(draws[0], name), getattr(draws[1], name)
        assert (a is None and b is None) or torch.equal(a, b)


def test_the_global_rng_is_used_without_a_generator() -> None:
    encoder, x, fake = conv_encoder(), images(4, seed=1), images(4, seed=2)
    torch.manual_seed(7)
    first = travel_loss_over_views(encoder, x, fake, EVERY_TRANSFORM)
    second = travel_loss_over_views(encoder, x, fake, EVERY_TRANSFORM)
    torch.manual_seed(7)
    assert not torch.equal(first, second)
    assert torch.equal(travel_loss_over_views(encoder, x, fake, EVERY_TRANSFORM), first)


def test_gradients_reach_the_translations_only() -> None:
    from travel_loss import FrozenEncoder

    encoder = FrozenEncoder(conv_encoder(), mean=0.5, std=0.25, image_size=12, crop="full")
    x = images(4, seed=1).requires_grad_(True)
    fake = images(4, seed=2).requires_grad_(True)
    loss_fn = TravelLoss(encoder=encoder, views=EVERY_TRANSFORM)  # noise and jitter: clamped into range
    loss_fn(x, fake, generator=torch.Generator().manual_seed(0)).backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert x.grad is None
    assert all(p.grad is None for p in encoder.model.parameters())
    assert not list(loss_fn.parameters())


def test_average_loss_is_the_mean_of_the_per_view_losses() -> None:
    encoder, x, fake = conv_encoder(), images(4, seed=1), images(4, seed=2)
    views = RandomViews(count=3, shift=2, blur=0.5, noise=0.1, average="loss")
    got = travel_loss_over_views(encoder, x, fake, views, generator=torch.Generator().manual_seed(3))
    src, gen = embed_each_view(encoder, x, fake, views, generator=torch.Generator().manual_seed(3))
    per_view = [travel_loss(s, g) for s, g in zip(src, gen)]
    torch.testing.assert_close(got, torch.stack(per_view).mean())
    # ... and by hand: view k applies draw k to both batches, embedded one view at a time.
    generator = torch.Generator().manual_seed(3)
    draws = [views.draw(x, generator) for _ in range(3)]
    by_hand = [travel_loss(encoder(views.apply(x, d)), encoder(views.apply(fake, d))) for d in draws]
    torch.testing.assert_close(got, torch.stack(by_hand).mean(), rtol=1e-5, atol=1e-7)


def test_averaged_embeddings_are_the_mean_over_views_for_a_tuple_encoder() -> None:
    first, second = conv_encoder(0), conv_encoder(1)

    def ensemble(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return first(batch), second(batch)

    x, fake = images(4, seed=1), images(4, seed=2)
    src, gen = embed_views(ensemble, x, fake, EVERY_TRANSFORM, generator=torch.Generator().manual_seed(0))
    assert isinstance(src, tuple) and len(src) == 2 and src[0].shape == (4, 128)
    single_src, single_gen = embed_views(first, x, fake, EVERY_TRANSFORM, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(src[0], single_src)
    torch.testing.assert_close(gen[0], single_gen)
    loss = travel_loss_over_views(ensemble, x, fake, EVERY_TRANSFORM, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, travel_loss(src, gen))


def test_the_encoder_runs_count_times_per_image() -> None:
    encoder = CountingEncoder(conv_encoder())
    travel_loss_over_views(encoder, images(4), images(4, seed=1), RandomViews(count=3, noise=0.1))
    assert encoder.images_seen == 2 * 3 * 4


def test_queue_with_views_queues_the_view_averaged_embeddings() -> None:
    encoder, x, fake = conv_encoder(), images(3, seed=1), images(3, seed=2).requires_grad_(True)
    views = RandomViews(count=2, shift=2, noise=0.1)
    queue = TravelQueue(size=8, encoder=encoder, views=views)
    loss = queue(x, fake, generator=torch.Generator().manual_seed(0))
    src, gen = embed_views(encoder, x, fake, views, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, travel_loss(src, gen))
    queued_src, queued_gen = queue.queued
    assert queued_src is not None and queued_gen is not None
    assert torch.equal(queued_src, src.detach()) and torch.equal(queued_gen, gen.detach())
    loss.backward()
    assert fake.grad is not None
    # Batch 1 pairs with the queue; without views the queue still takes images with an encoder.
    assert float(queue(x[:1], fake[:1].detach())) > 0
    plain_queue = TravelQueue(size=0, encoder=encoder)
    assert torch.equal(plain_queue(x, fake), travel_loss(encoder(x), encoder(fake)))


# ------------------------------------------------------------------------------------------
# bad options: a clear error naming the argument, before any work

BAD_OPTIONS = [
    ("count", 0),
    ("count", 2.0),
    ("count", True),
    ("shift", -1),
    ("shift", 1.5),
    ("crop", 1.0),
    ("crop", -0.1),
    ("flip", 1.5),
    ("blur", -0.5),
    ("brightness", -0.1),
    ("brightness", float("nan")),
    ("saturation", 2.0),
    ("contrast", 1.5),
    ("noise", -0.1),
    ("noise", float("inf")),
    ("average", "median"),
    ("value_range", (1.0, -1.0)),
    ("value_range", (0.0,)),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_bad_options_name_the_argument(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, got "):
        RandomViews(**{name: value})  # type: ignore[arg-type]


def test_parse_reads_a_spec_and_names_unknown_transforms() -> None:
    expected = RandomViews(count=2, shift=2, blur=0.5, noise=0.1)
    assert RandomViews.parse("count=2, shift=2,blur=0.5,noise=0.1") == expected
    assert RandomViews.parse("") == RandomViews()
    assert RandomViews.parse("average=loss").average == "loss"
    with pytest.raises(ValueError, match=r"unknown view option 'shfit'.*expected one of count, crop, shift"):
        RandomViews.parse("shfit=2")
    with pytest.raises(ValueError, match=r"^shift: expected an int, got '2.5'"):
        RandomViews.parse("shift=2.5")
    with pytest.raises(ValueError, match=r"^noise: expected a finite standard deviation >= 0, got -1.0"):
        RandomViews.parse("noise=-1")
    with pytest.raises(ValueError, match=r"expected name=value, got 'blur'"):
        RandomViews.parse("blur")


def test_bad_arguments_fail_before_the_encoder_runs() -> None:
    encoder = CountingEncoder(conv_encoder())
    x = images(4)
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        (dict(fake=images(4, size=10)), ValueError, r"^x, fake: expected the same shape .* got \(4, 3, 12, 12\) and"),
        (dict(fake=images(3)), ValueError, r"^x, fake: expected the same shape"),
        (dict(x=x[:1], fake=x[:1]), ValueError, r"^x: expected a batch of at least 2 images"),
        (dict(views=RandomViews(shift=12)), ValueError, r"^shift: expected fewer pixels than the image's sides"),
        (dict(views="shift=2"), TypeError, r"^views: expected a travel_loss.RandomViews, got str"),
        (dict(fake=x[0]), ValueError, r"^fake: expected a floating-point \(N, C, H, W\) batch"),
        (dict(x=x.long(), fake=x.long()), ValueError, r"^x: expected a floating-point"),
        (dict(generator=0), TypeError, r"^generator: expected None or a torch.Generator, got int"),
        (dict(distance="cos"), ValueError, r"^distance: expected one of"),
    ]
    for changes, error, pattern in cases:
        arguments: dict[str, object] = {"x": x, "fake": images(4, seed=1), "views": EVERY_TRANSFORM, **changes}
        options = {k: arguments.pop(k) for k in ("generator", "distance") if k in arguments}
        with pytest.raises(error, match=pattern):
            travel_loss_over_views(encoder, **arguments, **options)  # type: ignore[arg-type]
        assert encoder.images_seen == 0, changes


def test_module_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^views: random views are of images, so they need encoder="):
        TravelLoss(views=RandomViews(count=2))
    with pytest.raises(TypeError, match=r"^views: expected None or a travel_loss.RandomViews, got dict"):
        TravelLoss(encoder=conv_encoder(), views={"count": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^views: a TravelQueue queues view-averaged embeddings"):
        TravelQueue(4, encoder=conv_encoder(), views=RandomViews(average="loss"))
    emb = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^generator: draws the random views, but this TravelLoss has none"):
        TravelLoss()(emb, emb, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"^generator: draws the random views, but this TravelQueue has none"):
        TravelQueue(4)(emb, emb, generator=torch.Generator())


def test_draw_records_every_transform_field() -> None:
    assert set(TRANSFORMS) == {field for field in ViewDraw.__dataclass_fields__}
    assert RandomViews().is_identity and not RandomViews(flip=0.5).is_identity


# ------------------------------------------------------------------------------------------
# the gaming probe: a wrong translation beats the ideal without views, not with them


def test_views_stop_a_wrong_translation_from_gaming_the_embedder() -> None:
    from benchmarks.bench_gaming import LIGHT_VIEWS, frozen_embedder, gaming_probe, palette_translation, toy_scenes

    x = toy_scenes(8, 16, torch.Generator().manual_seed(0))
    ideal = palette_translation(x)
    wrong = ideal.roll(1, dims=0)  # every translation shows another scene's layout
    embedder = frozen_embedder("patch", 16, seed=0)
    plain, _ = gaming_probe(embedder, x, ideal, wrong, None, eps=0.1, steps=100)
    viewed, _ = gaming_probe(embedder, x, ideal, wrong, LIGHT_VIEWS, eps=0.1, steps=100)
    # The probe has teeth: without views, a change of at most 0.1 per pixel takes the wrong content
    # below half the ideal translation's loss.
    assert plain.start_loss > 2 * plain.ideal_loss
    assert plain.ratio < 0.5, plain
    assert plain.change <= 0.1
    # With two shared views the same budget leaves the wrong content above the ideal's loss.
    assert viewed.ratio > 1.0, viewed
    assert viewed.ratio > 4 * plain.ratio
