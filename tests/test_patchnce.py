"""CUT's PatchNCE baseline (--lambda-nce): the loss, the heads, the generator's encoder features, the trainer."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_baselines import assert_states_equal, pooled, tiny_config
from torch import nn

from reference import train as train_module
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig, check_config
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.patchnce import PatchHeads, patch_nce_loss, patch_nce_per_image, sample_locations
from reference.steps import PatchNCE, StepOptions, generator_step
from reference.train import build_parser, train

pytestmark = pytest.mark.usefixtures("one_thread")


def unit_vectors(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return F.normalize(x, dim=-1)


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_generator(n_blocks: int = 1) -> ResnetGenerator:
    torch.manual_seed(0)
    return ResnetGenerator(3, 3, width=4, n_blocks=n_blocks).double()


# ---------------------------------------------------------------------------------------------
# the loss of one layer


def per_patch_loop(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log softmax of the positive among [positive, negatives], one patch at a time, (N, P)."""
    n, p, _ = query.shape
    losses = torch.empty(n, p, dtype=query.dtype)
    for image in range(n):
        for i in range(p):
            positive = query[image, i] @ key[image, i]
            negatives = [query[image, i] @ key[image, j] for j in range(p) if j != i]
            logits = torch.stack([positive, *negatives]) / temperature
            losses[image, i] = -torch.log_softmax(logits, dim=0)[0]
    return losses


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    p=st.integers(1, 7),
    d=st.integers(1, 6),
    temperature=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_loss_equals_a_per_patch_loop(n, p, d, temperature, seed):
    query, key = unit_vectors(n, p, d, seed=seed), unit_vectors(n, p, d, seed=seed + 1)
    expected = per_patch_loop(query, key, temperature)
    torch.testing.assert_close(patch_nce_loss(query, key, temperature, reduction="none"), expected)
    torch.testing.assert_close(patch_nce_loss(query, key, temperature), expected.mean())


def test_cut_formulation_with_a_filled_diagonal_agrees():
    """CUT's logits: [positive] ++ [all keys, the diagonal filled with -10], / tau, cross-entropy on 0."""
    query, key = unit_vectors(2, 9, 5, seed=3), unit_vectors(2, 9, 5, seed=4)
    positive = (query * key).sum(-1, keepdim=True)  # (N, P, 1)
    negatives = (query @ key.transpose(1, 2)).masked_fill(torch.eye(9, dtype=torch.bool), -10.0)
    logits = torch.cat([positive, negatives], dim=-1).flatten(0, 1) / 0.07
    cut = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    torch.testing.assert_close(patch_nce_loss(query, key), cut, rtol=1e-12, atol=1e-12)


def test_known_values_at_the_minimum_and_for_random_features():
    p, temperature = 16, 0.07
    orthonormal = torch.eye(p, dtype=torch.float64).expand(3, p, p)  # identical, well separated
    floor = math.log(1 + (p - 1) * math.exp(-1 / temperature))
    assert float(patch_nce_loss(orthonormal, orthonormal, temperature)) == pytest.approx(floor, rel=1e-9)
    assert floor < 1e-5
    swapped = orthonormal.roll(1, dims=1)  # each query matches another patch's key: far from the minimum
    assert float(patch_nce_loss(swapped, orthonormal, temperature)) > 1 / temperature - 1e-6
    random_query, random_key = unit_vectors(4, p, 4096, seed=5), unit_vectors(4, p, 4096, seed=6)
    assert float(patch_nce_loss(random_query, random_key, temperature)) == pytest.approx(math.log(p), abs=0.1)


def test_keys_get_no_gradient_and_half_precision_is_computed_in_float32():
    query = unit_vectors(2, 5, 3, seed=7).requires_grad_(True)
    key = unit_vectors(2, 5, 3, seed=8).requires_grad_(True)
    patch_nce_loss(query, key).backward()
    assert key.grad is None and query.grad is not None and query.grad.abs().sum() > 0
    half = patch_nce_loss(query.detach().bfloat16(), key.detach().bfloat16())
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(query=torch.zeros(2, 3), key=torch.zeros(2, 3)), "^query, key"),
        (dict(query=torch.zeros(1, 2, 3), key=torch.zeros(1, 3, 3)), "^query, key"),
        (dict(query=torch.zeros(1, 2, 3), key=torch.zeros(1, 2, 3), temperature=0.0), "^temperature"),
        (dict(query=torch.zeros(1, 2, 3), key=torch.zeros(1, 2, 3), reduction="sum"), "^reduction"),
    ],
)
def test_loss_refuses_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        patch_nce_loss(**arguments)


# ---------------------------------------------------------------------------------------------
# the generator's encoder features: the layer choice; forward and state_dict unchanged


@pytest.mark.parametrize(
    ("n_blocks", "layers"),
    [(0, (0, 4, 7)), (1, (0, 4, 7, 10)), (2, (0, 4, 7, 10, 11)), (3, (0, 4, 7, 10, 11)), (9, (0, 4, 7, 10, 14))],
)
def test_nce_layers_are_input_down_convs_first_and_middle_block(n_blocks, layers):
    generator = ResnetGenerator(3, 3, width=2, n_blocks=n_blocks)
    assert generator.nce_layers == layers
    assert isinstance(generator.net[0], nn.ReflectionPad2d)
    assert all(isinstance(generator.net[i], nn.Conv2d) and generator.net[i].stride == (2, 2) for i in (4, 7))
    assert all(type(generator.net[i]).__name__ == "ResidualBlock" for i in layers[3:])


def test_encoder_features_of_the_digit_generator():
    """The digit study's G (width 16, 3 blocks, 16 px): padded input, the two down convs, blocks 1 and 2."""
    torch.manual_seed(0)
    generator = ResnetGenerator(3, 3, width=16, n_blocks=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    features = generator.encoder_features(x)
    shapes = [(2, 3, 22, 22), (2, 32, 8, 8), (2, 64, 4, 4), (2, 64, 4, 4), (2, 64, 4, 4)]
    assert [tuple(f.shape) for f in features] == shapes
    assert generator.feature_channels() == [3, 32, 64, 64, 64]
    for index, feature in zip(generator.nce_layers, features, strict=True):
        torch.testing.assert_close(feature, generator.net[: index + 1](x), rtol=0, atol=0)
    # a layer whose output the next in-place ReLU would overwrite comes back as it was
    (normed,) = generator.encoder_features(x, layers=[2])
    (early, _) = generator.encoder_features(x, layers=[2, 4])
    torch.testing.assert_close(early, normed, rtol=0, atol=0)
    assert (early < 0).any()
    with pytest.raises(ValueError, match="^layers"):
        generator.encoder_features(x, layers=[4, 0])


def test_forward_output_and_state_dict_keys_are_unchanged():
    """The numbers and keys of a generator built by the code before encoder_features existed."""
    generator = tiny_generator(n_blocks=2)
    out = generator(images(2, seed=1)).detach()
    assert float(out.sum()) == pytest.approx(-75.92729977911347, rel=1e-12)
    assert float(out.square().sum()) == pytest.approx(51.894766958538185, rel=1e-12)
    blocks = [f"net.{i}.body.{j}.{p}" for i in (10, 11) for j in (1, 5) for p in ("weight", "bias")]
    convs = [f"net.{i}.{p}" for i in (1, 4, 7) for p in ("weight", "bias")]
    tail = [f"net.{i}.{p}" for i in (12, 15, 19) for p in ("weight", "bias")]
    assert list(generator.state_dict()) == [*convs, *blocks, *tail]


# ---------------------------------------------------------------------------------------------
# heads, locations, the per-image loss


def test_heads_are_cuts_mlps_seeded_and_leave_the_global_random_state_alone():
    state = torch.get_rng_state()
    heads = PatchHeads([3, 8], seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    again = PatchHeads([3, 8], seed=4)
    assert_states_equal(heads.state_dict(), again.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(heads.parameters(), PatchHeads([3, 8], seed=5).parameters()))
    shapes = [tuple(p.shape) for p in heads.parameters()]
    assert shapes == [(256, 3), (256,), (256, 256), (256,), (256, 8), (256,), (256, 256), (256,)]
    features = [torch.randn(2, 3, 5, 5), torch.randn(2, 8, 2, 2)]
    out = heads(features, [torch.tensor([0, 7, 24]), torch.arange(4)])
    assert [tuple(o.shape) for o in out] == [(2, 3, 256), (2, 4, 256)]
    torch.testing.assert_close(out[0].norm(dim=-1), torch.ones(2, 3))
    # patch 7 of image 1 at layer 0 is the MLP of the feature column at row 1, column 2
    torch.testing.assert_close(out[0][1, 1], F.normalize(heads.heads[0](features[0][1, :, 1, 2]), dim=0))


def test_sample_locations_all_or_a_random_subset():
    features = [torch.zeros(1, 1, 22, 22), torch.zeros(1, 1, 4, 4)]
    torch.manual_seed(0)
    first, second = sample_locations(features, num_patches=16)
    assert torch.equal(second, torch.arange(16))
    assert first.shape == (16,) and len(set(first.tolist())) == 16 and 0 <= first.min() and first.max() < 484
    torch.manual_seed(0)
    assert torch.equal(sample_locations(features, num_patches=16)[0], first)  # drawn from torch's global RNG


class Recorder(nn.Module):
    """Heads that record the locations of every call."""

    def __init__(self, heads: PatchHeads) -> None:
        super().__init__()
        self.inner, self.calls = heads, []

    def forward(self, features, locations):
        self.calls.append([where.clone() for where in locations])
        return self.inner(features, locations)


def test_keys_and_queries_use_the_same_locations_and_gradients_reach_g_and_the_heads():
    generator = tiny_generator()
    heads = Recorder(PatchHeads(generator.feature_channels(), seed=0).double())
    sources = images(2, seed=2).requires_grad_(True)
    torch.manual_seed(3)
    per_image = patch_nce_per_image(generator.encoder_features, heads, sources, generator(sources), num_patches=20)
    assert per_image.shape == (2,)
    (keys, queries) = heads.calls
    assert len(keys) == 4 and all(torch.equal(k, q) for k, q in zip(keys, queries))
    assert [len(k) for k in keys] == [20, 20, 16, 16]  # 22 x 22 and 8 x 8 sampled, 4 x 4 all
    per_image.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert all(p.grad is not None for p in generator.parameters())
    # the keys carry no gradient: with a detached translation nothing reaches the sources, while
    # G's encoder still learns through the queries (and G's decoder, not on that path, does not)
    generator.zero_grad()
    sources.grad = None
    translations = generator(sources).detach()
    patch_nce_per_image(generator.encoder_features, heads, sources, translations, num_patches=20).sum().backward()
    assert sources.grad is None
    assert generator.net[4].weight.grad.abs().sum() > 0 and generator.net[-2].weight.grad is None


# ---------------------------------------------------------------------------------------------
# the generator step against CUT's formula


def cut_nce(generator, heads, source, translation) -> torch.Tensor:
    """CUT's calculate_NCE_loss written out, at every location (no sampling): keys with grad, detached in the loss."""
    keys = [f.flatten(2).transpose(1, 2) for f in generator.encoder_features(source)]
    queries = [f.flatten(2).transpose(1, 2) for f in generator.encoder_features(translation)]
    total = 0.0
    for head, k, q in zip(heads.heads, keys, queries, strict=True):
        k, q = F.normalize(head(k), dim=-1).detach(), F.normalize(head(q), dim=-1)
        p = k.shape[1]
        positive = (q * k).sum(-1, keepdim=True)
        negatives = (q @ k.transpose(1, 2)).masked_fill(torch.eye(p, dtype=torch.bool), -math.inf)
        logits = torch.cat([positive, negatives], dim=-1).flatten(0, 1) / 0.07
        total = total + F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    return total / len(keys)


@pytest.mark.parametrize(
    ("lambda_nce", "nce_idt", "lambda_travel"), [(1.0, True, 0.0), (10.0, False, 0.0), (2.0, True, 3.0)]
)
def test_step_equals_cuts_formula(lambda_nce, nce_idt, lambda_travel):
    generator = tiny_generator()
    torch.manual_seed(1)
    discriminator = PatchDiscriminator(3, width=4, n_layers=1).double()
    heads = PatchHeads(generator.feature_channels(), seed=0).double()
    real_a, real_b = images(3, seed=4), images(3, seed=5)
    fake = generator(real_a)
    expected_nce = cut_nce(generator, heads, real_a, fake)
    expected_nce_y = cut_nce(generator, heads, real_b, generator(real_b))
    if nce_idt:
        expected_nce = (expected_nce + expected_nce_y) / 2
    src, gen = pooled(real_a), pooled(fake)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    travel = torch.stack([1 - torch.cosine_similarity(src[i] - src[j], gen[i] - gen[j], dim=0) for i, j in pairs])
    expected = (discriminator(fake) - 1).square().mean() + lambda_nce * expected_nce + lambda_travel * travel.mean()
    trained = [*generator.parameters(), *heads.parameters()]
    expected_grads = torch.autograd.grad(expected, trained, allow_unused=True)

    options = StepOptions(
        lambda_travel=lambda_travel, gan_loss="lsgan", lambda_nce=lambda_nce, nce_idt=nce_idt, nce_patches=484
    )  # 484 = 22 x 22, the largest layer: every location, as in cut_nce
    patch_nce = PatchNCE(heads, torch.optim.SGD(heads.parameters(), lr=0.0))
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)
    out = generator_step(
        generator, discriminator, pooled, optimizer, real_a, options,
        real_b=real_b if nce_idt else None, patch_nce=patch_nce,
    )  # fmt: skip
    torch.testing.assert_close(out["loss_g"], expected.detach())
    torch.testing.assert_close(out["loss_nce"], expected_nce.detach())
    assert ("loss_nce_y" in out) == nce_idt
    if nce_idt:
        torch.testing.assert_close(out["loss_nce_y"], expected_nce_y.detach())
    for parameter, straightforward in zip(trained, expected_grads, strict=True):
        ours = parameter.grad
        if straightforward is None:
            assert ours is None or float(ours.abs().sum()) == 0.0
        else:
            torch.testing.assert_close(ours, straightforward)
    assert all(p.grad is None for p in discriminator.parameters())


def test_step_refuses_missing_pieces():
    generator = tiny_generator()
    discriminator = PatchDiscriminator(3, width=4, n_layers=1).double()
    patch_nce = PatchNCE(
        PatchHeads(generator.feature_channels()).double(), torch.optim.SGD([nn.Parameter(torch.ones(1))])
    )
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)
    x = images(2, seed=0)
    with pytest.raises(ValueError, match="^patch_nce: lambda_nce"):
        generator_step(generator, discriminator, pooled, optimizer, x, StepOptions(lambda_nce=1.0))
    with pytest.raises(ValueError, match="^real_b: nce_idt"):
        generator_step(generator, discriminator, pooled, optimizer, x, StepOptions(lambda_nce=1.0), patch_nce=patch_nce)


# ---------------------------------------------------------------------------------------------
# options and command line


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(lambda_nce=-1.0), "lambda_nce"),
        (dict(lambda_nce=math.nan), "lambda_nce"),
        (dict(lambda_nce="1"), "lambda_nce"),
        (dict(lambda_nce=1.0, nce_temperature=0.0), "nce_temperature"),
        (dict(lambda_nce=1.0, nce_temperature=math.inf), "nce_temperature"),
        (dict(lambda_nce=1.0, nce_patches=0), "nce_patches"),
        (dict(lambda_nce=1.0, nce_patches=2.5), "nce_patches"),
        (dict(lambda_nce=1.0, nce_dim=0), "nce_dim"),
        (dict(lambda_nce=1.0, nce_idt="yes"), "nce_idt"),
    ],
)
def test_bad_nce_options_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        check_config(tiny_config(tmp_path, **overrides))


def test_command_line_flags_reach_the_config():
    parser = build_parser()
    argv = ["--data", "data", "--lambda-nce", "10", "--no-nce-idt", "--nce-patches", "64", "--nce-temperature", "0.1"]
    args = vars(parser.parse_args(argv))
    args.pop("demo"), args.pop("quick"), args.pop("preset")
    config = TrainConfig(**args)
    check_config(config)
    assert (config.lambda_nce, config.nce_idt, config.nce_patches, config.nce_temperature) == (10.0, False, 64, 0.1)
    options = StepOptions.from_config(config, "cpu")
    assert (options.lambda_nce, options.nce_idt, options.nce_patches, options.nce_temperature) == (10.0, False, 64, 0.1)
    defaults = TrainConfig()
    assert (defaults.lambda_nce, defaults.nce_idt, defaults.nce_patches, defaults.nce_temperature) == (
        0,
        True,
        256,
        0.07,
    )
    text = parser.format_help()
    assert "PatchNCE" in text and "FastCUT" in text


# ---------------------------------------------------------------------------------------------
# the trainer: logs, checkpoint, bit-exact resume


def test_run_logs_loss_nce_and_checkpoints_the_trained_heads(tmp_path, tiny_folders):
    config = tiny_config(tmp_path / "run", data=tiny_folders, lambda_nce=1.0, lambda_travel=0.0)
    summary = train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for record in (*lines, summary["metrics"]):
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("loss_nce", "loss_nce_x", "loss_nce_y"))
        assert record["loss_nce"] == pytest.approx((record["loss_nce_x"] + record["loss_nce_y"]) / 2, rel=1e-5)
    checkpoint = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert "nce_heads" in checkpoint["optimizers"] and "nce_heads" in checkpoint["schedulers"]
    fresh = PatchHeads([3, 16, 32, 32], seed=config.seed).state_dict()
    assert checkpoint["nce_heads"].keys() == fresh.keys()
    assert all(not torch.equal(v, checkpoint["nce_heads"][k]) for k, v in fresh.items() if k.endswith("weight"))


def test_nce_dim_sets_the_width_of_the_heads(tmp_path, tiny_folders):
    train(tiny_config(tmp_path / "run", data=tiny_folders, lambda_nce=1.0, nce_dim=8, steps=1), progress=False)
    heads = load_checkpoint(tmp_path / "run" / "latest.pt")["nce_heads"]
    assert {tuple(v.shape) for k, v in heads.items() if k.endswith("2.weight")} == {(8, 8)}


def test_resume_with_nce_equals_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_folders):
    # the patch locations are random draws (256 of layer 0's 38 x 38): the stream must continue exactly
    config = tiny_config(tmp_path / "full", data=tiny_folders, steps=4, lambda_nce=1.0)
    train(config, progress=False)
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), steps=2), progress=False)
    assert train(dataclasses.replace(config, out=str(tmp_path / "halves"), resume=True), progress=False)["step"] == 4
    full = load_checkpoint(tmp_path / "full" / "latest.pt")
    halves = load_checkpoint(tmp_path / "halves" / "latest.pt")
    assert "nce_heads" in full and full.keys() == halves.keys()
    for key in full.keys() - {"config"}:
        assert_states_equal(full[key], halves[key], key)


# ---------------------------------------------------------------------------------------------
# DDP: the heads are wrapped like G and D


def _ddp_worker(rank: int, init_file: str, tmp: str, data: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        seen = {}
        original = train_module.generator_step

        def spy(generator, *args, **kwargs):
            seen["generator"], seen["heads"] = generator, kwargs["patch_nce"].heads
            return original(generator, *args, **kwargs)

        train_module.generator_step = spy
        train(tiny_config(Path(tmp) / "ddp", data=data, batch_size=2, size=16, lambda_nce=1.0), progress=False)
        assert all(isinstance(view, nn.parallel.DistributedDataParallel) for view in seen.values())
        torch.save({name: view.module.state_dict() for name, view in seen.items()}, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_keeps_g_and_the_heads_in_sync_across_ranks(tmp_path, tiny_folders):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), str(tiny_folders)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the ranks draw different images and different patch locations: only averaged gradients keep them equal
    for name in ("generator", "heads"):
        assert_states_equal(ranks[0][name], ranks[1][name], name)
    checkpoint = load_checkpoint(tmp_path / "ddp" / "latest.pt")
    assert_states_equal(checkpoint["nce_heads"], ranks[0]["heads"], "nce_heads")
