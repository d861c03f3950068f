"""Properties of travel_loss and siamese_margin_loss against a straightforward per-pair oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from travel_loss import TravelLoss, siamese_margin_loss, travel_loss
from travel_loss.testing import embedding_pairs, embeddings

DISTANCES = ("cosine", "squared_euclidean", "travelgan")


# ------------------------------------------------------------------------------------------
# The oracle: the definition, one pair at a time, in float64, with no tricks.

ZERO_LENGTH_RTOL = 1e4 * torch.finfo(torch.float64).eps


def pair_distance_oracle(src: torch.Tensor, gen: torch.Tensor, distance: str) -> torch.Tensor:
    src, gen = src.double().flatten(1), gen.double().flatten(1)
    n, d = src.shape
    centred_src, centred_gen = src - src.mean(0), gen - gen.mean(0)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            v, z = src[i] - src[j], gen[i] - gen[j]
            norm_v, norm_z = v.norm(), z.norm()
            # The documented convention: a vector is zero-length when its squared length is at
            # most ZERO_LENGTH_RTOL times the squared norms of the two centred embeddings.
            zero_v = norm_v**2 <= ZERO_LENGTH_RTOL * (centred_src[i].norm() ** 2 + centred_src[j].norm() ** 2)
            zero_z = norm_z**2 <= ZERO_LENGTH_RTOL * (centred_gen[i].norm() ** 2 + centred_gen[j].norm() ** 2)
            cosine = 0.0 if zero_v or zero_z else float(v @ z / (norm_v * norm_z))
            squared = float(((v - z) ** 2).sum()) / d
            out[i, j] = {
                "cosine": 1 - cosine,
                "squared_euclidean": squared,
                "travelgan": 1 - cosine + squared,
            }[distance]
    return out


def margin_oracle(emb: torch.Tensor, margin: float) -> float:
    emb = emb.double().flatten(1)
    n = emb.shape[0]
    terms = [max(0.0, margin - float(((emb[i] - emb[j]) ** 2).sum())) for i in range(n) for j in range(n) if i != j]
    return sum(terms) / len(terms)


def assert_matches_oracle(src: torch.Tensor, gen: torch.Tensor, distance: str) -> None:
    expected = pair_distance_oracle(src, gen, distance)
    got = travel_loss(src, gen, distance=distance, reduction="none")
    # 1e-5 relative; the absolute floor covers float32 round-off of values that are ~0.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    n = src.shape[0]
    mean = travel_loss(src, gen, distance=distance)
    assert math.isclose(float(mean), float(expected.sum()) / (n * (n - 1)), rel_tol=1e-5, abs_tol=1e-7)


# ------------------------------------------------------------------------------------------
# Inputs: the library's public strategies (float32, common offsets up to 1e3, duplicate rows),
# small enough for the per-pair oracle, and hand-built hard cases that hypothesis must not miss.

PAIRS = embedding_pairs(max_n=9, max_dim=7)


def random_pair(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator)


def far_from_the_origin_pair(offset: float = 1e6) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows at a common offset 1e6 with differences ~1: without centring, the float64
    Gram entries are ~1e12 * D, so their round-off (~1e-4 * D) and the zero-length threshold
    (1e4 eps * 2e12 * D ~ 4 D) swamp the squared differences (~2 D)."""
    src, gen = random_pair(6, 4, seed=5)
    return src + offset, gen - offset


ABOVE_THRESHOLD_COSINE = -0.37


def near_duplicate_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 rows with two near-duplicate pairs on either side of the zero-length threshold
    (squared length <= 1e4 eps64 ~ 2.2e-12 times the two centred rows' squared norms):

    - rows 0, 1 of ``src`` differ by 1e-4 (ratio ~2e-9: 1e3 above the threshold, 1e3 below it
      times 1e6): a real vector; ``gen`` makes its cosine ABOVE_THRESHOLD_COSINE;
    - rows 2, 3 of ``src`` differ by 3e-7 (ratio ~7e-14: 30 below the threshold, 3e4 above it
      divided by 1e6): zero length, cosine 0, although ``gen`` makes it parallel to its partner.
    """
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    gen = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    x_axis, y_axis = torch.eye(3, dtype=torch.float64)[:2]
    cosine, sine = ABOVE_THRESHOLD_COSINE, math.sqrt(1 - ABOVE_THRESHOLD_COSINE**2)
    src[1] = src[0] + 1e-4 * x_axis  # v_01 = -1e-4 x
    gen[1] = gen[0] + cosine * x_axis - sine * y_axis  # z_01 = -cosine x + sine y
    src[3] = src[2] + 3e-7 * x_axis  # v_23 = -3e-7 x
    gen[3] = gen[2] + 2.0 * x_axis  # z_23 = -2 x, parallel to v_23
    return src, gen


def exact_duplicates_pair() -> tuple[torch.Tensor, torch.Tensor]:
    src, gen = random_pair(6, 3, seed=4)
    src[4], gen[2] = src[1], gen[5]
    return src, gen


# ------------------------------------------------------------------------------------------
# Agreement with the oracle


@settings(max_examples=60, deadline=None)
@given(pair=PAIRS, distance=st.sampled_from(DISTANCES))
@example(pair=far_from_the_origin_pair(), distance="cosine")
@example(pair=near_duplicate_pair(), distance="cosine")
@example(pair=exact_duplicates_pair(), distance="travelgan")
@example(pair=random_pair(2, 1), distance="travelgan")
def test_matches_per_pair_oracle_on_arbitrary_inputs(pair, distance):
    assert_matches_oracle(*pair, distance)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(
    "case",
    [
        "n2",
        "d1",
        "duplicates",
        "offset_1e4",
        "offset_1e6_float32",
        "scale_1e-4",
        "scale_1e4",
        "correlated",
        "all_equal",
    ],
)
def test_matches_per_pair_oracle_on_hard_inputs(case, distance):
    src, gen = random_pair(12, 16)
    if case == "n2":
        src, gen = src[:2], gen[:2]
    elif case == "d1":
        src, gen = src[:, :1], gen[:, :1]
    elif case == "duplicates":
        src[3], src[7], gen[5], gen[9] = src[1], src[1], gen[2], gen[2]
    elif case == "offset_1e4":
        src, gen = src + 1e4, gen - 1e4
    elif case == "offset_1e6_float32":
        src, gen = src + 1e6, gen - 1e6  # float32 inputs that need centring, see far_from_the_origin_pair
    elif case == "scale_1e-4":
        src, gen = src * 1e-4, gen * 1e-4
    elif case == "scale_1e4":
        src, gen = src * 1e4, gen * 1e4
    elif case == "correlated":
        gen = 0.5 * src + 1e-3 * gen  # cosines ~1: the distance is a small difference
    elif case == "all_equal":
        src = torch.ones_like(src)
    assert_matches_oracle(src, gen, distance)


def test_correlated_pairs_keep_relative_precision_of_tiny_distances():
    src, noise = random_pair(16, 64, seed=3)
    gen = 2.0 * src + 1e-3 * noise
    expected = pair_distance_oracle(src, gen, "cosine")
    got = travel_loss(src, gen, reduction="none").double()
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert expected[off_diagonal].max() < 1e-4  # tiny distances, where cancellation would show
    torch.testing.assert_close(got[off_diagonal], expected[off_diagonal], rtol=1e-5, atol=0)


def test_float32_inputs_far_from_the_origin_give_the_loss_of_their_differences():
    far_src, far_gen = far_from_the_origin_pair(offset=1e6)
    # Exact: the float32 entries near 1e6 lie on a 1/16 grid, so subtracting 1e6 does not round.
    near_src, near_gen = far_src - 1e6, far_gen + 1e6
    far = travel_loss(far_src, far_gen, reduction="none")
    torch.testing.assert_close(far, travel_loss(near_src, near_gen, reduction="none"), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(far.double(), pair_distance_oracle(near_src, near_gen, "cosine"), rtol=1e-6, atol=1e-7)


def test_zero_length_threshold_separates_near_duplicates_on_both_sides():
    src, gen = near_duplicate_pair()
    centred = src - src.mean(0)

    def ratio(i: int, j: int) -> float:  # squared length over the two centred squared norms
        return float((src[i] - src[j]).square().sum() / (centred[i].square().sum() + centred[j].square().sum()))

    assert 1e2 * ZERO_LENGTH_RTOL < ratio(0, 1) < 1e4 * ZERO_LENGTH_RTOL  # a real vector
    assert 1e-4 * ZERO_LENGTH_RTOL < ratio(2, 3) < 1e-1 * ZERO_LENGTH_RTOL  # a zero-length vector
    for pairs in (travel_loss(src, gen, reduction="none"), travel_loss(gen, src, reduction="none")):
        # 1 - cos by construction; the Gram form's round-off, eps64 / ratio(0, 1) ~ 1e-7, bounds the error.
        expected = 1 - ABOVE_THRESHOLD_COSINE
        assert pairs[0, 1] == pytest.approx(expected, abs=1e-6) and pairs[1, 0] == pytest.approx(expected, abs=1e-6)
        # Zero length: cosine exactly 0 by convention, although z_23 is parallel to v_23 (cosine 1).
        assert pairs[2, 3] == 1 and pairs[3, 2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_multiples_give_distances_exactly_within_0_2(dtype):
    # Round-off puts some Gram-form cosines of exactly parallel vectors one ulp past +-1; the
    # distances must still lie in [0, 2] (and be ~0 and ~2), as 1 - cos of a true cosine does.
    src = torch.randn(16, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    parallel = travel_loss(src, 2 * src, reduction="none")[off_diagonal]
    reversed_ = travel_loss(src, -2 * src, reduction="none")[off_diagonal]
    assert parallel.min() >= 0 and parallel.max() <= 1e-14
    assert reversed_.max() <= 2 and reversed_.min() >= 2 - 1e-6  # 2 - 1e-6: float32 rounds near 2 by 1.2e-7


def test_squared_euclidean_distances_are_never_negative():
    # w = (s - mean) - (g - mean) has duplicate rows 2 and 3 and near-duplicate rows 0 and 1;
    # K_ii + K_jj - 2 K_ij of such rows is round-off of either sign (seed 3: -1.8e-15).
    generator = torch.Generator().manual_seed(3)
    src = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    w = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    w[1], w[3] = w[0] * (1 + 1e-9), w[2]
    pairs = travel_loss(src, src - w, distance="squared_euclidean", reduction="none")
    assert pairs.min() >= 0 and pairs[2, 3] <= 1e-14 and pairs[0, 1] <= 1e-14


# ------------------------------------------------------------------------------------------
# Invariances


@settings(max_examples=40, deadline=None)
@given(pair=PAIRS, distance=st.sampled_from(DISTANCES), seed=st.integers(0, 2**16))
def test_invariant_to_one_permutation_of_both_batches(pair, distance, seed):
    src, gen = pair
    perm = torch.randperm(src.shape[0], generator=torch.Generator().manual_seed(seed))
    full = travel_loss(src, gen, distance=distance, reduction="none")
    permuted = travel_loss(src[perm], gen[perm], distance=distance, reduction="none")
    torch.testing.assert_close(permuted, full[perm][:, perm], rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    pair=PAIRS,
    distance=st.sampled_from(DISTANCES),
    offset=st.floats(-100, 100),
    which=st.sampled_from(["src", "gen"]),
)
def test_invariant_to_translation_of_either_set(pair, distance, offset, which):
    src, gen = (t.double() for t in pair)  # in float64 the shift itself rounds by ~1e-13 only
    shift = offset * torch.linspace(-1, 1, src.shape[1], dtype=torch.float64)
    moved = (src + shift, gen) if which == "src" else (src, gen + shift)
    torch.testing.assert_close(
        travel_loss(*moved, distance=distance, reduction="none"),
        travel_loss(src, gen, distance=distance, reduction="none"),
        rtol=1e-4,  # float64 Gram round-off, eps64 |c|^2 / |v|^2, for the closest distinct rows drawn
        atol=1e-5,
    )


@settings(max_examples=40, deadline=None)
@given(
    pair=PAIRS,
    factor=st.floats(1e-3, 1e3),
    which=st.sampled_from(["src", "gen"]),
)
def test_cosine_invariant_to_positive_scaling_of_either_set(pair, factor, which):
    src, gen = (t.double() for t in pair)  # float32 products would round the differences of offset rows
    scaled = (src * factor, gen) if which == "src" else (src, gen * factor)
    torch.testing.assert_close(
        travel_loss(*scaled, reduction="none"),
        travel_loss(src, gen, reduction="none"),
        rtol=1e-4,  # as for translation
        atol=1e-5,
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_invariant_to_one_rotation_of_the_embedding_space(distance):
    src, gen = random_pair(10, 24, seed=1)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(
        travel_loss(src @ rotation, gen @ rotation, distance=distance, reduction="none"),
        travel_loss(src, gen, distance=distance, reduction="none"),
        rtol=1e-5,
        atol=1e-6,
    )


@settings(max_examples=40, deadline=None)
@given(pair=PAIRS, distance=st.sampled_from(DISTANCES))
def test_symmetric_in_its_arguments(pair, distance):
    src, gen = pair
    torch.testing.assert_close(
        travel_loss(gen, src, distance=distance, reduction="none"),
        travel_loss(src, gen, distance=distance, reduction="none"),
    )


def test_changes_when_the_transformation_vectors_change():
    src, gen = random_pair(8, 16)
    assert float(travel_loss(src, src)) < 1e-7
    assert float(travel_loss(src, -src)) == pytest.approx(2.0)  # every vector reversed
    assert 0.5 < float(travel_loss(src, gen)) < 1.5  # independent sets: cosines ~0


# ------------------------------------------------------------------------------------------
# Range, minimum, reductions


@settings(max_examples=40, deadline=None)
@given(pair=embedding_pairs())
def test_cosine_pair_distances_lie_in_0_2_with_zero_diagonal(pair):
    pairs = travel_loss(*pair, reduction="none")
    assert pairs.shape == (pair[0].shape[0],) * 2
    assert torch.all(pairs >= 0) and torch.all(pairs <= 2)
    assert torch.all(pairs.diagonal() == 0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_identical_sets_give_zero_loss_and_zero_gradient(distance):
    src, _ = random_pair(16, 32)
    gen = src.clone().requires_grad_()
    loss = travel_loss(src, gen, distance=distance)
    loss.backward()
    assert float(loss.detach()) <= 1e-7
    assert float(gen.grad.abs().max()) <= 1e-7


@settings(max_examples=30, deadline=None)
@given(pair=PAIRS, distance=st.sampled_from(DISTANCES))
def test_reductions_agree(pair, distance):
    src, gen = pair
    n = src.shape[0]
    mean = travel_loss(src, gen, distance=distance, reduction="mean")
    total = travel_loss(src, gen, distance=distance, reduction="sum")
    pairs = travel_loss(src, gen, distance=distance, reduction="none")
    torch.testing.assert_close(total, mean * n * (n - 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pairs.sum(), total, rtol=1e-5, atol=1e-5)


def test_travelgan_distance_is_the_sum_of_the_two_terms():
    src, gen = random_pair(9, 11)
    torch.testing.assert_close(
        travel_loss(src, gen, distance="travelgan"),
        travel_loss(src, gen, distance="cosine") + travel_loss(src, gen, distance="squared_euclidean"),
    )


def test_several_encoders_give_the_mean_of_their_losses():
    (s1, g1), (s2, g2) = random_pair(6, 8, seed=1), random_pair(6, 32, seed=2)
    expected = (travel_loss(s1, g1) + travel_loss(s2, g2)) / 2
    torch.testing.assert_close(travel_loss((s1, s2), [g1, g2]), expected)


def test_images_shaped_inputs_are_flattened():
    src, gen = random_pair(5, 2 * 3 * 4)
    torch.testing.assert_close(travel_loss(src.view(5, 2, 3, 4), gen.view(5, 2, 3, 4)), travel_loss(src, gen))


# ------------------------------------------------------------------------------------------
# dtypes and gradients


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_dtype_and_half_precision_inputs(dtype):
    src, gen = random_pair(8, 16)
    loss = travel_loss(src.to(dtype), gen.to(dtype))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Half inputs are rounded, then computed exactly as the float32 oracle sees them.
    expected = pair_distance_oracle(src.to(dtype), gen.to(dtype), "cosine").sum() / (8 * 7)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_in_float64(distance):
    src, gen = (t.double().requires_grad_() for t in random_pair(5, 4, seed=7))
    # Central differences in float64 with eps 1e-6: truncation ~eps^2 = 1e-12, round-off ~1e-16 / eps = 1e-10.
    assert torch.autograd.gradcheck(
        lambda s, g: travel_loss(s, g, distance=distance), (src, gen), eps=1e-6, atol=1e-8, rtol=1e-5
    )
    assert torch.autograd.gradcheck(
        lambda e: siamese_margin_loss(e, margin=4.0), (src,), eps=1e-6, atol=1e-8, rtol=1e-5
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_are_finite_with_duplicates_and_zero_embeddings(distance):
    src, gen = random_pair(8, 6)
    src[2] = src[5]
    gen[1] = gen[4]
    gen[6] = gen[7] = 0
    src.requires_grad_()
    gen.requires_grad_()
    travel_loss(src, gen, distance=distance).backward()
    assert torch.isfinite(src.grad).all() and torch.isfinite(gen.grad).all()
    # Duplicate-free rows still receive a gradient.
    assert src.grad[0].abs().sum() > 0


def test_gradient_matches_oracle_gradient():
    src, gen = random_pair(6, 5, seed=11)
    gen_ours = gen.double().requires_grad_()
    gen_oracle = gen.double().requires_grad_()
    travel_loss(src.double(), gen_ours).backward()
    (pair_distance_oracle_differentiable(src.double(), gen_oracle)).backward()
    torch.testing.assert_close(gen_ours.grad, gen_oracle.grad)


def pair_distance_oracle_differentiable(src: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    n = src.shape[0]
    v = src[:, None, :] - src[None, :, :]
    z = gen[:, None, :] - gen[None, :, :]
    off = ~torch.eye(n, dtype=torch.bool)
    return (1 - torch.nn.functional.cosine_similarity(v[off], z[off], dim=-1)).mean()


def test_compiled_equals_eager():
    src, gen = random_pair(16, 32)
    try:  # only a platform without a working compiler may skip; travel_loss's own errors must fail
        torch.compile(lambda x: x * 2 + 1)(src)
    except Exception as error:  # pragma: no cover - depends on the platform's compiler
        pytest.skip(f"torch.compile is unavailable here: {type(error).__name__}: {error}")
    got = torch.compile(travel_loss, fullgraph=False)(src, gen)
    torch.testing.assert_close(got, travel_loss(src, gen))


# ------------------------------------------------------------------------------------------
# The margin term and the module form


@settings(max_examples=30, deadline=None)
@given(emb=embeddings(max_n=9, max_dim=7, scale=3.0), margin=st.floats(0, 20))
def test_siamese_margin_loss_matches_oracle(emb, margin):
    assert float(siamese_margin_loss(emb, margin)) == pytest.approx(margin_oracle(emb, margin), rel=1e-5, abs=1e-5)


def test_siamese_margin_loss_pushes_close_pairs_apart():
    emb = (0.01 * torch.randn(6, 4, generator=torch.Generator().manual_seed(0))).requires_grad_()
    siamese_margin_loss(emb, margin=10.0).backward()
    stepped = emb.detach() - 0.1 * emb.grad
    assert torch.pdist(stepped).min() > torch.pdist(emb.detach()).min()


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(distance, reduction):
    src, gen = random_pair(7, 9)
    module = TravelLoss(distance=distance, reduction=reduction)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    torch.testing.assert_close(module(src, gen), travel_loss(src, gen, distance=distance, reduction=reduction))


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work


def _raises(match: str, *args, error=ValueError, **kwargs):
    with pytest.raises(error, match=match):
        travel_loss(*args, **kwargs)


def test_rejects_fewer_than_two_embeddings():
    _raises(r"emb_src: expected at least 2 embeddings .* got N = 1", torch.ones(1, 3), torch.ones(1, 3))


def test_rejects_mismatched_shapes():
    _raises(r"emb_src, emb_gen: expected the same shape .* \(4, 3\) and \(4, 5\)", torch.ones(4, 3), torch.ones(4, 5))
    _raises(r"\(4, 3\) and \(5, 3\)", torch.ones(4, 3), torch.ones(5, 3))


@pytest.mark.parametrize("shape", [(), (5,)])
def test_rejects_0d_and_1d_tensors(shape):
    _raises(rf"emb_gen: expected an \(N, D\) tensor .* {len(shape)}-D", torch.ones(4, 3), torch.ones(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_rejects_integer_and_bool_dtypes(dtype):
    _raises(
        rf"emb_src: expected a floating-point tensor, got dtype {dtype}",
        torch.ones(4, 3, dtype=dtype),
        torch.ones(4, 3),
    )


def test_rejects_different_devices():
    _raises(r"expected tensors on one device, got cpu and meta", torch.ones(4, 3), torch.ones(4, 3, device="meta"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_values_unless_told_not_to_check(bad):
    src, gen = random_pair(4, 3)
    gen[2, 1] = bad
    _raises(r"emb_gen: expected finite values, got 1 NaN or infinite entries of 12", src, gen)
    assert not torch.isfinite(travel_loss(src, gen, check_finite=False))


def test_rejects_unknown_options_and_non_tensors():
    src, gen = random_pair(4, 3)
    _raises(r"distance: expected one of 'cosine', 'squared_euclidean', 'travelgan', got 'l1'", src, gen, distance="l1")
    _raises(r"reduction: expected one of 'mean', 'sum', 'none', got 'max'", src, gen, reduction="max")
    _raises(r"emb_src: expected a torch.Tensor, got ndarray", src.numpy(), gen, error=TypeError)
    _raises(r"equally long, non-empty sequences .* lengths 2 and 1", [src, src], [gen])
    with pytest.raises(ValueError, match=r"margin: expected a non-negative number, got -1"):
        siamese_margin_loss(src, margin=-1)
    with pytest.raises(ValueError, match=r"reduction: expected one of"):
        TravelLoss(reduction="avg")
