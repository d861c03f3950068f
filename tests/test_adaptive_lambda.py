"""GradientBalancedLambda: the balance it promises, its moving average, checkpoints, errors."""

from __future__ import annotations

import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reference.models import ResnetGenerator
from travel_loss import travel_loss
from travel_loss.lambdas import GradientBalancedLambda, last_layer_weight


def _losses(seed: int, adversarial_weight: float = 1.0):
    """A tiny generator, an adversarial-like and a travel loss on its output; returns (layer weight, adv, travel)."""
    torch.manual_seed(seed)
    generator = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    fake = generator(x)
    adversarial = adversarial_weight * nn.functional.softplus(-fake.mean(dim=(1, 2, 3)) * 3).mean()
    embed = torch.randn(3 * 8 * 8, 5)
    travel = travel_loss(x.flatten(1) @ embed, fake.flatten(1) @ embed)
    return last_layer_weight(generator), adversarial, travel


def _gradient_norm(loss: torch.Tensor, parameter: torch.Tensor) -> float:
    (gradient,) = torch.autograd.grad(loss, parameter, retain_graph=True)
    return float(gradient.norm())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), adversarial_weight=st.floats(0.01, 100.0))
def test_without_smoothing_weighted_travel_gradient_matches_scaled_adversarial_gradient(
    seed, scale, adversarial_weight
):
    weight, adversarial, travel = _losses(seed, adversarial_weight)
    balance = GradientBalancedLambda(weight, momentum=0.0, scale=scale)
    lam = balance.update(adversarial, travel)
    assert isinstance(lam, float)
    assert _gradient_norm(lam * travel, weight) == pytest.approx(scale * _gradient_norm(adversarial, weight), rel=1e-5)


def test_update_keeps_the_graphs_for_the_generator_backward():
    weight, adversarial, travel = _losses(0)
    lam = GradientBalancedLambda(weight).update(adversarial, travel)
    (adversarial + lam * travel).backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_moving_average_is_bias_corrected_ema_of_raw_ratios():
    weight, _, travel = _losses(0)
    momentum = 0.8
    balance = GradientBalancedLambda(weight, momentum=momentum)
    raw_ratios, values = [], []
    for factor in (1.0, 3.0, 0.5, 2.0):
        # adversarial = factor * travel: the raw ratio is exactly `factor`
        lam = balance.update(factor * travel, travel)
        raw_ratios.append(balance.last_ratio)
        values.append(lam)
    assert raw_ratios == pytest.approx([1.0, 3.0, 0.5, 2.0], rel=1e-6)
    # straightforward EMA with bias correction, written out
    average, expected = 0.0, []
    for t, ratio in enumerate(raw_ratios, start=1):
        average = momentum * average + (1 - momentum) * ratio
        expected.append(average / (1 - momentum**t))
    assert values == pytest.approx(expected, rel=1e-12)
    assert values[0] == pytest.approx(raw_ratios[0])  # bias correction: first value is the first ratio


def test_clipping_bounds_every_value():
    weight, _, travel = _losses(2)
    balance = GradientBalancedLambda(weight, momentum=0.5, min_value=0.5, max_value=2.0)
    values = [balance.update(factor * travel, travel) for factor in (100.0, 0.001, 1.0)]
    assert values[0] == pytest.approx(2.0)
    assert all(0.5 <= v <= 2.0 for v in values)


def test_every_k_recomputes_only_on_every_kth_call():
    weight, _, travel = _losses(3)
    balance = GradientBalancedLambda(weight, momentum=0.0, every=3)
    values = [balance.update(factor * travel, travel) for factor in (1.0, 5.0, 5.0, 2.0, 7.0)]
    assert values == pytest.approx([1.0, 1.0, 1.0, 2.0, 2.0])


def test_state_dict_round_trip_continues_identically():
    weight, _, travel = _losses(4)
    first = GradientBalancedLambda(weight, momentum=0.7, every=2)
    for factor in (1.0, 2.0, 3.0):
        first.update(factor * travel, travel)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    second = GradientBalancedLambda(weight, momentum=0.7, every=2)
    second.load_state_dict(state)
    assert second.value == first.value
    for factor in (4.0, 0.5, 6.0):
        assert second.update(factor * travel, travel) == first.update(factor * travel, travel)
    assert all(isinstance(v, (int, float, type(None))) for v in first.state_dict().values())


def test_load_state_dict_refuses_other_settings_and_bad_keys():
    weight, _, travel = _losses(5)
    saved = GradientBalancedLambda(weight, momentum=0.7)
    saved.update(travel, travel)
    with pytest.raises(ValueError, match="momentum"):
        GradientBalancedLambda(weight, momentum=0.9).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="keys"):
        GradientBalancedLambda(weight, momentum=0.7).load_state_dict({"average": 1.0})


def test_value_is_none_before_the_first_update():
    weight, _, _ = _losses(6)
    assert GradientBalancedLambda(weight).value is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"scale": 0.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"min_value": -1.0}, "min_value"),
        ({"min_value": 2.0, "max_value": 1.0}, "max_value"),
        ({"eps": 0.0}, "eps"),
        ({"every": 0}, "every"),
        ({"every": 1.5}, "every"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, match):
    weight, _, _ = _losses(7)
    with pytest.raises(ValueError, match=match):
        GradientBalancedLambda(weight, **kwargs)


def test_bad_parameter_and_losses_raise():
    with pytest.raises(TypeError, match="parameter"):
        GradientBalancedLambda([1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="requires grad"):
        GradientBalancedLambda(torch.zeros(3))
    weight, adversarial, travel = _losses(8)
    balance = GradientBalancedLambda(weight)
    with pytest.raises(ValueError, match="adv_loss: expected a scalar"):
        balance.update(torch.zeros(2, requires_grad=True), travel)
    with pytest.raises(ValueError, match="travel_loss: expected a loss with a graph"):
        balance.update(adversarial, travel.detach())
    unrelated = (torch.zeros(3, requires_grad=True) ** 2).sum()
    with pytest.raises(ValueError, match="travel_loss: does not depend on parameter"):
        balance.update(adversarial, unrelated)
    with pytest.raises(ValueError, match="non-finite"):
        balance.update(adversarial * float("nan"), travel)
    assert balance.value is None  # failed updates change nothing


def test_last_layer_weight_of_the_resnet_generator_is_its_output_convolution():
    generator = ResnetGenerator(width=8, n_blocks=1)
    weight = last_layer_weight(generator)
    assert weight.shape == (3, 8, 7, 7)
    with pytest.raises(ValueError, match="module"):
        last_layer_weight(nn.ReLU())
    assert weight is generator.net[-2].weight


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        weight, _, travel = _losses(rank)
        balance = GradientBalancedLambda(weight, momentum=0.0)
        # raw ratios 1 on rank 0 and 3 on rank 1: both must use their mean, 2
        value = balance.update((1 + 2 * rank) * travel, travel)
        torch.save({"value": value, "state": balance.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_of_a_process_group_agree_on_lambda(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0]["value"] == pytest.approx(2.0, rel=1e-6)
    assert results[0] == results[1]


def test_a_travel_term_without_gradient_does_not_move_lambda():
    """A TravelQueue's first step at batch 1 has no pair: its zero gradient says nothing about the balance."""
    weight = torch.zeros(3, requires_grad=True)
    balance = GradientBalancedLambda(weight, momentum=0.5)
    assert balance.update_from_norms(torch.tensor(2.0), torch.tensor(0.0)) == 0.0 and balance.value is None
    assert balance.update_from_norms(torch.tensor(2.0), torch.tensor(4.0)) == pytest.approx(0.5, rel=1e-6)
    assert balance.update_from_norms(torch.tensor(2.0), torch.tensor(0.0)) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        balance.update_from_norms(torch.tensor(2.0), torch.tensor(float("nan")))


def test_auto_lambda_stays_finite_with_a_queue_at_batch_one(tmp_path, tiny_folders):
    from reference.train import TrainConfig, train

    config = TrainConfig(
        data=str(tiny_folders), size=16, batch_size=1, travel_queue=4, steps=6, g_width=4, g_blocks=1, d_width=4,
        d_layers=1, encoder_mode="module", encoder="reference.studies.digit_data:random_embedder",
        lambda_travel="balance", out=str(tmp_path / "run"), log_every=1, sample_every=1000, num_workers=0,
    )  # fmt: skip
    train(config, progress=False)
    lambdas = [json.loads(line)["lambda"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lambdas[0] == 0.0 and all(0 < value < 1e4 for value in lambdas[1:]), lambdas
