"""The structure loss (travel_loss.structure): invariances, sensitivity, a loop reference, gradients, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import travel_loss
from travel_loss import StructureLoss, sample_positions, self_similarity, self_similarity_loss

FAST = settings(max_examples=25, deadline=None)


def _orthogonal(dim: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))  # a uniformly random orthogonal matrix (any determinant)


def _features(seed: int, n: int, c: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


geometry = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(1, 3),  # N
    st.integers(2, 6),  # C
    st.integers(3, 6),  # H
    st.integers(3, 6),  # W
    st.sampled_from([None, 3]),  # window
)


@FAST
@given(geometry, st.booleans())
def test_orthogonal_transform_scale_and_offset_of_the_features_leave_it_at_zero(case, squared):
    seed, n, c, h, w, window = case
    g = torch.Generator().manual_seed(seed + 1)
    src = _features(seed, n, c, h, w)
    rotations = torch.stack([_orthogonal(c, g) for _ in range(n)])  # one per image
    scales = torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    offsets = torch.randn(n, 1, c, generator=g, dtype=torch.float64) * 5
    tokens = src.flatten(2).transpose(1, 2)  # (N, L, C)
    gen = scales * tokens @ rotations.transpose(1, 2) + offsets
    distance = "squared" if squared else "l1"
    loss = self_similarity_loss(tokens, gen, grid=(h, w), window=window, distance=distance, reduction="none")
    assert loss.shape == (n,)
    assert loss.abs().max() < 1e-10


@FAST
@given(geometry)
def test_a_spatial_permutation_of_the_translations_positions_changes_it(case):
    seed, n, c, h, w, window = case
    src = _features(seed, n, c + 2, h, w)  # at least 4 channels: random positions are not collinear
    length = h * w
    permutation = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    if torch.equal(permutation, torch.arange(length)):
        permutation = permutation.roll(1)
    gen = src.flatten(2)[:, :, permutation].unflatten(2, (h, w))
    loss = self_similarity_loss(src, gen, window=window, reduction="none")
    assert (loss > 1e-3).all()


def _depthwise_bank(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """A linear extractor: every kernel on every colour channel, no padding: (N, 3 J, H', W')."""
    n, channels, height, width = images.shape
    maps = F.conv2d(images.reshape(n * channels, 1, height, width), kernels[:, None])
    return maps.reshape(n, channels * kernels.shape[0], *maps.shape[-2:])


@FAST
@given(st.integers(0, 10_000), st.sampled_from([None, 3]), st.booleans())
def test_per_pixel_affine_colour_changes_through_a_linear_extractor_leave_it_at_zero(seed, window, invert):
    """x -> s R x + b at every pixel (R orthogonal, per image); inversion of polarity included."""
    g = torch.Generator().manual_seed(seed)
    n = 2
    images = torch.rand(n, 3, 9, 9, generator=g, dtype=torch.float64) * 2 - 1
    kernels = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    rotations = torch.stack([_orthogonal(3, g) for _ in range(n)])
    if invert:
        rotations = -torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    scale = torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64) + 0.2
    offset = torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64)
    restyled = scale * torch.einsum("nij,njhw->nihw", rotations, images) + offset
    loss = self_similarity_loss(
        _depthwise_bank(images, kernels), _depthwise_bank(restyled, kernels), window=window, reduction="none"
    )
    assert loss.abs().max() < 1e-10
    moved = torch.roll(restyled, 2, dims=-1)  # the same colours, the structure moved
    assert (self_similarity_loss(_depthwise_bank(images, kernels), _depthwise_bank(moved, kernels)) > 1e-3).all()


def _loop_reference(src, gen, window, rows, distance):
    """S by loops over images, centres and neighbours, with torch.cosine_similarity on centred features."""
    n, _, h, w = src.shape
    per_image = []
    for i in range(n):
        diffs = []
        for p in rows.tolist():
            r, col = divmod(p, w)
            if window is None:
                cells = [(rr, cc) for rr in range(h) for cc in range(w)]
            else:
                half = window // 2
                cells = [(rr, cc) for rr in range(r - half, r + half + 1) for cc in range(col - half, col + half + 1)]
            for rr, cc in cells:
                sims = []
                for maps in (src[i], gen[i]):
                    centred = maps - maps.mean(dim=(1, 2), keepdim=True)
                    sims.append(torch.cosine_similarity(centred[:, r, col], centred[:, rr, cc], dim=0, eps=1e-30))
                d = sims[0] - sims[1]
                diffs.append(d.abs() if distance == "l1" else d.square())
        per_image.append(torch.stack(diffs).mean())
    return torch.stack(per_image)


@pytest.mark.parametrize("window", [None, 3, 5])
@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_agrees_with_a_loop_over_centres_and_neighbours(window, distance):
    src, gen = _features(0, 2, 3, 5, 6), _features(1, 2, 3, 5, 6)
    rows = sample_positions((5, 6), 2, window=window, generator=torch.Generator().manual_seed(0))
    got = self_similarity_loss(src, gen, window=window, positions=rows, distance=distance, reduction="none")
    torch.testing.assert_close(got, _loop_reference(src, gen, window, rows, distance))


def test_every_centre_by_default_and_maps_equal_their_flattened_tokens():
    src, gen = _features(2, 3, 4, 5, 5), _features(3, 3, 4, 5, 5)
    maps = self_similarity(src, window=3)
    assert maps.shape == (3, 9, 9)  # the 3 x 3 centres whose window fits, 9 neighbours each
    assert torch.allclose(maps[:, :, 4], torch.ones(3, 9, dtype=torch.float64))  # a centre with itself
    tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    for window in (None, 3):
        expected = self_similarity_loss(src, gen, window=window)
        assert torch.equal(self_similarity_loss(tokens(src), tokens(gen), grid=(5, 5), window=window), expected)
    assert self_similarity(tokens(src)).shape == (3, 25, 25)


def test_reductions_and_chunks_of_a_batch_add_up_exactly():
    src, gen = _features(4, 6, 3, 4, 4), _features(5, 6, 3, 4, 4)
    rows = sample_positions((4, 4), 5, generator=torch.Generator().manual_seed(1))
    per_image = self_similarity_loss(src, gen, positions=rows, reduction="none")
    assert torch.equal(self_similarity_loss(src, gen, positions=rows, reduction="sum"), per_image.sum())
    whole = self_similarity_loss(src, gen, positions=rows)
    chunks = sum(self_similarity_loss(src[k : k + 2], gen[k : k + 2], positions=rows) * 2 / 6 for k in (0, 2, 4))
    torch.testing.assert_close(chunks, whole, rtol=0, atol=1e-15)


def test_an_int_draws_the_same_positions_for_source_and_translation_from_the_generator():
    src = _features(6, 2, 3, 6, 6)
    assert self_similarity_loss(src, src.clone(), positions=7, window=3, generator=torch.Generator()) == 0
    first = self_similarity_loss(src, _features(7, 2, 3, 6, 6), positions=3, generator=torch.Generator().manual_seed(9))
    again = self_similarity_loss(src, _features(7, 2, 3, 6, 6), positions=3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, again)
    drawn = sample_positions((6, 6), 16, window=3, generator=torch.Generator().manual_seed(0))
    assert drawn.unique().numel() == 16 and all(1 <= p // 6 < 5 and 1 <= p % 6 < 5 for p in drawn.tolist())
    centres = sample_positions((6, 6), 4, window=5)
    assert sorted(centres.tolist()) == [14, 15, 20, 21]  # the only centres whose 5 x 5 window fits


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_gradients_match_finite_differences(window, distance):
    src = _features(8, 2, 3, 4, 5).requires_grad_(True)
    gen = _features(9, 2, 3, 4, 5).requires_grad_(True)
    rows = torch.tensor([6, 8, 12])
    assert torch.autograd.gradcheck(
        lambda a, b: self_similarity_loss(a, b, window=window, positions=rows, distance=distance), (src, gen)
    )


def test_low_precision_features_give_a_float32_loss():
    src, gen = _features(10, 2, 4, 4, 4), _features(11, 2, 4, 4, 4)
    loss = self_similarity_loss(src.bfloat16(), gen.bfloat16())
    assert loss.dtype == torch.float32
    assert math.isclose(float(loss), float(self_similarity_loss(src, gen)), rel_tol=0.05)


def test_module_form_equals_the_function_and_is_exported():
    src, gen = _features(12, 2, 4, 6, 6), _features(13, 2, 4, 6, 6)
    module = StructureLoss(window=3, positions=4, distance="squared", reduction="sum")
    expected = self_similarity_loss(
        src, gen, window=3, positions=4, distance="squared", reduction="sum", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(module(src, gen, generator=torch.Generator().manual_seed(3)), expected)
    assert "window=3" in repr(module)
    assert {"StructureLoss", "self_similarity_loss", "self_similarity", "sample_positions"} <= set(travel_loss.__all__)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a, b: self_similarity_loss(a.numpy(), b), "feat_src: expected a torch.Tensor"),
        (lambda a, b: self_similarity_loss(a, b[:1]), "feat_gen: expected the shape"),
        (lambda a, b: self_similarity_loss(a[0, 0], b[0, 0]), "feat_src: expected (N, C, H, W)"),
        (lambda a, b: self_similarity_loss(a.long(), b.long()), "feat_gen: expected a floating-point"),
        (lambda a, b: self_similarity_loss(a[:0], b[:0]), "feat_src: expected at least one image"),
        (lambda a, b: self_similarity_loss(a, b, window=4), "window: expected None (global) or an odd int"),
        (lambda a, b: self_similarity_loss(a, b, window=7), "window: expected at most the grid's smaller side 5"),
        (lambda a, b: self_similarity_loss(a, b, grid=(4, 5)), "grid: a feature map carries its own grid"),
        (lambda a, b: self_similarity_loss(a.flatten(2).mT, b.flatten(2).mT, grid=(4, 4)), "grid: expected H * W"),
        (lambda a, b: self_similarity_loss(a.flatten(2).mT, b.flatten(2).mT, window=3), "grid=(H, W)"),
        (lambda a, b: self_similarity_loss(a, b, positions=26), "count: expected an int in [1, 25]"),
        (lambda a, b: self_similarity_loss(a, b, window=3, positions=torch.tensor([0])), "positions: expected flat"),
        (lambda a, b: self_similarity_loss(a, b, positions=torch.tensor([0.5])), "positions: expected an integer"),
        (lambda a, b: self_similarity_loss(a, b, distance="cosine"), "distance: expected one of 'l1'"),
        (lambda a, b: self_similarity_loss(a, b, reduction="max"), "reduction: expected one of"),
        (lambda a, b: StructureLoss(positions=0), "positions: expected None or an int >= 1"),
        (lambda a, b: sample_positions((0, 3), 1), "grid: expected (H, W)"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(call, message):
    a, b = _features(14, 2, 3, 5, 5), _features(15, 2, 3, 5, 5)
    with pytest.raises((TypeError, ValueError)) as error:
        call(a, b)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------------
# The trainer's --lambda-structure (reference/): flags, resume, a user module's tokens


def _trainer_config(tmp_path, tiny_clip_dir, tiny_folders, **overrides):
    from reference.config import TrainConfig

    options = dict(
        data=str(tiny_folders), size=32, batch_size=4, steps=4, encoder=str(tiny_clip_dir), encoder_mode="clip",
        crop="full", g_width=8, g_blocks=1, d_width=8, d_layers=2, out=str(tmp_path), log_every=1,
        sample_every=1000, checkpoint_every=1000, num_workers=0, lambda_travel=0.0,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


def test_trainer_resumes_an_auto_structure_run_bit_for_bit(tmp_path, tiny_clip_dir, tiny_folders):
    import dataclasses
    import json

    from reference.checkpoint import load_checkpoint
    from reference.train import train

    config = _trainer_config(
        tmp_path / "full", tiny_clip_dir, tiny_folders, lambda_structure="auto", structure_positions=3, flip=True
    )
    train(config, progress=False)
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), steps=2), progress=False)
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), resume=True), progress=False)
    full, halves = (load_checkpoint(tmp_path / name / "latest.pt") for name in ("full", "halves"))
    assert full["adaptive_structure"]["count"] == 4 and full["adaptive_structure"] == halves["adaptive_structure"]
    for key in ("generator", "discriminator"):
        assert all(torch.equal(full[key][k], halves[key][k]) for k in full[key]), key
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_structure"] > 0 and r["lambda_structure"] > 0 for r in records)

    # The structure term reaches the generator: without it (and without travel), G ends elsewhere.
    train(dataclasses.replace(config, out=str(tmp_path / "gan"), lambda_structure=0.0), progress=False)
    gan = load_checkpoint(tmp_path / "gan" / "latest.pt")
    assert any(not torch.equal(gan["generator"][k], full["generator"][k]) for k in gan["generator"])


def test_structure_flags_are_checked_naming_the_flag(tmp_path):
    from reference.config import TrainConfig, check_config, encoder_needed
    from reference.train import build_parser

    base = dict(data="data", out=str(tmp_path))
    for bad, message in [
        (dict(lambda_structure=-1.0), "lambda_structure: expected a finite number >= 0 or 'auto'"),
        (dict(lambda_structure="often"), "lambda_structure: expected a finite number >= 0 or 'auto'"),
        (dict(structure_window=4), "structure_window: expected 0 (global) or an odd window side"),
        (dict(structure_positions=-2), "structure_positions: expected an int >= 0"),
        (dict(lambda_structure=1.0, encoder_mode="siamese"), "lambda_structure: expected 0 with encoder_mode siamese"),
        (dict(lambda_structure="auto", micro_batch=2), "lambda_structure: expected a number with micro_batch > 0"),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            check_config(TrainConfig(**base, **bad))
    parsed = vars(build_parser().parse_args(["--data", "d", "--lambda-structure", "auto", "--structure-window", "5"]))
    assert parsed["lambda_structure"] == "auto" and parsed["structure_window"] == 5
    assert encoder_needed(TrainConfig(**base, lambda_travel=0.0, lambda_structure=2.0))
    assert not encoder_needed(TrainConfig(**base, lambda_travel=0.0))


def test_a_user_module_without_tokens_stops_the_run_naming_the_flag(tmp_path, tiny_folders):
    from reference.runtime import SetupError
    from reference.train import train

    spec = "reference/studies/digit_data.py:pixel_embedder"  # forward only, no tokens
    config = _trainer_config(
        tmp_path, None, tiny_folders, encoder=spec, encoder_mode="module", lambda_structure=1.0, size=16
    )
    with pytest.raises(SetupError, match="^--lambda-structure: the encoder .* gives no spatial tokens"):
        train(config, progress=False)


def test_the_digit_studys_stroke_tokens_keep_a_digits_structure_across_the_style_change():
    """The study's spatial features: a digit and its ideal B-style render (other colours, polarity and
    stroke width) have closer self-similarity maps than the same digit and another digit's render."""
    from reference.studies.digit_data import digit_domains, stroke_embedder

    domains = digit_domains(seed=0)
    embedder = stroke_embedder()
    a, ideal = domains.a_test[:128], domains.a_test_ideal[:128]
    tokens_a, tokens_ideal = embedder.tokens(a), embedder.tokens(ideal)
    assert tokens_a.shape == (128, 9, 16, 16)
    same = self_similarity_loss(tokens_a, tokens_ideal, window=3, reduction="none")
    other = self_similarity_loss(tokens_a, tokens_ideal.roll(1, dims=0), window=3, reduction="none")
    assert float(same.mean()) < 0.85 * float(other.mean())  # measured 0.25 against 0.32
    assert float((same < other).float().mean()) > 0.9  # measured 0.95
