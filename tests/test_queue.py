"""TravelQueue: the travel loss at batch 1 with partners from earlier batches.

The independent reference is a per-pair loop with torch's cosine_similarity over i in the current
batch and j in the current batch or the queue.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from travel_loss import TravelQueue, travel_loss
from travel_loss.testing import embedding_pairs


def per_pair_reference(src, gen, queue_src, queue_gen):
    """Mean over i current, j in current + queue, j != i, of 1 - cos(s_i - s_j, g_i - g_j)."""
    all_src, all_gen = torch.cat([src, queue_src]).double(), torch.cat([gen, queue_gen]).double()
    terms = []
    for i in range(src.shape[0]):
        for j in range(all_src.shape[0]):
            if i != j:
                v, z = all_src[i] - all_src[j], all_gen[i] - all_gen[j]
                terms.append(1 - F.cosine_similarity(v, z, dim=0))
    return torch.stack(terms).mean()


def random_batches(sizes, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, dim, generator=generator), torch.randn(n, dim, generator=generator)) for n in sizes]


@settings(max_examples=40, deadline=None)
@given(
    pair=embedding_pairs(min_n=2, max_n=8, max_dim=8, dtype=torch.float64),
    distance=st.sampled_from(["cosine", "squared_euclidean", "travelgan"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_size_zero_equals_travel_loss_exactly(pair, distance, reduction):
    src, gen = pair
    queue = TravelQueue(0, distance=distance, reduction=reduction)
    for _ in range(2):  # a second call too: nothing is kept
        got = queue(src, gen)
        expected = travel_loss(src, gen, distance=distance, reduction=reduction)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert len(queue) == 0


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    size=st.integers(0, 6),
    dim=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_agrees_with_a_per_pair_loop_over_current_and_queued_rows(sizes, size, dim, seed):
    queue = TravelQueue(size)
    history_src, history_gen = torch.zeros(0, dim), torch.zeros(0, dim)
    for src, gen in random_batches(sizes, dim, seed):
        first = max(0, len(history_src) - size)
        queue_src, queue_gen = history_src[first:], history_gen[first:]
        if src.shape[0] == 1 and size == 0:  # never a pair: refused rather than a silent 0 on every step
            with pytest.raises(ValueError, match="a batch of 1 has no pair"):
                queue(src, gen)
            continue
        got = queue(src, gen)
        if src.shape[0] == 1 and queue_src.shape[0] == 0:
            assert got.item() == 0.0 and str(got.item()) == "0.0"
        else:
            torch.testing.assert_close(got.double(), per_pair_reference(src, gen, queue_src, queue_gen))
        history_src, history_gen = torch.cat([history_src, src]), torch.cat([history_gen, gen])
        kept = min(size, len(history_src))
        assert len(queue) == kept
        if kept:
            torch.testing.assert_close(queue.queued[0], history_src[len(history_src) - kept :])
            torch.testing.assert_close(queue.queued[1], history_gen[len(history_gen) - kept :])


def test_first_call_at_batch_one_is_a_zero_in_the_graph():
    queue = TravelQueue(4)
    weight = torch.randn(3, 5, requires_grad=True)
    src = torch.randn(1, 3)
    gen = src @ weight
    loss = queue(src @ torch.randn(3, 5), gen)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
    loss.backward()
    assert weight.grad is not None and torch.all(weight.grad == 0)
    assert len(queue) == 1 and not queue.queued[1].requires_grad


def test_gradient_flows_through_current_rows_only():
    (old_src, old_gen), (src, gen) = random_batches([3, 2], 4)
    old_gen.requires_grad_(True)
    gen.requires_grad_(True)
    queue = TravelQueue(8)
    queue(old_src, old_gen)
    loss = queue(src, gen)
    (grad,) = torch.autograd.grad(loss, gen)
    constant_queue = per_pair_reference(src, gen, old_src, old_gen.detach())
    (expected,) = torch.autograd.grad(constant_queue, gen)
    torch.testing.assert_close(grad, expected.float())
    assert old_gen.grad is None and not queue.queued[1].requires_grad


def test_state_dict_round_trip_resumes_exactly():
    batches = random_batches([1, 2, 1, 3, 1], 5)
    queue = TravelQueue(3)
    for src, gen in batches[:3]:
        queue(src, gen)
    state = queue.state_dict()
    resumed = TravelQueue(3)
    resumed.load_state_dict(state)
    for src, gen in batches[3:]:
        assert torch.equal(queue(src, gen), resumed(src, gen))
    with pytest.raises(ValueError, match="saved by a TravelQueue of size 3, loaded into one of size 4"):
        TravelQueue(4).load_state_dict(state)
    fresh = TravelQueue(3)
    fresh.load_state_dict(TravelQueue(3).state_dict())
    assert len(fresh) == 0


def test_dtype_moves_keep_the_queue_in_float32_and_low_precision_inputs_work():
    queue = TravelQueue(2)
    queue(torch.randn(2, 3).bfloat16(), torch.randn(2, 3).bfloat16())
    queue.half().to("cpu")
    assert queue.queued[0].dtype == torch.float32
    assert queue(torch.randn(1, 3), torch.randn(1, 3)).dtype == torch.float32


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: TravelQueue(-1), ValueError, "size: expected an int >= 0"),
        (lambda: TravelQueue(2.0), ValueError, "size: expected an int >= 0"),
        (lambda: TravelQueue(2, distance="l1"), ValueError, "distance: expected one of"),
        (lambda: TravelQueue(2)(torch.ones(3), torch.ones(3)), ValueError, r"emb_src: expected an \(n, D\)"),
        (lambda: TravelQueue(2)(torch.ones(2, 3), torch.ones(3, 3)), ValueError, "expected the same shape"),
        (lambda: TravelQueue(2)([1.0], torch.ones(1, 3)), TypeError, "emb_src: expected a torch.Tensor"),
        (lambda: TravelQueue(2)(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3)), ValueError, "floating"),
        (lambda: TravelQueue(2)(torch.ones(2, 3), torch.full((2, 3), float("nan"))), ValueError, "emb_gen: .*finite"),
        (lambda: TravelQueue(0)(torch.ones(1, 3), torch.ones(1, 3)), ValueError, "emb_src: a batch of 1 has no pair"),
    ],
)
def test_bad_input_is_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_changing_embedding_size_is_refused():
    queue = TravelQueue(2)
    queue(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected embeddings of size D = 3 like the queued ones, got D = 4"):
        queue(torch.randn(1, 4), torch.randn(1, 4))
    queue.reset()
    assert queue(torch.randn(1, 4), torch.randn(1, 4)).item() == 0.0


def test_travel_loss_error_at_batch_one_names_the_batch_size_and_the_queue():
    with pytest.raises(ValueError, match=r"got N = 1: a batch size of 1 has no pairs.*TravelQueue"):
        travel_loss(torch.ones(1, 3), torch.ones(1, 3))
