"""The trainer's shared random views (--travel-views, --travel-view-transforms): the step against the
library's formula, no views when off, config errors, and a run that resumes bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig, check_config
from reference.losses import generator_adversarial_loss
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.steps import StepOptions, generator_step
from reference.train import build_parser, train
from travel_loss import RandomViews, embed_views, travel_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A fixed embedder without weights: 4 x 4 average pools of the three channels, (n, 48)."""
    return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _gradients(views: RandomViews | None, reference: bool, seed: int = 0) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    generator, discriminator = ResnetGenerator(3, 3, width=4, n_blocks=1), PatchDiscriminator(3, width=4, n_layers=1)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    lam = 2.0
    torch.manual_seed(seed)
    if reference:  # the straightforward formula with the library's functions
        fake = generator(images)
        if views is None:
            src, gen = pooled(images), pooled(fake)
        else:
            src, gen = embed_views(pooled, images, fake, views)
        travel = travel_loss(src, gen)
        loss = generator_adversarial_loss(discriminator(fake), "lsgan") + lam * travel
        loss.backward(inputs=list(generator.parameters()))
        value = float(travel.detach())
    else:
        optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)  # lr 0: the step leaves the weights
        options = StepOptions(lambda_travel=lam, gan_loss="lsgan", views=views)
        out = generator_step(generator, discriminator, pooled, optimizer, images, options)
        value = float(out["loss_travel"])
    return [p.grad.clone() for p in generator.parameters()], value


@pytest.mark.parametrize("spec", ["count=2,shift=2,blur=0.5,noise=0.1", "count=3,flip=0.5,crop=0.3"])
def test_step_with_views_equals_the_library_formula(spec):
    views = RandomViews.parse(spec)
    ours, ours_travel = _gradients(views, reference=False)
    straightforward, travel = _gradients(views, reference=True)
    assert ours_travel == pytest.approx(travel, rel=1e-5)
    scale = max(float(b.abs().max()) for b in straightforward)
    for a, b in zip(ours, straightforward):  # float32, another order of the same sums (biases before a norm: ~0)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)
    _, plain_travel = _gradients(None, reference=True)
    assert ours_travel != pytest.approx(plain_travel, rel=1e-3)  # the views change the term


def test_one_view_without_transforms_is_the_plain_step():
    ours, travel = _gradients(RandomViews(count=1), reference=False)
    plain, plain_travel = _gradients(None, reference=False)
    assert travel == pytest.approx(plain_travel, rel=1e-6)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(0)
    for domain in ("a", "b"):
        (root / domain).mkdir()
        for index in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / domain / f"{index}.png")
    return root


def tiny(out: Path, folders: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = dict(
        data_a=str(folders / "a"), data_b=str(folders / "b"), size=16, batch_size=4, steps=4, g_width=4,
        g_blocks=1, d_width=4, d_layers=1, encoder_mode="module",
        encoder="reference.studies.digit_data:random_embedder",
        lambda_travel=3.0, travel_views=2, out=str(out), log_every=1, sample_every=1000, num_workers=0,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)  # type: ignore[arg-type]


def test_a_run_with_views_resumes_bit_for_bit(tmp_path, folders):
    train(tiny(tmp_path / "whole", folders), progress=False)
    train(tiny(tmp_path / "split", folders, steps=2), progress=False)
    train(tiny(tmp_path / "split", folders, resume=True), progress=False)
    a, b = (load_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "split"))
    for key, value in a["generator"].items():
        assert torch.equal(value, b["generator"][key]), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(travel_views=-1), "^travel_views: expected an int >= 0"),
        (dict(travel_view_transforms="shift=2,wobble=1"), "^travel_view_transforms: expected a view spec.*wobble"),
        (dict(travel_view_transforms="noise=-1"), "^travel_view_transforms: expected a view spec"),
        (dict(encoder_mode="siamese"), "^travel_views: expected 0 with encoder_mode siamese"),
    ],
)
def test_bad_view_options_name_the_field(tmp_path, folders, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(tiny(tmp_path, folders, **overrides))


def test_flags_reach_the_step_options(folders, tmp_path):
    args = vars(build_parser().parse_args(["--travel-views", "3", "--travel-view-transforms", "flip=0.5,noise=0.05"]))
    assert (args["travel_views"], args["travel_view_transforms"]) == (3, "flip=0.5,noise=0.05")
    options = StepOptions.from_config(tiny(tmp_path, folders, travel_views=3, travel_view_transforms="flip=0.5"), "cpu")
    assert options.views == RandomViews(count=3, flip=0.5)
    assert StepOptions.from_config(tiny(tmp_path, folders, travel_views=0), "cpu").views is None
