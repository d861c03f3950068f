"""FrozenCLIPEncoder and EncoderEnsemble on tiny CLIP checkpoints built in the tests.

The independent references are transformers itself: its CLIP image processor (PIL backend) for
the preprocessing, and direct calls of the CLIP model for the embeddings.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import skimage.data
import torch
from conftest import TINY_CLIP_CONFIG, TINY_CLIP_MEAN, TINY_CLIP_STD
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from travel_loss import travel_loss
from travel_loss.encoder import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CheckpointNotFoundError,
    EncoderEnsemble,
    FrozenCLIPEncoder,
)

PHOTOS = ("astronaut", "coffee", "chelsea")  # 512x512, 400x600, 300x451: both orientations
# A 224 px model as cheap as the tiny one: patch 32, one layer.
CONFIG_224 = dict(TINY_CLIP_CONFIG, image_size=224, patch_size=32, num_hidden_layers=1)


def photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


def as_input(images_hwc: np.ndarray, input_range=(-1.0, 1.0)) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in input_range."""
    lo, hi = input_range
    x = torch.from_numpy(np.ascontiguousarray(images_hwc)).permute(2, 0, 1)[None].double() / 255
    return (lo + (hi - lo) * x).float()


def processor_pixels(processor: CLIPImageProcessorPil, image_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(processor(image_hwc, return_tensors="np")["pixel_values"]))


def manual_normalise(x: torch.Tensor, mean, std, input_range=(-1.0, 1.0)) -> torch.Tensor:
    lo, hi = input_range
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return ((x - lo) / (hi - lo) - mean) / std


def images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, height, width, generator=generator) * 2 - 1


def input_gradient(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = encoder(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return grad


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir) -> FrozenCLIPEncoder:
    return FrozenCLIPEncoder(tiny_clip_dir)


# ------------------------------------------------------------------------------------------
# Loading: checkpoint config, processor config, instances


def test_reads_size_mean_and_std_from_the_processor_config(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    assert encoder.image_size == 32
    assert encoder.mean == pytest.approx(TINY_CLIP_MEAN)
    assert encoder.std == pytest.approx(TINY_CLIP_STD)
    x = images(2, 32, 32)
    expected = manual_normalise(x, TINY_CLIP_MEAN, TINY_CLIP_STD)
    torch.testing.assert_close(encoder.preprocess(x), expected)


def test_without_processor_config_falls_back_to_openai_constants(tiny_clip_dir_without_processor):
    encoder = FrozenCLIPEncoder(tiny_clip_dir_without_processor)
    assert encoder.image_size == TINY_CLIP_CONFIG["image_size"]
    assert encoder.mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert encoder.std == pytest.approx(OPENAI_CLIP_STD)


def test_legacy_processor_keys_give_shortest_edge_and_crop(tiny_clip_dir_legacy):
    # size 36 (shortest edge), crop_size 32: a 36 x 50 image is not resized, only cropped.
    encoder = FrozenCLIPEncoder(tiny_clip_dir_legacy, crop="resize")
    assert encoder.image_size == 32 and encoder.mean == pytest.approx(TINY_CLIP_MEAN)
    x = images(1, 36, 50)
    expected = manual_normalise(x[..., 2:34, 9:41], TINY_CLIP_MEAN, TINY_CLIP_STD)
    torch.testing.assert_close(encoder.preprocess(x), expected)


def test_explicit_options_override_the_checkpoint(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, mean=0.5, std=(0.1, 0.2, 0.3), input_range=(0, 1))
    x = images(1, 32, 32) * 0.5 + 0.5
    torch.testing.assert_close(encoder.preprocess(x), manual_normalise(x, (0.5,) * 3, (0.1, 0.2, 0.3), (0.0, 1.0)))


@pytest.mark.parametrize("features", ["pooled", "projected"])
def test_embeddings_are_the_clip_models_own(tiny_clip_dir, features):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, features=features)
    reference = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    x = images(3, 32, 32)
    with torch.no_grad():
        out = encoder(x)
        pixel_values = encoder.preprocess(x)
        if features == "projected":
            expected = reference(pixel_values=pixel_values).image_embeds
        else:
            expected = reference.vision_model(pixel_values=pixel_values).pooler_output
    dim = TINY_CLIP_CONFIG["projection_dim" if features == "projected" else "hidden_size"]
    assert out.shape == (3, dim) and encoder.embedding_dim == dim and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_model_instances_are_accepted_and_frozen_in_place():
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_CONFIG)).train()
    encoder = FrozenCLIPEncoder(vision)
    assert not vision.training and not any(p.requires_grad for p in vision.parameters())
    x = images(2, 32, 32)
    with torch.no_grad():
        expected = vision(pixel_values=encoder.preprocess(x)).pooler_output
    torch.testing.assert_close(encoder(x), expected)
    with pytest.raises(ValueError, match="features: 'projected' needs a visual projection"):
        FrozenCLIPEncoder(vision, features="projected")


def test_full_clip_checkpoint_loads_its_vision_half(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=text, vision_config=TINY_CLIP_CONFIG, projection_dim=16)
    full = CLIPModel(config)
    full.save_pretrained(tmp_path, safe_serialization=True)
    from_folder = FrozenCLIPEncoder(tmp_path, features="projected")
    from_instance = FrozenCLIPEncoder(full, features="projected")
    x = images(2, 32, 32)
    torch.testing.assert_close(from_folder(x), from_instance(x))


def test_checkpoint_without_projection_serves_pooled_only(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_CONFIG)).save_pretrained(tmp_path)
    assert FrozenCLIPEncoder(tmp_path).embedding_dim == TINY_CLIP_CONFIG["hidden_size"]
    with pytest.raises(ValueError, match="needs a visual projection"):
        FrozenCLIPEncoder(tmp_path, features="projected")


def test_checkpoint_missing_tower_weights_is_refused(tiny_clip_dir, tmp_path):
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    tensors = load_file(tiny_clip_dir / "model.safetensors")
    del tensors["vision_model.post_layernorm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a CLIP vision checkpoint.*post_layernorm.weight"):
        FrozenCLIPEncoder(tmp_path)


def test_other_image_size_interpolates_position_embeddings(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, image_size=48, crop="full")
    x = images(2, 40, 56)
    pixel_values = encoder.preprocess(x)
    assert pixel_values.shape == (2, 3, 48, 48)
    with torch.no_grad():
        expected = encoder.model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(encoder(x), expected)


def test_from_config_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = FrozenCLIPEncoder.from_config(CLIPVisionConfig(**TINY_CLIP_CONFIG), seed=1)
    b = FrozenCLIPEncoder.from_config(dict(TINY_CLIP_CONFIG), seed=1)
    c = FrozenCLIPEncoder.from_config(CLIPVisionConfig(**TINY_CLIP_CONFIG), seed=2, crop="full")
    assert torch.equal(torch.get_rng_state(), state)
    x = images(2, 32, 32)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert a.mean == pytest.approx(OPENAI_CLIP_MEAN) and c.crop == "full"


# ------------------------------------------------------------------------------------------
# Crop policies: geometry against the processor, gradient footprint


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("checkpoint", ["tiny_clip_dir", "tiny_clip_dir_legacy", "224"])
def test_resize_matches_the_clip_image_processor_on_photos(request, checkpoint, name):
    if checkpoint == "224":
        encoder = FrozenCLIPEncoder.from_config(CONFIG_224, seed=0, crop="resize")
        processor = CLIPImageProcessorPil()  # OpenAI's: shortest edge 224, crop 224
    else:
        folder = request.getfixturevalue(checkpoint)
        encoder = FrozenCLIPEncoder(folder, crop="resize")
        processor = CLIPImageProcessorPil.from_pretrained(folder)
    image = photo(name)
    expected = processor_pixels(processor, image)
    got = encoder.preprocess(as_input(image))
    assert got.shape == expected.shape
    # PIL rounds its resized pixels to 8 bits: mean |error| ~0.25 / 255 / std ~ 0.004 (measured 0.004 to
    # 0.008, astronaut's edges adding PIL's clipping of bicubic overshoot); a one-pixel shift costs ~0.1.
    assert (got - expected).abs().mean() <= 0.01


@pytest.mark.parametrize("name", PHOTOS)
def test_full_matches_a_square_resize_by_the_processor(tiny_clip_dir, name):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, crop="full")
    processor = CLIPImageProcessorPil(
        size={"height": 32, "width": 32},
        do_center_crop=False,
        image_mean=list(TINY_CLIP_MEAN),
        image_std=list(TINY_CLIP_STD),
    )
    image = photo(name)
    got, expected = encoder.preprocess(as_input(image)), processor_pixels(processor, image)
    assert got.shape == expected.shape == (1, 3, 32, 32)
    assert (got - expected).abs().mean() <= 0.01  # 8-bit rounding by PIL, as in the test above


@pytest.fixture(scope="module")
def resize_pair(tiny_clip_dir):
    return (
        FrozenCLIPEncoder(tiny_clip_dir, crop="resize"),
        CLIPImageProcessorPil.from_pretrained(tiny_clip_dir),
    )


@settings(max_examples=25, deadline=None)
@given(
    short=st.integers(33, 60),
    long=st.integers(33, 120),
    portrait=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_resize_output_size_and_crop_offsets_are_the_processors(resize_pair, short, long, portrait, seed):
    # Noise images make a one-pixel error in the floored long edge or the crop offset cost
    # ~0.1 in mean absolute difference; a faithful geometry differs by ~0.003 (8-bit rounding).
    # Mid-grey values keep PIL's 8-bit clipping of bicubic overshoot out of the comparison.
    encoder, processor = resize_pair
    long = max(long, short)
    height, width = (long, short) if portrait else (short, long)
    image = np.random.default_rng(seed).integers(64, 192, size=(height, width, 3), dtype=np.uint8)
    got, expected = encoder.preprocess(as_input(image)), processor_pixels(processor, image)
    assert (got - expected).abs().mean() <= 0.01


@settings(max_examples=25, deadline=None)
@given(height=st.integers(32, 70), width=st.integers(32, 70))
def test_resize_crop_is_exact_when_no_resize_is_needed(resize_pair, height, width):
    # Shortest edge already 32: the processor only crops, with floored offsets.
    encoder, processor = resize_pair
    height = 32 if height <= width else height
    width = 32 if height > 32 else width
    rng = np.random.default_rng(height * 100 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    got, expected = encoder.preprocess(as_input(image)), processor_pixels(processor, image)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(height=st.integers(32, 80), width=st.integers(32, 80))
def test_center_is_the_central_square_without_resizing(tiny, height, width):
    x = images(1, height, width)
    top, left = (height - 32) // 2, (width - 32) // 2
    crop = x[..., top : top + 32, left : left + 32]
    expected = manual_normalise(crop, TINY_CLIP_MEAN, TINY_CLIP_STD)
    torch.testing.assert_close(tiny.preprocess(x), expected)


def test_center_of_256_for_a_224_model_is_the_notebooks_slice():
    encoder = FrozenCLIPEncoder.from_config(CONFIG_224, seed=0)
    x = images(2, 256, 256)
    expected = manual_normalise(x[..., 16:240, 16:240], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    torch.testing.assert_close(encoder.preprocess(x), expected)
    grad = input_gradient(encoder, x)
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[..., 16:240, 16:240] = True
    assert torch.all(grad[~inside] == 0)
    assert torch.all(grad[inside] != 0)


@pytest.mark.parametrize("height, width", [(45, 61), (32, 32), (20, 26)])
def test_full_gives_every_pixel_a_gradient(tiny_clip_dir, height, width):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, crop="full")
    grad = input_gradient(encoder, images(2, height, width))
    assert torch.all(grad != 0)


def test_resize_gives_no_gradient_outside_its_crop(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, crop="resize")
    grad = input_gradient(encoder, images(2, 32, 64))  # shortest edge already 32: columns 16:48
    assert torch.all(grad[..., :16] == 0) and torch.all(grad[..., 48:] == 0)
    assert torch.all(grad[..., 16:48] != 0)


def test_preprocess_gradient_is_correct_in_float64(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, crop="resize", image_size=8).double()
    x = images(1, 11, 14).double().requires_grad_(True)
    assert torch.autograd.gradcheck(encoder.preprocess, (x,))


# ------------------------------------------------------------------------------------------
# Frozen inside a parent module


def parent_with(encoder: FrozenCLIPEncoder) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), encoder)


def test_stays_in_eval_mode_when_the_parent_trains(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    parent = parent_with(encoder).train()
    assert parent[0].training and not encoder.training
    assert not any(module.training for module in encoder.model.modules())
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_weights_are_not_in_the_parents_state_dict_or_parameters(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    parent = parent_with(encoder)
    assert set(parent.state_dict()) == {"0.weight", "0.bias"}
    assert len(list(parent.parameters())) == 2 and encoder.state_dict() == {}
    parent.load_state_dict(parent_with(FrozenCLIPEncoder(tiny_clip_dir)).state_dict())
    before = copy.deepcopy(encoder.model.state_dict())
    parent.apply(lambda m: nn.init.zeros_(m.weight) if hasattr(m, "weight") else None)
    assert all(torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())


def test_dtype_and_device_moves_reach_the_weights(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    parent = parent_with(encoder).double()
    assert all(p.dtype == torch.float64 for p in encoder.model.parameters())
    assert parent(images(2, 32, 32).double()).dtype == torch.float64
    parent.to(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    parent.to("cpu").float()
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())


def test_an_optimizer_step_through_the_encoder_leaves_its_weights_unchanged(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    parent = parent_with(encoder).train()
    generator = parent[:2]
    weights_before = copy.deepcopy(encoder.model.state_dict())
    generator_before = generator[0].weight.detach().clone()
    optimizer = torch.optim.Adam(parent.parameters(), lr=1e-2)
    x = images(4, 32, 32)
    with torch.no_grad():
        emb_src = encoder(x)
    travel_loss(emb_src, parent(x)).backward()
    optimizer.step()
    assert generator[0].weight.grad is not None and generator[0].weight.grad.abs().sum() > 0
    assert not torch.equal(generator[0].weight, generator_before)
    assert all(p.grad is None for p in encoder.model.parameters())
    after = encoder.model.state_dict()
    assert all(torch.equal(weights_before[key], after[key]) for key in after)


# ------------------------------------------------------------------------------------------
# autocast and torch.compile


@pytest.mark.parametrize("crop", ["center", "resize"])
def test_bfloat16_autocast_on_cpu_agrees_with_float32(tiny_clip_dir, crop):
    encoder = FrozenCLIPEncoder(tiny_clip_dir, crop=crop)
    x = images(4, 40, 48)
    expected = encoder(x)
    for inputs in (x, x.bfloat16()):  # a generator under autocast hands over bfloat16 images
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = encoder(inputs)
        assert got.shape == expected.shape and torch.isfinite(got).all()
        # bfloat16 keeps 8 significant bits (unit round-off 2^-9 = 0.2%) through ~10 matmuls and
        # norms: measured 0.3% of the largest entry; 2% leaves margin for other CPUs' kernels.
        assert (got.float() - expected).abs().max() <= 0.02 * expected.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grad = input_gradient(encoder, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_torch_compile_agrees_with_eager(tiny_clip_dir):
    # aot_eager traces the whole forward and backward (fullgraph: no graph break) without
    # inductor's C++ build, which costs ~40 s on two cores; inductor was checked by hand.
    # Earlier compiles in the same process (the trainer's tests) would turn on dynamo's automatic
    # dynamic shapes for this forward, and torch 2.13's antialiased bicubic backward then fails on
    # symbolic sizes (an internal assert): start from a clean cache and compile for static shapes.
    torch._dynamo.reset()
    encoder = FrozenCLIPEncoder(tiny_clip_dir, crop="resize", features="projected")
    compiled = torch.compile(encoder, backend="aot_eager", fullgraph=True, dynamic=False)
    x = images(3, 40, 48)
    torch.testing.assert_close(compiled(x), encoder(x))
    torch.testing.assert_close(input_gradient(compiled, x), input_gradient(encoder, x))


# ------------------------------------------------------------------------------------------
# Bad input, bad options, missing weights


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([[0.0]], TypeError, "images: expected a torch.Tensor, got list"),
        (torch.zeros(3, 32, 32), ValueError, r"\(N, 3, H, W\).*3-D tensor of shape \(3, 32, 32\)"),
        (torch.zeros(2, 1, 32, 32), ValueError, r"expected 3 \(RGB\) channels.*got 1 channels"),
        (torch.zeros(0, 3, 32, 32), ValueError, "empty batch"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ValueError, "floating-point.*torch.uint8"),
        (torch.full((2, 3, 32, 32), 255.0), ValueError, r"input_range=\(-1, 1\), got min 255 and"),
        (torch.full((2, 3, 32, 32), -1.05), ValueError, r"input_range=\(-1, 1\), got min -1.05"),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError, "got min nan"),
        (torch.zeros(2, 3, 31, 40), ValueError, r"crop='center'.*at least 32 pixels.*got 31x40"),
    ],
)
def test_bad_images_are_refused_with_a_clear_message(tiny, bad, error, message):
    with pytest.raises(error, match=message):
        tiny(bad)


def test_values_within_tolerance_and_unchecked_ranges_pass(tiny_clip_dir):
    encoder = FrozenCLIPEncoder(tiny_clip_dir)
    expected_shape = (2, encoder.embedding_dim)
    # The tolerance is 1% of the range width: 0.02 for (-1, 1).
    overshoot = encoder(torch.full((2, 3, 32, 32), 1.01))  # tanh-ish overshoot inside the tolerance
    assert overshoot.shape == expected_shape and torch.isfinite(overshoot).all()
    with pytest.raises(ValueError, match=r"got min 1.03 and max 1.03"):
        encoder(torch.full((2, 3, 32, 32), 1.03))  # just outside it
    encoder.check_range = False
    unchecked = encoder(torch.full((2, 3, 32, 32), 255.0))
    assert unchecked.shape == expected_shape and torch.isfinite(unchecked).all()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(crop="middle"), "crop: expected one of 'center', 'resize', 'full', got 'middle'"),
        (dict(features="cls"), "features: expected one of 'pooled', 'projected', got 'cls'"),
        (dict(input_range=(1, -1)), r"input_range: expected \(lo, hi\) with finite lo < hi"),
        (dict(input_range=(0, float("inf"))), "input_range"),
        (dict(image_size=0), "image_size: expected a positive int"),
        (dict(image_size=36), "image_size: expected a multiple of the patch size 8, got 36"),
        (dict(mean=(0.5, 0.5)), "mean: expected 3 finite numbers"),
        (dict(std=(0.5, 0.0, 0.5)), "std: expected 3 positive, finite numbers"),
        (dict(mean=(123.7, 116.3, 103.5)), r"mean: expected values on the \[0, 1\] scale.*divide by 255"),
        (dict(std=(58.4, 57.1, 57.4)), r"std: expected values on the \[0, 1\] scale.*divide by 255"),
        (dict(trust_remote_code=True), "trust_remote_code: FrozenCLIPEncoder never runs code"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(tiny_clip_dir, options, message):
    with pytest.raises(ValueError, match=message):
        FrozenCLIPEncoder(tiny_clip_dir, **options)


def test_bad_model_arguments_are_refused(tiny):
    with pytest.raises(TypeError, match="model: expected a hub id, a folder path"):
        FrozenCLIPEncoder(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="from_pretrained_kwargs: only used when loading"):
        FrozenCLIPEncoder(tiny.model, revision="main")
    with pytest.raises(ValueError, match=r"options: unknown keyword arguments \['revision'\]"):
        FrozenCLIPEncoder.from_config(CLIPVisionConfig(**TINY_CLIP_CONFIG), revision="main")


def assert_short_not_found_error(excinfo: pytest.ExceptionInfo, name: str) -> str:
    error = excinfo.value
    message = str(error)
    assert isinstance(error, FileNotFoundError)
    assert error.__cause__ is None and error.__suppress_context__  # raised `from None`
    assert name in message and "not found locally" in message and "HF_HOME" in message
    assert "network" in message and len(message) < 600 and "\n" not in message
    return message


def test_missing_folder_says_where_and_how_to_fix(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointNotFoundError) as excinfo:
        FrozenCLIPEncoder(missing)
    assert "no folder" in assert_short_not_found_error(excinfo, str(missing))


def test_missing_hub_id_in_offline_mode_says_how_to_fix(tmp_path):
    name = "travel-loss-tests/no-such-clip"
    with pytest.raises(CheckpointNotFoundError) as excinfo:
        FrozenCLIPEncoder(name, cache_dir=tmp_path)
    message = assert_short_not_found_error(excinfo, name)
    assert "offline" in message and str(tmp_path) in message and f"hf download {name}" in message


def test_hub_id_loads_offline_from_the_local_cache(tiny_clip_dir, tmp_path):
    # The cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>}.
    def fake_cache(name: str, files: tuple[str, ...]) -> None:
        repo = tmp_path / f"models--{name.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        for file in files:
            (snapshot / file).write_bytes((tiny_clip_dir / file).read_bytes())

    fake_cache("org/tiny-clip", ("config.json", "model.safetensors", "preprocessor_config.json"))
    fake_cache("org/no-processor", ("config.json", "model.safetensors"))
    encoder = FrozenCLIPEncoder("org/tiny-clip", cache_dir=tmp_path, features="projected")
    bare = FrozenCLIPEncoder("org/no-processor", cache_dir=tmp_path, local_files_only=True)
    assert encoder.mean == pytest.approx(TINY_CLIP_MEAN) and encoder.embedding_dim == 16
    assert bare.mean == pytest.approx(OPENAI_CLIP_MEAN)
    x = images(2, 32, 32)
    from_folder = FrozenCLIPEncoder(tiny_clip_dir, features="projected")
    torch.testing.assert_close(encoder(x), from_folder(x))


def test_folder_without_weights_is_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no CLIP checkpoint in the folder") as info:
        FrozenCLIPEncoder(tmp_path)
    assert str(tmp_path) in str(info.value) and info.value.__cause__ is None


# ------------------------------------------------------------------------------------------
# Ensemble


def test_ensemble_loss_is_the_mean_of_per_encoder_losses(tiny_clip_dir):
    vit_a = FrozenCLIPEncoder(tiny_clip_dir)  # centre crop, pooled, 32 px
    vit_b = FrozenCLIPEncoder.from_config(  # whole image, projected, 48 px
        dict(TINY_CLIP_CONFIG, image_size=48, patch_size=16, projection_dim=8),
        seed=0,
        crop="full",
        features="projected",
    )
    ensemble = EncoderEnsemble(vit_a, vit_b)
    x, translated = images(4, 40, 44, seed=0), images(4, 40, 44, seed=1)
    emb_x, emb_t = ensemble(x), ensemble(translated)
    assert isinstance(emb_x, tuple) and [e.shape for e in emb_x] == [(4, 32), (4, 8)]
    assert ensemble.embedding_dims == (32, 8) and len(ensemble) == 2
    losses = [travel_loss(vit(x), vit(translated)) for vit in (vit_a, vit_b)]
    expected = (losses[0] + losses[1]) / 2
    torch.testing.assert_close(travel_loss(emb_x, emb_t), expected)
    assert ensemble.train().state_dict() == {} and not vit_a.training and not vit_b.model.training


def test_ensemble_refuses_bad_members(tiny):
    with pytest.raises(ValueError, match="encoders: expected at least one encoder"):
        EncoderEnsemble()
    with pytest.raises(TypeError, match=r"encoders\[1\]: expected an nn.Module"):
        EncoderEnsemble(tiny, lambda x: x)  # type: ignore[arg-type]
