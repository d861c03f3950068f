"""The trainer's baselines: CycleGAN's cycle-consistency objective (--lambda-cycle) and the EMA of G (--g-ema)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from reference import train as train_module
from reference.checkpoint import load_checkpoint, step_checkpoints
from reference.config import TrainConfig, check_config
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.steps import ReverseDirection, StepOptions, discriminator_step, generator_step, update_ema
from reference.train import build_parser, train
from reference.translate import load_generator

pytestmark = pytest.mark.usefixtures("one_thread")


RANDOM_EMBEDDER = "reference.studies.digit_data:random_embedder"  # a frozen random conv net, no weights to load


def tiny_config(out: Path, data: Path | str | None = "unused", **overrides) -> TrainConfig:
    """32 px images of ``data`` (the ``tiny_folders`` fixture; a placeholder where only the config is
    checked), a frozen random conv embedder, an 8-wide generator with one block, a two-layer PatchGAN."""
    options = dict(
        data=None if data is None else str(data), size=32, batch_size=4, steps=2, encoder=RANDOM_EMBEDDER,
        encoder_mode="module", g_width=8, g_blocks=1, d_width=8, d_layers=2, out=str(out), log_every=1,
        sample_every=1000, checkpoint_every=1000, num_workers=0,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A fixed embedder without weights: 2 x 2 average pools of the three channels, (n, 12)."""
    return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def tiny_networks() -> tuple[ResnetGenerator, ResnetGenerator, PatchDiscriminator, PatchDiscriminator]:
    """G_AB, G_BA, D_B, D_A in float64."""
    torch.manual_seed(0)
    networks = (
        ResnetGenerator(3, 3, width=4, n_blocks=1),
        ResnetGenerator(3, 3, width=4, n_blocks=1),
        PatchDiscriminator(3, width=4, n_layers=1),
        PatchDiscriminator(3, width=4, n_layers=1),
    )
    return tuple(network.double() for network in networks)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# the cycle-consistent generator step against the formula


@pytest.mark.parametrize(
    ("lambda_cycle", "lambda_cycle_identity", "lambda_travel", "lambda_identity"),
    [(10.0, 0.5, 0.0, 0.0), (3.0, 0.0, 0.0, 0.0), (2.0, 1.5, 4.0, 0.7)],
)
def test_cycle_step_equals_the_cyclegan_formula(lambda_cycle, lambda_cycle_identity, lambda_travel, lambda_identity):
    g_ab, g_ba, d_b, d_a = tiny_networks()
    images = torch.rand(2, 3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_a, real_b = images

    def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean()

    # straightforward: every term written out, gradients by autograd
    fake_b, fake_a = g_ab(real_a), g_ba(real_b)
    adversarial = (d_b(fake_b) - 1).square().mean() + (d_a(fake_a) - 1).square().mean()  # lsgan
    cycle = l1(g_ba(fake_b), real_a) + l1(g_ab(fake_a), real_b)
    identity = l1(g_ab(real_b), real_b) + l1(g_ba(real_a), real_a)
    src, gen = pooled(real_a), pooled(fake_b)
    distances = []
    for i in range(3):
        for j in range(3):
            if i != j:
                distances.append(1 - torch.cosine_similarity(src[i] - src[j], gen[i] - gen[j], dim=0))
    travel = torch.stack(distances).mean()
    expected_loss = (
        adversarial
        + lambda_cycle * (cycle + lambda_cycle_identity * identity)
        + lambda_travel * travel
        + lambda_identity * l1(fake_b, real_a)
    )
    trained = [*g_ab.parameters(), *g_ba.parameters()]
    expected_grads = torch.autograd.grad(expected_loss, trained)

    # the step (SGD with lr 0: the weights stay, the gradients remain)
    optimizer_ab = torch.optim.SGD(g_ab.parameters(), lr=0.0)
    optimizer_ba = torch.optim.SGD(g_ba.parameters(), lr=0.0)
    options = StepOptions(
        lambda_travel=lambda_travel,
        lambda_identity=lambda_identity,
        lambda_cycle=lambda_cycle,
        lambda_cycle_identity=lambda_cycle_identity,
        gan_loss="lsgan",
    )
    out = generator_step(
        g_ab, d_b, pooled, optimizer_ab, real_a, options,
        reverse=ReverseDirection(g_ba, d_a, optimizer_ba), real_b=real_b,
    )  # fmt: skip
    torch.testing.assert_close(out["loss_g"], expected_loss.detach())
    torch.testing.assert_close(out["loss_cycle"], cycle.detach())
    if lambda_cycle_identity:
        torch.testing.assert_close(out["loss_cycle_identity"], identity.detach())
    else:  # the identity forwards are skipped
        assert float(out["loss_cycle_identity"]) == 0.0
    torch.testing.assert_close(out["loss_adv_ba"], (d_a(fake_a) - 1).square().mean().detach())
    torch.testing.assert_close(out["fake_a"], fake_a.detach())
    for ours, straightforward in zip([p.grad for p in trained], expected_grads, strict=True):
        torch.testing.assert_close(ours, straightforward)
    assert all(p.grad is None for p in [*d_a.parameters(), *d_b.parameters()])


class GradModeRecorder(nn.Module):
    """``pooled`` that records, per call, whether autograd was recording."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_enabled.append(torch.is_grad_enabled())
        return pooled(x)


@pytest.mark.parametrize(("lambda_travel", "graph_through_e"), [(0.0, False), (0.5, True)])
def test_the_travel_term_is_logged_at_lambda_0_without_a_graph_through_the_encoder(lambda_travel, graph_through_e):
    """The gan, identity-L1 and cycle baselines (lambda 0) pay no backward through E, and their loss is unchanged."""
    g_ab, _, d_b, _ = tiny_networks()
    real_a = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    encoder = GradModeRecorder()
    options = StepOptions(lambda_travel=lambda_travel, lambda_identity=0.3, gan_loss="lsgan")
    out = generator_step(g_ab, d_b, encoder, torch.optim.SGD(g_ab.parameters(), lr=0.0), real_a, options)
    assert encoder.grad_enabled == [False, graph_through_e]  # E(x), then E(G(x))

    fake = g_ab(real_a)
    src, gen = pooled(real_a), pooled(fake)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    travel = torch.stack([1 - torch.cosine_similarity(src[i] - src[j], gen[i] - gen[j], dim=0) for i, j in pairs])
    expected = (d_b(fake) - 1).square().mean() + 0.3 * (fake - real_a).abs().mean() + lambda_travel * travel.mean()
    torch.testing.assert_close(out["loss_travel"], travel.mean().detach())
    torch.testing.assert_close(out["loss_g"], expected.detach())
    for ours, straightforward in zip(
        [p.grad for p in g_ab.parameters()], torch.autograd.grad(expected, list(g_ab.parameters())), strict=True
    ):
        torch.testing.assert_close(ours, straightforward)


def test_cycle_terms_move_both_generators():
    g_ab, g_ba, d_b, d_a = tiny_networks()
    real_a, real_b = torch.rand(2, 2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = [p.detach().clone() for p in [*g_ab.parameters(), *g_ba.parameters()]]
    optimizers = [torch.optim.Adam(g.parameters(), lr=1e-2) for g in (g_ab, g_ba)]
    options = StepOptions(lambda_travel=0.0, lambda_cycle=10.0)
    reverse = ReverseDirection(g_ba, d_a, optimizers[1])
    generator_step(g_ab, d_b, pooled, optimizers[0], real_a, options, reverse=reverse, real_b=real_b)
    after = [*g_ab.parameters(), *g_ba.parameters()]
    moved = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
    n_ab = len(list(g_ab.parameters()))
    assert any(moved[:n_ab]) and any(moved[n_ab:])


def test_generator_step_refuses_half_a_reverse_direction():
    g_ab, g_ba, d_b, d_a = tiny_networks()
    images = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    optimizer = torch.optim.SGD(g_ab.parameters(), lr=0.0)
    reverse = ReverseDirection(g_ba, d_a, torch.optim.SGD(g_ba.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="^reverse, real_b"):
        generator_step(g_ab, d_b, pooled, optimizer, images, StepOptions(lambda_cycle=10.0), reverse=reverse)
    with pytest.raises(ValueError, match="^reverse: lambda_cycle"):
        generator_step(g_ab, d_b, pooled, optimizer, images, StepOptions(lambda_cycle=10.0))


# ---------------------------------------------------------------------------------------------
# EMA


def test_update_ema_lerps_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(5, 3))  # moves the running statistics
    kept = [p.detach().clone() for p in average.parameters()]
    update_ema(average, model, 0.75)
    for new, old, current in zip(average.parameters(), kept, model.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * current.detach())
    for new, current in zip(average.buffers(), model.buffers(), strict=True):
        assert torch.equal(new, current)


def test_trainer_ema_equals_a_hand_computed_lerp_after_two_steps(tmp_path, monkeypatch, tiny_folders):
    sampled = []
    original = train_module.write_samples
    monkeypatch.setattr(
        train_module, "write_samples", lambda g, *a: sampled.append(g.state_dict()) or original(g, *a)
    )  # fmt: skip
    decay = 0.9
    config = tiny_config(
        tmp_path / "run", data=tiny_folders, g_ema=decay, checkpoint_every=1, keep_checkpoints=2, sample_every=2
    )
    train(config, progress=False)
    first, second = (load_checkpoint(p) for p in step_checkpoints(tmp_path / "run"))
    torch.manual_seed(config.seed)  # the trainer's initial G: seeded by config.seed, built first
    initial = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.g_blocks).state_dict()
    average = initial
    for checkpoint in (first, second):
        weights = checkpoint["generator"]
        average = {k: average[k] + (1 - decay) * (weights[k] - average[k]) for k in average}
        for key, value in average.items():
            torch.testing.assert_close(checkpoint["generator_ema"][key], value)
    assert any(not torch.equal(second["generator_ema"][k], second["generator"][k]) for k in average)

    # the sample grid and load_generator use the EMA weights
    (grid_weights,) = sampled
    assert all(torch.equal(grid_weights[k], second["generator_ema"][k]) for k in grid_weights)
    loaded = load_generator(tmp_path / "run" / "latest.pt").state_dict()
    assert all(torch.equal(loaded[k], second["generator_ema"][k]) for k in loaded)


# ---------------------------------------------------------------------------------------------
# the trainer with the cycle: networks, checkpoint, resume


def test_cycle_run_trains_four_networks_and_load_generator_returns_g_ab(tmp_path, monkeypatch, tiny_folders):
    generator_calls, discriminator_calls = [], []

    def generator_spy(*args, **kwargs):
        out = generator_step(*args, **kwargs)
        generator_calls.append((args[4], kwargs["real_b"], out["fake"], out["fake_a"]))
        return out

    def discriminator_spy(discriminator, optimizer, real, fake, *args, **kwargs):
        discriminator_calls.append((discriminator, real, fake))
        return discriminator_step(discriminator, optimizer, real, fake, *args, **kwargs)

    monkeypatch.setattr(train_module, "generator_step", generator_spy)
    monkeypatch.setattr(train_module, "discriminator_step", discriminator_spy)
    config = tiny_config(tmp_path / "run", data=tiny_folders, lambda_cycle=10.0)
    summary = train(config, progress=False)
    # each step: D_B on (b, G_AB(a)), then D_A, another network, on (a, G_BA(b))
    assert len(generator_calls) == 2 and len(discriminator_calls) == 4
    for (real_a, real_b, fake_b, fake_a), d_b_call, d_a_call in zip(
        generator_calls, discriminator_calls[::2], discriminator_calls[1::2], strict=True
    ):
        assert d_b_call[0] is not d_a_call[0]
        assert torch.equal(d_b_call[1], real_b) and torch.equal(d_b_call[2], fake_b)
        assert torch.equal(d_a_call[1], real_a) and torch.equal(d_a_call[2], fake_a)
    metrics = summary["metrics"]
    assert {"loss_cycle", "loss_cycle_identity", "loss_adv_ba", "loss_d_a", "d_real_a", "d_fake_a"} <= metrics.keys()
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in ("loss_cycle", "loss_cycle_identity"))
    checkpoint = load_checkpoint(tmp_path / "run" / "latest.pt")
    for name in ("generator_ba", "discriminator_a"):
        assert name in checkpoint["optimizers"] and name in checkpoint["schedulers"]
    assert "discriminator_a" in checkpoint["grad_scalers"] and "generator_ema" not in checkpoint
    torch.manual_seed(config.seed)
    g_ab = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.g_blocks)
    d_b = PatchDiscriminator(3, width=config.d_width, n_layers=config.d_layers)
    for name, fresh in (("generator_ba", g_ab), ("discriminator_a", d_b)):  # G_BA, D_A: own weights, trained
        assert any(not torch.equal(v, checkpoint[name][k]) for k, v in fresh.state_dict().items()), name
    assert any(not torch.equal(checkpoint["generator"][k], v) for k, v in checkpoint["generator_ba"].items())
    loaded = load_generator(tmp_path / "run" / "latest.pt").state_dict()
    assert all(torch.equal(loaded[k], checkpoint["generator"][k]) for k in loaded)


def assert_states_equal(a, b, path: str = "") -> None:
    """Bitwise equality of two nested checkpoint structures."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{path}[{index}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_resume_with_cycle_and_ema_equals_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_folders):
    # the augmentations of D_B's and D_A's inputs draw random numbers: both streams must continue exactly
    config = tiny_config(
        tmp_path / "full", data=tiny_folders, steps=4, lambda_cycle=10.0, g_ema=0.5, augment="color,translation,cutout"
    )
    train(config, progress=False)
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), steps=2), progress=False)
    assert train(dataclasses.replace(config, out=str(tmp_path / "halves"), resume=True), progress=False)["step"] == 4
    full = load_checkpoint(tmp_path / "full" / "latest.pt")
    halves = load_checkpoint(tmp_path / "halves" / "latest.pt")
    assert {"generator_ba", "discriminator_a", "generator_ema"} <= full.keys()
    assert full.keys() == halves.keys()
    for key in full.keys() - {"config"}:
        assert_states_equal(full[key], halves[key], key)


def test_resuming_a_plain_run_with_the_cycle_is_refused(tmp_path, tiny_folders):
    config = tiny_config(tmp_path / "run", data=tiny_folders, steps=1)
    train(config, progress=False)
    with pytest.raises(ValueError, match="does not fit this run.*lambda_cycle"):
        train(dataclasses.replace(config, steps=2, resume=True, lambda_cycle=10.0), progress=False)


# ---------------------------------------------------------------------------------------------
# options and command line


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(lambda_cycle=-1.0), "lambda_cycle"),
        (dict(lambda_cycle=math.inf), "lambda_cycle"),
        (dict(lambda_cycle="10"), "lambda_cycle"),
        (dict(lambda_cycle=10.0, lambda_cycle_identity=-0.5), "lambda_cycle_identity"),
        (dict(g_ema=1.0), "g_ema"),
        (dict(g_ema=-0.1), "g_ema"),
        (dict(g_ema=True), "g_ema"),
    ],
)
def test_bad_baseline_options_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        check_config(tiny_config(tmp_path, **overrides))


def test_command_line_flags_reach_the_config():
    parser = build_parser()
    args = vars(parser.parse_args(["--data", "data", "--lambda-cycle", "10", "--g-ema", "0.999"]))
    args.pop("demo"), args.pop("quick"), args.pop("preset")
    config = TrainConfig(**args)
    assert (config.lambda_cycle, config.lambda_cycle_identity, config.g_ema) == (10.0, 0.5, 0.999)
    check_config(config)
    assert StepOptions.from_config(config, "cpu").lambda_cycle == 10.0
    assert (TrainConfig().lambda_cycle, TrainConfig().g_ema) == (0.0, 0.0)  # both off by default
    text = parser.format_help()
    assert "CycleGAN" in text and "EMA" in text


# ---------------------------------------------------------------------------------------------
# DDP: G_BA and D_A are wrapped like G and D


def _ddp_worker(rank: int, init_file: str, tmp: str, data: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        seen: dict[str, nn.Module] = {}
        original_generator_step, original_discriminator_step = (
            train_module.generator_step,
            train_module.discriminator_step,
        )

        def generator_spy(*args, **kwargs):
            seen["generator_ba"] = kwargs["reverse"].generator
            return original_generator_step(*args, **kwargs)

        def discriminator_spy(discriminator, *args, **kwargs):
            seen.setdefault("discriminator_b", discriminator)
            seen["discriminator_a"] = discriminator  # the second call of a step
            return original_discriminator_step(discriminator, *args, **kwargs)

        train_module.generator_step, train_module.discriminator_step = generator_spy, discriminator_spy
        config = tiny_config(Path(tmp) / "ddp", data=data, batch_size=2, lambda_cycle=10.0, g_ema=0.5)
        train(config, progress=False)
        states = {name: getattr(module, "module", module).state_dict() for name, module in seen.items()}
        torch.save(states, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_both_directions_in_sync_across_ranks(tmp_path, tiny_folders):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), str(tiny_folders)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the ranks train on different images: only averaged gradients keep their weights equal
    assert ranks[0].keys() == {"generator_ba", "discriminator_a", "discriminator_b"}
    for name in ranks[0]:
        assert_states_equal(ranks[0][name], ranks[1][name], name)
    checkpoint = load_checkpoint(tmp_path / "ddp" / "latest.pt")
    assert_states_equal(checkpoint["generator_ba"], ranks[0]["generator_ba"], "generator_ba")
    assert checkpoint["data"]["world_size"] == 2 and "generator_ema" in checkpoint
