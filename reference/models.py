"""The generator and discriminator of the reference trainer, in the CycleGAN layout.

ResnetGenerator (Johnson et al. 2016, as used by CycleGAN), for an input (N, C_in, H, W)
with H and W multiples of 4::

    reflect-pad 3, conv7 -> width, IN, ReLU                       (H,   W)
    conv3 stride 2 -> 2 width, IN, ReLU                           (H/2, W/2)
    conv3 stride 2 -> 4 width, IN, ReLU                           (H/4, W/4)
    n_blocks x [x + (reflect-pad 1, conv3, IN, ReLU, reflect-pad 1, conv3, IN)(x)]
    conv-transpose3 stride 2 -> 2 width, IN, ReLU                 (H/2, W/2)
    conv-transpose3 stride 2 -> width, IN, ReLU                   (H,   W)
    reflect-pad 3, conv7 -> C_out, tanh                           (H,   W)

PatchDiscriminator (the 70x70 PatchGAN of pix2pix/CycleGAN), all convs 4x4 with padding 1::

    conv s2 -> width, LeakyReLU(0.2)
    conv s2 -> 2 width, IN, LeakyReLU(0.2)       (n_layers - 1 such layers, width x 2 each,
    conv s2 -> 4 width, IN, LeakyReLU(0.2)        capped at 8 width)
    conv s1 -> 8 width, IN, LeakyReLU(0.2)
    conv s1 -> 1 logit per patch

``ResnetGenerator.encoder_features`` returns intermediate outputs of the same network (for
CUT's PatchNCE loss, ``reference.patchnce``); ``forward`` and the state-dict keys are untouched.

IN is ``InstanceNorm2d(affine=False)``; every conv has a bias (with a non-affine norm the bias
is the only shift the layer has). Weights start from normal(0, 0.02), biases from 0.
``PatchDiscriminator(norm="none")`` drops the discriminator's IN layers (the StyleGAN-family
choice, usually with an R1 penalty): IN over the few cells of a small image's deep feature maps
removes each channel's mean, i.e. much of what the absolute colours say.

SiameseEmbedder is TraVeLGAN's trainable embedder, the baseline encoder of the travel loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "DISCRIMINATOR_NORMS",
    "PatchDiscriminator",
    "ResidualBlock",
    "ResnetGenerator",
    "SiameseEmbedder",
    "default_n_blocks",
    "init_weights",
    "receptive_field",
]

DISCRIMINATOR_NORMS = ("instance", "none")  # PatchDiscriminator's norm: CycleGAN's IN, or none


def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Draw every conv / transposed-conv / linear weight in ``module`` from normal(0, std), zero their biases.

    Returns ``module`` so that it can wrap a constructor call.
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    for layer in module.modules():
        if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def default_n_blocks(size: int) -> int:
    """CycleGAN's number of residual blocks for square images of side ``size``: 9 above 128 px, else 6."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    return 9 if size > 128 else 6


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_images(x: torch.Tensor, channels: int, who: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{who} expects images of shape (N, {channels}, H, W), got {tuple(x.shape)}")


class ResidualBlock(nn.Module):
    """``x + F(x)`` with F = reflect-pad 1, conv3, IN, ReLU, reflect-pad 1, conv3, IN; shape-preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=True),
            nn.InstanceNorm2d(channels, affine=False),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=True),
            nn.InstanceNorm2d(channels, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator: (N, in_channels, H, W) in any range -> (N, out_channels, H, W) in (-1, 1).

    H and W must be multiples of 4 (two stride-2 stages) and at least 8 (the 2x2 bottleneck
    is reflect-padded by 1). ``width`` is the channel count of the first stage (64 in CycleGAN);
    the bottleneck has ``4 * width`` channels. Use 9 blocks at 256 px, 6 at 128 px and below
    (:func:`default_n_blocks`).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("width", width)
        _check_positive_int("n_blocks", n_blocks, minimum=0)
        self.in_channels, self.out_channels, self.width, self.n_blocks = in_channels, out_channels, width, n_blocks

        def down(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=True), nn.InstanceNorm2d(cout), nn.ReLU(True)]

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=True),
                nn.InstanceNorm2d(cout),
                nn.ReLU(True),
            ]

        self.net = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, width, kernel_size=7, bias=True),
            nn.InstanceNorm2d(width),
            nn.ReLU(True),
            *down(width, 2 * width),
            *down(2 * width, 4 * width),
            *[ResidualBlock(4 * width) for _ in range(n_blocks)],
            *up(4 * width, 2 * width),
            *up(2 * width, width),
            nn.ReflectionPad2d(3),
            nn.Conv2d(width, out_channels, kernel_size=7, bias=True),
            nn.Tanh(),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.net(x)

    def _check_input(self, x: torch.Tensor) -> None:
        _check_images(x, self.in_channels, "ResnetGenerator")
        height, width = x.shape[-2:]
        if height % 4 or width % 4 or height < 8 or width < 8:
            raise ValueError(
                f"ResnetGenerator needs H and W to be multiples of 4 and >= 8, got {height}x{width}; "
                "pad the input (reflect) and crop the output"
            )

    @property
    def nce_layers(self) -> tuple[int, ...]:
        """Indices into ``self.net`` of the encoder features of CUT's PatchNCE loss (:meth:`encoder_features`).

        CUT's ``--nce_layers 0,4,8,12,16`` for its 9-block generator, mapped onto this network:

        ====  ==========================================  ======================  ============================
        CUT   what                                        here                    shape, for (N, 3, H, W) in
        ====  ==========================================  ======================  ============================
        0     the input after the first reflect-pad       0                       (N, 3, H + 6, W + 6)
        4     the first stride-2 conv (before its IN)     4                       (N, 2 width, H/2, W/2)
        8     the second stride-2 conv (before its IN)    7                       (N, 4 width, H/4, W/4)
        12    residual block 1                            10                      (N, 4 width, H/4, W/4)
        16    residual block 5 of 9 (the middle one)      10 + n_blocks // 2      (N, 4 width, H/4, W/4)
        ====  ==========================================  ======================  ============================

        The middle block is block ``n_blocks // 2 + 1`` (counted from 1): 2 of 2 or 3, 4 of 6, 5 of 9.
        With one residual block the last two coincide (four layers), with none only the first three exist.
        Layers 4 and 7 are the raw conv outputs, before their instance norm, as in CUT.
        """
        first_block = 10
        blocks = (first_block, first_block + self.n_blocks // 2) if self.n_blocks else ()
        return tuple(dict.fromkeys((0, 4, 7, *blocks)))

    def feature_channels(self, layers: Sequence[int] | None = None) -> list[int]:
        """The channel count of each of ``layers`` (default :attr:`nce_layers`) of :meth:`encoder_features`."""
        layers = self._check_layers(layers)
        channels, found = self.in_channels, {}
        for index, module in enumerate(self.net):
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                channels = module.out_channels
            found[index] = channels
        return [found[index] for index in layers]

    def encoder_features(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The outputs of the modules ``self.net[i]`` for i in ``layers`` (default :attr:`nce_layers`), in order.

        Runs ``self.net`` only up to the last of them (for the defaults: the encoder up to the middle
        residual block). The same parameters as :meth:`forward`, which it leaves unchanged.
        """
        self._check_input(x)
        layers = self._check_layers(layers)
        features = []
        for index, module in enumerate(itertools.islice(self.net, layers[-1] + 1)):
            x = module(x)
            if index in layers:
                following = self.net[index + 1] if index < layers[-1] else None
                overwritten = isinstance(following, nn.ReLU) and following.inplace  # would change x in place
                features.append(x.clone() if overwritten else x)
        return features

    def _check_layers(self, layers: Sequence[int] | None) -> list[int]:
        layers = list(self.nce_layers if layers is None else layers)
        if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < len(self.net):
            raise ValueError(
                f"layers: expected increasing indices into the generator's {len(self.net)} modules, got {layers!r}"
            )
        return layers


class PatchDiscriminator(nn.Module):
    """PatchGAN: (N, in_channels, H, W) -> (N, 1, h, w) logits, one per overlapping patch.

    With the defaults (n_layers=3) each logit sees a 70x70 patch and a 256x256 input gives a
    30x30 map; in general each side maps as ``s -> s // 2`` for each of the n_layers stride-2
    convs, then ``-1`` for each of the two stride-1 convs. ``norm``: "instance" (CycleGAN's IN
    after every conv but the first and the last) or "none" (the same layers without it; the same
    state-dict keys).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3, norm: str = "instance") -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        _check_positive_int("n_layers", n_layers)
        if norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"norm must be one of {DISCRIMINATOR_NORMS}, got {norm!r}")
        self.in_channels, self.width, self.n_layers, self.norm = in_channels, width, n_layers, norm

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1, bias=True),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = width
        for index in range(1, n_layers + 1):
            stride = 2 if index < n_layers else 1
            out = width * min(2**index, 8)
            layers += [
                nn.Conv2d(channels, out, kernel_size=4, stride=stride, padding=1, bias=True),
                nn.InstanceNorm2d(out) if norm == "instance" else nn.Identity(),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1, bias=True))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side of ``size`` pixels (<= 0: too small)."""
        for conv in self._convs():
            assert isinstance(conv.padding, tuple)  # built with integer padding, never "same" or "valid"
            size = (size + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        return size

    def _convs(self) -> list[nn.Conv2d]:
        return [m for m in self.net if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels, "PatchDiscriminator")
        height, width = x.shape[-2:]
        if self.output_size(height) < 1 or self.output_size(width) < 1:
            smallest = next(s for s in range(1, 10_000) if self.output_size(s) >= 1)
            raise ValueError(
                f"PatchDiscriminator(n_layers={self.n_layers}) needs inputs of at least "
                f"{smallest}x{smallest}, got {height}x{width}"
            )
        return self.net(x)


def receptive_field(network: nn.Module) -> int:
    """Side in pixels of the input region one output value depends on, through the conv chain.

    Walks the 2-D convolutions of ``network`` in registration order, which must be the order
    they are applied (a plain chain, as in :class:`PatchDiscriminator`):
    ``r = 1 + sum_l (k_l - 1) * d_l * prod_{m < l} s_m``. Normalisation layers are ignored:
    instance norm lets every output see the whole image through its statistics, but the
    pattern a logit responds to is the conv chain's. Square kernels and strides are assumed.
    """
    if any(isinstance(m, nn.ConvTranspose2d) for m in network.modules()):
        raise ValueError(
            f"receptive_field needs a plain chain of Conv2d layers; "
            f"{type(network).__name__} has transposed convolutions"
        )
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"network has no Conv2d layers: {type(network).__name__}")
    field, jump = 1, 1
    for conv in convs:
        field += (conv.kernel_size[0] - 1) * conv.dilation[0] * jump
        jump *= conv.stride[0]
    return field


class SiameseEmbedder(nn.Module):
    """TraVeLGAN's trainable embedder S: 4x4 stride-2 convs with LeakyReLU(0.2) down to at most
    4x4 pixels (channels doubling from ``width``, capped at 8 width), then a linear map to ``dim``.

    (N, 3, size, size) -> (N, dim). No normalisation layer: each embedding depends on its image alone.
    """

    def __init__(self, size: int, width: int = 32, dim: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, out, side = 3, width, size
        while side > 4:
            layers += [nn.Conv2d(channels, out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            channels, out, side = out, min(2 * out, 8 * width), side // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * side * side, dim)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))
