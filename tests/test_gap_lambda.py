"""travel_loss.lambdas.DiscriminatorGapLambda and discriminator_gap: the trainer's default lambda rule."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from travel_loss import DiscriminatorGapLambda, discriminator_gap
from travel_loss.lambdas import AdaptiveLambda, GradientBalancedLambda

logit_maps = st.integers(1, 6).flatmap(
    lambda n: st.lists(st.floats(-20, 20, allow_nan=False), min_size=n, max_size=n).map(torch.tensor)
)


def _independent_gap(real: list[float], fake: list[float], kind: str) -> float:
    def belief(value: float) -> float:
        if kind == "bce":
            return 1 / (1 + math.exp(-value))
        if kind == "lsgan":
            return min(max(value, 0.0), 1.0)
        return (min(max(value, -1.0), 1.0) + 1) / 2

    return sum(map(belief, real)) / len(real) - sum(map(belief, fake)) / len(fake)


@settings(max_examples=60, deadline=None)
@given(real=logit_maps, fake=logit_maps, kind=st.sampled_from(["bce", "lsgan", "hinge"]))
def test_gap_agrees_with_a_plain_loop_and_lies_in_minus_one_one(real, fake, kind):
    gap = discriminator_gap(real, fake, kind)
    assert gap.shape == () and -1 <= float(gap) <= 1
    assert float(gap) == pytest.approx(_independent_gap(real.tolist(), fake.tolist(), kind), abs=1e-6)
    assert float(discriminator_gap(real, real, kind)) == 0.0  # D that cannot tell them apart


def test_gap_reaches_one_for_a_certain_discriminator_and_ignores_shapes():
    real, fake = torch.full((2, 1, 3, 3), 50.0), torch.full((2, 1, 3, 3), -50.0)
    assert float(discriminator_gap(real, fake, "bce")) == pytest.approx(1.0)
    assert float(discriminator_gap(real.flatten(), fake.flatten()[:4], "bce")) == pytest.approx(1.0)
    assert float(discriminator_gap(torch.ones(3), torch.zeros(5), "lsgan")) == 1.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.ones(2), torch.ones(2), "wasserstein"), "gan_loss: expected one of bce, lsgan, hinge"),
        ((torch.ones(0), torch.ones(2)), "real_logits: expected a non-empty floating-point tensor"),
        ((torch.ones(2), torch.ones(2, dtype=torch.long)), "fake_logits: expected a non-empty floating-point"),
    ],
)
def test_gap_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        discriminator_gap(*args)


@settings(max_examples=50, deadline=None)
@given(
    gaps=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=30),
    target=st.floats(0.05, 0.95),
    rate=st.floats(0.001, 0.5),
    warmup=st.integers(0, 10),
)
def test_log_lambda_integrates_the_gap_error_after_the_warmup(gaps, target, rate, warmup):
    rule = DiscriminatorGapLambda(target_gap=target, initial=3.0, rate=rate, warmup=warmup, min_value=1e-30,
                                  max_value=1e30)  # fmt: skip
    for gap in gaps:
        rule.observe(torch.tensor(gap, dtype=torch.float64))
    counted = gaps[warmup:]
    expected = math.log(3.0) + rate * sum(target - g for g in counted)
    assert math.log(rule.value) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert rule.last_gap == pytest.approx(gaps[-1])


def test_direction_clipping_and_the_value_seen_by_the_generator_step():
    rule = DiscriminatorGapLambda(target_gap=0.5, initial=4.0, rate=1.0, min_value=1.0, max_value=8.0)
    assert rule.update(torch.tensor(1.0), torch.tensor(2.0)) == 4.0 == rule.update_from_norms(None, None)
    assert rule.observe(0.9) < 4.0  # translations easy to spot: less travel
    assert rule.observe(0.1) == pytest.approx(4.0)  # errors of -0.4 and +0.4 cancel
    for _ in range(50):
        rule.observe(1.0)
    assert rule.value == pytest.approx(1.0)  # clipped at min_value
    for _ in range(50):
        rule.observe(0.0)
    assert rule.value == pytest.approx(8.0)  # clipped at max_value
    assert not rule.computes_next and isinstance(rule, AdaptiveLambda)
    assert isinstance(GradientBalancedLambda(torch.zeros(1, requires_grad=True)), AdaptiveLambda)


def test_state_dict_round_trip_continues_identically_and_refuses_other_settings():
    first = DiscriminatorGapLambda(rate=0.2, warmup=2)
    for gap in (0.9, 0.8, 0.7, 0.1):
        first.observe(gap)
    second = DiscriminatorGapLambda(rate=0.2, warmup=2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain python types
    for gap in (0.3, 0.6):
        assert first.observe(gap) == second.observe(gap)
    with pytest.raises(ValueError, match="rate = 0.2 was saved"):
        DiscriminatorGapLambda(rate=0.1, warmup=2).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="state: expected a dict with keys"):
        second.load_state_dict({"value": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_gap=1.0), r"target_gap: expected a number in \(0, 1\)"),
        (dict(target_gap=float("nan")), "target_gap: expected a finite number"),
        (dict(rate=0.0), "rate: expected a positive number"),
        (dict(warmup=-1), "warmup: expected an int >= 0"),
        (dict(initial=0.0), "min_value, initial, max_value: expected 0 < min_value <= initial <= max_value"),
        (dict(initial=10.0, max_value=5.0), "min_value, initial, max_value"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiscriminatorGapLambda(**kwargs)


def test_bad_gaps_raise_and_a_diverged_gap_leaves_lambda_alone():
    rule = DiscriminatorGapLambda()
    with pytest.raises(ValueError, match="gap: expected a scalar"):
        rule.observe(torch.ones(2))
    with pytest.raises(ValueError, match="gap: expected a finite number"):
        rule.observe(float("inf"))
    assert rule.observe(torch.tensor(float("nan"))) == 3.0 and rule.state_dict()["count"] == 0
    assert math.isnan(rule.last_gap)  # the trainer's divergence check reports the NaN, not this rule
    assert rule.observe(0.0) > 3.0


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rule = DiscriminatorGapLambda(target_gap=0.5, initial=1.0, rate=1.0)
        rule.observe(
            torch.tensor(0.2 + 0.4 * rank, dtype=torch.float64)
        )  # 0.2 and 0.6: both ranks must use their mean, 0.4
        torch.save({"value": rule.value, "state": rule.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_of_a_process_group_agree_on_lambda(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0]["value"] == pytest.approx(math.exp(0.1), rel=1e-9)
    assert results[0] == results[1]


def test_the_trainer_default_follows_the_discriminator_and_resumes_exactly(tmp_path, tiny_folders):
    """``--lambda-travel auto``: lambda holds for a fifth of the steps, then moves with D's logged gap;
    a run stopped and resumed logs the same lambdas as one run straight through."""
    from reference.train import TrainConfig, train

    base = dict(
        data=str(tiny_folders), size=16, batch_size=4, g_width=4, g_blocks=1, d_width=4, d_layers=1,
        encoder_mode="module", encoder="reference.studies.digit_data:random_embedder", lambda_travel="auto",
        log_every=1, sample_every=1000, checkpoint_every=5, keep_checkpoints=2, num_workers=0,
    )  # fmt: skip
    train(TrainConfig(**base, steps=10, out=str(tmp_path / "whole")), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    lambdas, gaps = [row["lambda"] for row in rows], [row["d_gap"] for row in rows]
    assert lambdas[:3] == [3.0] * 3  # warmup = steps // 5 = 2 observations, used from the next step on
    for before, after, gap in zip(lambdas[2:], lambdas[3:], gaps[2:]):
        assert math.log(after / before) == pytest.approx(0.05 * (0.5 - gap), rel=1e-4, abs=1e-7)
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "whole" / "step_000005.pt", tmp_path / "resumed" / "latest.pt")
    train(TrainConfig(**base, steps=10, out=str(tmp_path / "resumed"), resume=True), progress=False)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lambda"] for row in resumed] == lambdas[5:]
    whole, again = (torch.load(tmp_path / run / "latest.pt", weights_only=False) for run in ("whole", "resumed"))
    assert whole["adaptive_lambda"] == again["adaptive_lambda"]
    for name, tensor in whole["generator"].items():
        assert torch.equal(tensor, again["generator"][name]), name


def test_the_trainer_warns_once_when_lambda_gives_way(capsys):
    from reference.train import warn_if_lambda_gave_way

    rule = DiscriminatorGapLambda(initial=3.0, rate=1.0)
    assert not warn_if_lambda_gave_way(rule, 10) and not warn_if_lambda_gave_way(GradientBalancedLambda(
        torch.zeros(1, requires_grad=True)), 10)  # fmt: skip
    rule.observe(1.0)  # 3 * e^-0.5 = 1.82: still above a third of the start
    assert not warn_if_lambda_gave_way(rule, 20) and capsys.readouterr().out == ""
    rule.observe(1.0)  # 1.10
    rule.observe(1.0)  # 0.67 < 1
    assert warn_if_lambda_gave_way(rule, 30)
    out = capsys.readouterr().out
    assert "step 30: --lambda-travel auto fell to 0.669" in out and "fixed --lambda-travel" in out
