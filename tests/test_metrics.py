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

from travel_loss import travel_loss
from travel_loss.metrics import TravelConsistency


def embeddings(n: int, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(n, dim, generator=generator)
    return src, src + 0.5 * torch.randn(n, dim, generator=generator)


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_any_split_into_updates_equals_one_travel_loss_over_the_set(cuts, seed):
    n = sum(cuts)
    if n < 2:
        cuts, n = [*cuts, 1], n + 1
    src, gen = embeddings(n, seed=seed)
    metric = TravelConsistency()
    start = 0
    for cut in cuts:
        metric.update(src[start : start + cut], gen[start : start + cut])
        start += cut
    assert len(metric) == n
    expected = 1 - travel_loss(src, gen, distance="cosine", reduction="mean")
    torch.testing.assert_close(metric.compute(), expected)
    assert -1 <= float(metric.compute()) <= 1


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
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_under_a_process_group_every_rank_gets_the_metric_of_all_rows(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    src, gen = embeddings(sum(ROWS), seed=7)
    expected = 1 - travel_loss(src, gen, distance="cosine", reduction="mean")
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)
