"""The discriminator's options: the R1 penalty (``--r1-gamma``) and the PatchGAN without norm (``--d-norm none``)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from test_baselines import tiny_config
from torch import nn

from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig, check_config
from reference.losses import discriminator_adversarial_loss
from reference.models import PatchDiscriminator
from reference.steps import StepOptions, discriminator_step
from reference.train import build_parser, train

pytestmark = pytest.mark.usefixtures("one_thread")


def r1_by_hand(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """mean_i |grad_x sum D(x_i)|^2, one image at a time (no batching to share a graph)."""
    norms = []
    for image in real:
        x = image[None].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(discriminator(x).sum(), x, create_graph=True)
        norms.append(gradient.square().sum())
    return torch.stack(norms).mean()


@pytest.mark.parametrize("norm", ["instance", "none"])
@pytest.mark.parametrize(("gamma", "gan_loss"), [(0.0, "bce"), (0.3, "lsgan"), (10.0, "bce"), (2.0, "hinge")])
def test_the_step_follows_the_adversarial_loss_plus_the_r1_formula(norm, gamma, gan_loss):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(3, width=4, n_layers=1, norm=norm).double()
    reference = copy.deepcopy(discriminator)
    real, fake = torch.rand(3, 3, 16, 16).double() * 2 - 1, torch.rand(3, 3, 16, 16).double() * 2 - 1

    adversarial = discriminator_adversarial_loss(reference(real), reference(fake), gan_loss)
    penalty = r1_by_hand(reference, real)
    (adversarial + 0.5 * gamma * penalty).backward()
    expected = [p.detach() - p.grad for p in reference.parameters()]  # one SGD step of lr 1

    options = StepOptions(gan_loss=gan_loss, r1_gamma=gamma)
    out = discriminator_step(discriminator, torch.optim.SGD(discriminator.parameters(), lr=1.0), real, fake, options)
    for parameter, wanted in zip(discriminator.parameters(), expected):
        torch.testing.assert_close(parameter.detach(), wanted, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["loss_d"].double(), adversarial.detach().double())  # the adversarial part alone
    if gamma:
        torch.testing.assert_close(out["r1"].double(), penalty.detach(), rtol=1e-6, atol=0)
        assert out["r1"] > 0
    else:
        assert "r1" not in out


def test_the_penalty_keeps_the_gradient_on_real_images_smaller_than_training_without_it():
    real, fake = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    final = {}
    for gamma in (0.0, 10.0):
        torch.manual_seed(1)
        discriminator = PatchDiscriminator(3, width=4, n_layers=1, norm="none")
        optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-2)
        for _ in range(30):
            discriminator_step(discriminator, optimizer, real, fake, StepOptions(gan_loss="lsgan", r1_gamma=gamma))
        final[gamma] = float(r1_by_hand(discriminator, real).detach())
    assert final[10.0] < 0.2 * final[0.0], final


def test_without_norm_the_discriminator_has_no_instance_norm_and_the_same_state_keys():
    torch.manual_seed(0)
    with_norm, without = PatchDiscriminator(width=4, norm="instance"), PatchDiscriminator(width=4, norm="none")
    assert any(isinstance(m, nn.InstanceNorm2d) for m in with_norm.modules())
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in without.modules())
    assert with_norm.state_dict().keys() == without.state_dict().keys()  # checkpoints load either way
    without.load_state_dict(with_norm.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert not torch.allclose(with_norm(x), without(x))
    # IN removes each deep channel's mean over the cells: a constant colour shift of the whole
    # image moves D's logits much less with the norm than without it
    shift = torch.full_like(x, 0.5)
    with torch.no_grad():
        moved = [float((d(x + shift) - d(x)).abs().mean() / d(x).abs().mean()) for d in (with_norm, without)]
    assert moved[0] < moved[1]


def test_a_bad_norm_is_named():
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchDiscriminator(width=4, norm="batch")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(r1_gamma=-1.0), "r1_gamma"),
        (dict(r1_gamma=math.nan), "r1_gamma"),
        (dict(r1_gamma=True), "r1_gamma"),
        (dict(r1_gamma=1.0, compile=True), "r1_gamma"),
        (dict(r1_gamma=1.0, amp="fp16", device="cuda"), "r1_gamma"),
        (dict(d_norm="batch"), "d_norm"),
    ],
)
def test_bad_options_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        check_config(tiny_config(tmp_path, **overrides))


def test_command_line_flags_reach_the_config_and_the_step():
    parser = build_parser()
    args = vars(parser.parse_args(["--data", "data", "--r1-gamma", "0.05", "--d-norm", "none"]))
    args.pop("demo"), args.pop("quick"), args.pop("preset")
    config = TrainConfig(**args)
    check_config(config)
    assert (config.r1_gamma, config.d_norm) == (0.05, "none")
    assert StepOptions.from_config(config, "cpu").r1_gamma == 0.05
    assert (TrainConfig().r1_gamma, TrainConfig().d_norm) == (0.0, "instance")  # CycleGAN's defaults


def test_a_run_logs_r1_and_its_checkpoint_rebuilds_the_discriminator(tmp_path, tiny_folders):
    config = tiny_config(tmp_path / "run", data=tiny_folders, r1_gamma=0.5, d_norm="none", amp="bf16")
    train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss_d" in line]
    assert steps and all(line["r1"] > 0 and math.isfinite(line["r1"]) for line in steps)
    checkpoint = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert checkpoint["discriminator_kwargs"]["norm"] == "none"
    rebuilt = PatchDiscriminator(**checkpoint["discriminator_kwargs"])
    rebuilt.load_state_dict(checkpoint["discriminator"])
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in rebuilt.modules())


def test_resume_with_r1_equals_an_uninterrupted_run(tmp_path, tiny_folders):
    whole = tiny_config(tmp_path / "whole", data=tiny_folders, steps=3, r1_gamma=1.0, d_norm="none")
    train(whole, progress=False)
    halves = tiny_config(
        tmp_path / "halves", data=tiny_folders, steps=2, r1_gamma=1.0, d_norm="none", checkpoint_every=1
    )
    train(halves, progress=False)
    train(
        tiny_config(tmp_path / "halves", data=tiny_folders, steps=3, r1_gamma=1.0, d_norm="none", resume=True),
        progress=False,
    )
    a, b = (load_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "halves"))
    for name in ("generator", "discriminator"):
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}/{key}"


# ---------------------------------------------------------------------------------------------
# DDP: the penalty differentiates through a DDP-wrapped D; its gradients must still be averaged


def _ddp_worker(rank: int, init_file: str, tmp: str, data: str) -> None:
    import torch.distributed as dist

    from reference import train as train_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        seen: list[nn.Module] = []
        original = train_module.discriminator_step

        def spy(discriminator, *args, **kwargs):
            seen.append(discriminator)
            return original(discriminator, *args, **kwargs)

        train_module.discriminator_step = spy
        train(
            tiny_config(Path(tmp) / "ddp", data=data, batch_size=2, r1_gamma=1.0, d_norm="none", steps=2),
            progress=False,
        )
        assert isinstance(seen[0], torch.nn.parallel.DistributedDataParallel)
        torch.save(seen[0].module.state_dict(), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_with_r1_keeps_the_discriminators_in_sync(tmp_path, tiny_folders):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), str(tiny_folders)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    initial = PatchDiscriminator(3, width=8, n_layers=2, norm="none").state_dict().keys()
    assert ranks[0].keys() == initial
    # the ranks see different images: only averaged gradients keep their weights equal
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
