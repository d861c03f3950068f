"""travel_loss.metrics.TravelConsistency: batch-wise accumulation equals one travel loss over the set,
in one process and over a 2-process gloo group with uneven shares."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from travel_loss import flip_scores, travel_loss
from travel_loss.audit import METHODS
from travel_loss.metrics import TravelConsistency


def embeddings(n: int, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(n, dim, generator=generator)
    return src, src + 0.5 * torch.randn(n, dim, generator=generator)


def accumulated(src: torch.Tensor, gen: torch.Tensor, cuts: list[int]) -> TravelConsistency:
    """A TravelConsistency updated with consecutive slices of ``cuts`` rows."""
    metric = TravelConsistency()
    start = 0
    for cut in cuts:
        metric.update(src[start : start + cut], gen[start : start + cut])
        start += cut
    return metric


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_any_split_into_updates_equals_one_travel_loss_over_the_set(cuts, seed):
    n = sum(cuts)
    if n < 2:
        cuts, n = [*cuts, 1], n + 1
    src, gen = embeddings(n, seed=seed)
    metric = accumulated(src, gen, cuts)
    assert len(metric) == n
    expected = 1 - travel_loss(src, gen, distance="cosine", reduction="mean")
    torch.testing.assert_close(metric.compute(), expected)
    assert -1 <= float(metric.compute()) <= 1


@settings(max_examples=20, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 5), min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(METHODS),
)
def test_flip_scores_over_updates_equal_one_call_over_the_set_in_input_order(cuts, seed, method):
    n = sum(cuts)
    src, gen = embeddings(n, seed=seed)
    metric = accumulated(src, gen, cuts)
    scores = metric.flip_scores(method=method, neighbours=3, chunk_size=4)
    torch.testing.assert_close(scores, flip_scores(src, gen, method=method, neighbours=3))


def test_flip_scores_of_an_ensemble_are_the_mean_and_an_empty_metric_refuses():
    (a_src, a_gen), (b_src, b_gen) = embeddings(6, 4, seed=1), embeddings(6, 3, seed=2)
    metric = TravelConsistency()
    with pytest.raises(ValueError, match="flip_scores: no rows yet"):
        metric.flip_scores()
    metric.update((a_src, b_src), (a_gen, b_gen))
    expected = (flip_scores(a_src, a_gen) + flip_scores(b_src, b_gen)) / 2
    torch.testing.assert_close(metric.flip_scores(), expected)
    with pytest.raises(ValueError, match="method: expected one of"):
        metric.flip_scores(method="mean")  # type: ignore[arg-type]


def test_identical_transformation_vectors_score_one_and_reset_forgets():
    src, _ = embeddings(5)
    metric = TravelConsistency()
    metric.update(src, 2 * src + 3)  # scaled and shifted: every vector keeps its direction
    torch.testing.assert_close(metric.compute(), torch.tensor(1.0))
    metric.reset()
    assert len(metric) == 0
    with pytest.raises(ValueError, match="compute: no rows yet"):
        metric.compute()


def test_sequences_give_the_mean_over_encoders():
    (a_src, a_gen), (b_src, b_gen) = embeddings(6, 4, seed=1), embeddings(6, 3, seed=2)
    metric = TravelConsistency()
    metric.update((a_src[:2], b_src[:2]), (a_gen[:2], b_gen[:2]))
    metric.update((a_src[2:], b_src[2:]), (a_gen[2:], b_gen[2:]))
    expected = 1 - travel_loss((a_src, b_src), (a_gen, b_gen), distance="cosine", reduction="mean")
    torch.testing.assert_close(metric.compute(), expected)


def test_bad_updates_are_refused():
    metric = TravelConsistency()
    with pytest.raises(ValueError, match="expected the same shape"):
        metric.update(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(TypeError, match="two tensors or two sequences"):
        metric.update(torch.ones(2, 3), [torch.ones(2, 3)])
    metric.update(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected D = 3 as in earlier updates, got 4"):
        metric.update(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="compute: expected at least 2 rows in total"):
        metric.compute()


ROWS = (3, 5)  # uneven shares of the two ranks


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        src, gen = embeddings(sum(ROWS), seed=7)
        start = sum(ROWS[:rank])
        metric = TravelConsistency()
        for row in range(start, start + ROWS[rank]):  # one row per update
            metric.update(src[row : row + 1], gen[row : row + 1])
        torch.save(metric.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
        torch.save(metric.flip_scores(neighbours=3), os.path.join(out_dir, f"scores{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_under_a_process_group_every_rank_gets_the_metric_and_the_flip_scores_of_all_rows(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    src, gen = embeddings(sum(ROWS), seed=7)
    expected = 1 - travel_loss(src, gen, distance="cosine", reduction="mean")
    expected_scores = flip_scores(src, gen, neighbours=3)  # rows in rank order, each rank's in update order
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)
        torch.testing.assert_close(torch.load(tmp_path / f"scores{rank}.pt"), expected_scores)
