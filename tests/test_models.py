"""The reference networks: shapes at any multiple of 4, the 70x70 PatchGAN, CycleGAN's layout and init."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reference.models import (
    PatchDiscriminator,
    ResidualBlock,
    ResnetGenerator,
    default_n_blocks,
    init_weights,
    receptive_field,
)


def _measured_receptive_field(discriminator: PatchDiscriminator, size: int) -> tuple[int, int]:
    """Height and width of the input region with a non-zero gradient of the centre logit, norms removed.

    Instance norm lets every logit see the whole image through its statistics, so it is
    replaced by the identity to expose the conv chain's own field.
    """
    for name, module in list(discriminator.net.named_children()):
        if isinstance(module, nn.InstanceNorm2d):
            setattr(discriminator.net, name, nn.Identity())
    image = torch.randn(1, discriminator.in_channels, size, size, dtype=torch.float64, requires_grad=True)
    logits = discriminator.double()(image)
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    rows, cols = torch.nonzero(image.grad[0].abs().sum(0)).unbind(1)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_patch_discriminator_sees_70x70_patches_and_gives_30x30_at_256() -> None:
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(width=4)
    assert receptive_field(discriminator) == 70
    assert discriminator(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert discriminator.output_size(256) == 30
    assert _measured_receptive_field(discriminator, 128) == (70, 70)


@pytest.mark.parametrize(("n_layers", "expected"), [(1, 16), (2, 34), (3, 70), (4, 142)])
def test_receptive_field_matches_the_gradient_footprint(n_layers: int, expected: int) -> None:
    torch.manual_seed(n_layers)
    discriminator = PatchDiscriminator(width=2, n_layers=n_layers)
    assert receptive_field(discriminator) == expected
    size = 2 * expected + 2**n_layers * 4
    assert _measured_receptive_field(discriminator, size) == (expected, expected)


def test_patch_discriminator_layout_is_cyclegans() -> None:
    discriminator = PatchDiscriminator()
    convs = [m for m in discriminator.net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    layers = list(discriminator.net)
    assert isinstance(layers[1], nn.LeakyReLU) and layers[1].negative_slope == 0.2  # no norm on the first layer
    norms = [m for m in layers if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 3 and not any(n.affine or n.track_running_stats for n in norms)


@functools.cache
def _small_networks() -> tuple[ResnetGenerator, PatchDiscriminator]:
    torch.manual_seed(0)
    return ResnetGenerator(width=4, n_blocks=1), PatchDiscriminator(width=4)


@settings(max_examples=8, deadline=None)
@given(height=st.integers(6, 20), width=st.integers(6, 20), batch=st.integers(1, 2))
def test_both_networks_are_fully_convolutional_at_multiples_of_4(height: int, width: int, batch: int) -> None:
    height, width = 4 * height, 4 * width  # 24 .. 80
    generator, discriminator = _small_networks()
    images = torch.rand(batch, 3, height, width) * 2 - 1
    translated = generator(images)
    assert translated.shape == images.shape
    assert translated.abs().max() < 1  # tanh head
    expected = (discriminator.output_size(height), discriminator.output_size(width))
    assert discriminator(translated).shape == (batch, 1, *expected)


def test_generator_smallest_input_and_channel_counts() -> None:
    generator = ResnetGenerator(in_channels=1, out_channels=2, width=4, n_blocks=0)
    assert generator(torch.zeros(1, 1, 8, 12)).shape == (1, 2, 8, 12)


@pytest.mark.parametrize(
    ("shape", "match"), [((1, 3, 37, 40), "multiples of 4"), ((1, 3, 4, 4), ">= 8"), ((3, 32, 32), r"\(N, 3, H, W\)")]
)
def test_generator_rejects_unusable_shapes(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResnetGenerator(width=2, n_blocks=0)(torch.zeros(shape))


def test_discriminator_rejects_too_small_inputs_naming_the_minimum() -> None:
    discriminator = PatchDiscriminator(width=2)
    with pytest.raises(ValueError, match="at least 24x24, got 20x20"):
        discriminator(torch.zeros(1, 3, 20, 20))
    assert discriminator(torch.zeros(1, 3, 24, 24)).shape == (1, 1, 1, 1)


def test_generator_layout_is_cyclegans() -> None:
    generator = ResnetGenerator(width=64, n_blocks=9)
    assert sum(isinstance(m, ResidualBlock) for m in generator.modules()) == 9
    convs = [m for m in generator.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    stem, head = convs[0], convs[-1]
    assert stem.kernel_size == head.kernel_size == (7, 7)
    downs = [c for c in convs if isinstance(c, nn.Conv2d) and c.stride == (2, 2)]
    ups = [c for c in convs if isinstance(c, nn.ConvTranspose2d)]
    assert [c.out_channels for c in downs] == [128, 256] and [c.out_channels for c in ups] == [128, 64]
    assert all(c.stride == (2, 2) and c.output_padding == (1, 1) for c in ups)
    assert isinstance(generator.net[0], nn.ReflectionPad2d) and isinstance(generator.net[-1], nn.Tanh)
    norms = [m for m in generator.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and not any(n.affine or n.track_running_stats for n in norms)
    # the 11.4 M parameters of CycleGAN's resnet_9blocks generator
    assert sum(p.numel() for p in generator.parameters()) == 11_378_179


def test_weights_start_from_normal_0_002_and_zero_biases() -> None:
    torch.manual_seed(0)
    for network in (ResnetGenerator(width=32, n_blocks=2), PatchDiscriminator(width=32)):
        weights = [m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        for layer in weights:
            assert torch.count_nonzero(layer.bias) == 0
            if layer.weight.numel() >= 5000:
                assert layer.weight.mean().abs() < 0.002
                assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
    linear = init_weights(nn.Sequential(nn.Linear(200, 300)), std=0.1)[0]
    assert linear.weight.std().item() == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="std must be > 0"):
        init_weights(nn.Linear(2, 2), std=0.0)


def test_default_n_blocks_follows_cyclegan() -> None:
    assert default_n_blocks(256) == 9
    assert default_n_blocks(128) == default_n_blocks(64) == 6
    with pytest.raises(ValueError, match="size"):
        default_n_blocks(0)


def test_receptive_field_refuses_networks_that_are_not_conv_chains() -> None:
    with pytest.raises(ValueError, match="transposed"):
        receptive_field(ResnetGenerator(width=2, n_blocks=0))
    with pytest.raises(ValueError, match="no Conv2d"):
        receptive_field(nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"n_blocks": -1}, {"in_channels": 2.0}, {"out_channels": True}])
def test_generator_rejects_bad_arguments(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        ResnetGenerator(**kwargs)


def test_networks_train_end_to_end() -> None:
    """Gradients reach every parameter of both networks."""
    torch.manual_seed(0)
    generator, discriminator = ResnetGenerator(width=4, n_blocks=1), PatchDiscriminator(width=4)
    discriminator(generator(torch.randn(2, 3, 32, 32))).mean().backward()
    for network in (generator, discriminator):
        for name, parameter in network.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
