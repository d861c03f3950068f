"""travel_loss.audit.flip_scores: agreement with straightforward implementations, the invariances
each method claims, a swap of two translations found, permutation equivariance, chunking, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from travel_loss import flip_scores, travel_loss
from travel_loss.audit import METHODS

sizes = st.integers(3, 24)
dims = st.integers(2, 9)
seeds = st.integers(0, 2**16)
methods = st.sampled_from(METHODS)


def points(n: int, dim: int, seed: int) -> torch.Tensor:
    """n points in general position (Gaussian, float64): no ties among distances, almost surely."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(points(dim, dim, seed + 1))
    return q


def _local_by_loops(src: torch.Tensor, gen: torch.Tensor, k: int) -> torch.Tensor:
    n = src.shape[0]
    scores = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        by_src = sorted(others, key=lambda j: float((src[i] - src[j]).norm()))[:k]
        by_gen = sorted(others, key=lambda j: float((gen[i] - gen[j]).norm()))[:k]
        pairs = set(by_src) | set(by_gen)
        cosines = [torch.nn.functional.cosine_similarity(src[i] - src[j], gen[i] - gen[j], dim=0) for j in pairs]
        scores.append(float(np.mean([1 - float(c) for c in cosines])))
    return torch.tensor(scores, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(n=sizes, dim=dims, seed=seeds, chunk=st.integers(1, 30), k=st.integers(1, 8))
def test_each_method_agrees_with_a_straightforward_implementation(n, dim, seed, chunk, k):
    src, gen = points(n, dim, seed), points(n, dim, seed + 7)
    row_mean = travel_loss(src, gen, reduction="none").sum(1) / (n - 1)
    torch.testing.assert_close(flip_scores(src, gen, method="row_mean", chunk_size=chunk), row_mean)
    torch.testing.assert_close(
        flip_scores(src, gen, method="local", neighbours=k, chunk_size=chunk),
        _local_by_loops(src, gen, min(k, n - 1)),
    )


@settings(max_examples=25, deadline=None)
@given(n=sizes, dim=dims, seed=seeds, method=methods, scale=st.floats(0.01, 100), offset=st.floats(-100, 100))
def test_translations_equal_to_their_sources_up_to_a_common_similarity_score_zero(n, dim, seed, method, scale, offset):
    src = points(n, dim, seed)
    rotation = random_rotation(dim, seed)
    zeros = torch.zeros(n, dtype=torch.float64)
    torch.testing.assert_close(flip_scores(src, src, method=method), zeros, atol=1e-9, rtol=0)
    # the same orthogonal map for both sets, each set with its own offset and positive scale
    rotated = src @ rotation
    scores = flip_scores(rotated + offset, scale * rotated - offset, method=method)
    torch.testing.assert_close(scores, zeros, atol=1e-7, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n=sizes, dim=dims, seed=seeds, method=methods)
def test_scores_do_not_change_under_a_similarity_of_the_embedding_space(n, dim, seed, method):
    src, gen = points(n, dim, seed), points(n, dim, seed + 3)
    rotation = random_rotation(dim, seed)
    expected = flip_scores(src, gen, method=method)
    moved = flip_scores(3.0 * src @ rotation - 5.0, 0.2 * gen @ rotation + 2.0, method=method)
    torch.testing.assert_close(moved, expected, atol=1e-9, rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 24), dim=dims, seed=seeds, method=methods, data=st.data())
def test_swapping_two_translations_gives_exactly_those_two_the_highest_scores(n, dim, seed, method, data):
    src = points(n, dim, seed)
    first, second = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
    gen = src.clone()
    gen[[first, second]] = src[[second, first]]
    scores = flip_scores(src, gen, method=method, neighbours=min(10, n - 1))
    highest = set(scores.topk(2).indices.tolist())
    assert highest == {first, second}
    others = torch.ones(n, dtype=torch.bool)
    others[[first, second]] = False
    assert scores[[first, second]].min() > scores[others].max()


@settings(max_examples=25, deadline=None)
@given(n=sizes, dim=dims, seed=seeds, method=methods, chunk=st.integers(1, 30))
def test_scores_are_permutation_equivariant_and_independent_of_the_chunk_size(n, dim, seed, method, chunk):
    src, gen = points(n, dim, seed), points(n, dim, seed + 5)
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scores = flip_scores(src, gen, method=method)
    permuted = flip_scores(src[permutation], gen[permutation], method=method, chunk_size=chunk)
    torch.testing.assert_close(permuted, scores[permutation])


def test_scores_with_tied_distances_are_permutation_equivariant():
    grid = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    gen = grid.flip(1) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    for method in METHODS:
        scores = flip_scores(grid, gen, method=method)
        torch.testing.assert_close(flip_scores(grid[permutation], gen[permutation], method=method), scores[permutation])


def test_sequences_give_the_mean_over_encoders_and_dtypes_follow_the_loss():
    a_src, a_gen = points(7, 3, 0), points(7, 3, 1)
    b_src, b_gen = points(7, 5, 2), points(7, 5, 3)
    expected = (flip_scores(a_src, a_gen) + flip_scores(b_src, b_gen)) / 2
    torch.testing.assert_close(flip_scores([a_src, b_src], (a_gen, b_gen)), expected)
    assert flip_scores(a_src.float(), a_gen.half()).dtype == torch.float32
    assert flip_scores(a_src, a_gen).dtype == torch.float64
    assert flip_scores(a_src.view(7, 3, 1), a_gen.view(7, 3, 1)).shape == (7,)


BAD_EMBEDDINGS = [
    (torch.ones(1, 3), torch.ones(1, 3)),  # N < 2
    (torch.ones(3), torch.ones(3)),  # 1-D
    (torch.ones(3, 2), torch.ones(4, 2)),  # shapes differ
    (torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64)),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.ones(2, 2)),
    ([1.0, 2.0], torch.ones(2, 2)),
    ([torch.ones(2, 2)], [torch.ones(2, 2), torch.ones(2, 2)]),
]


@pytest.mark.parametrize(("emb_src", "emb_gen"), BAD_EMBEDDINGS)
def test_bad_embeddings_are_refused_as_the_loss_refuses_them(emb_src, emb_gen):
    with pytest.raises((TypeError, ValueError)) as expected:
        travel_loss(emb_src, emb_gen)
    with pytest.raises(expected.type) as got:
        flip_scores(emb_src, emb_gen)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "median"}, "method: expected one of 'row_mean', 'local', got 'median'"),
        ({"neighbours": 0}, "neighbours: expected an int >= 1, got 0"),
        ({"chunk_size": 2.5}, "chunk_size: expected an int >= 1, got 2.5"),
        ({"neighbours": True}, "neighbours: expected an int >= 1, got True"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        flip_scores(torch.randn(4, 2), torch.randn(4, 2), **options)
