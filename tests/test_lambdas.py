"""travel_loss.lambdas: the paper-to-mean lambda conversion and the gradient-balanced lambda."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference.presets
from reference.presets import patches_per_image
from travel_loss import lambdas
from travel_loss.lambdas import (
    PAPER_PATCHES,
    mean_to_paper_lambda,
    paper_to_mean_lambda,
)


def test_reference_modules_re_export_the_package_objects():
    assert reference.presets.paper_to_mean_lambda is paper_to_mean_lambda
    assert reference.presets.mean_to_paper_lambda is mean_to_paper_lambda
    assert reference.presets.PAPER_BATCH_SIZE is lambdas.PAPER_BATCH_SIZE


def test_default_patches_are_the_3_layer_patchgan_at_256_px():
    assert PAPER_PATCHES == patches_per_image(256, 3) == 900


@settings(max_examples=50, deadline=None)
@given(
    lambda_paper=st.floats(0, 10, allow_nan=False),
    n=st.integers(2, 512),
    p=st.integers(1, 4096),
    adversarial_mean=st.floats(0, 10),
    travel_mean=st.floats(0, 2),
)
def test_summed_objective_is_np_times_the_mean_objective(lambda_paper, n, p, adversarial_mean, travel_mean):
    # J_paper = sum of N P logit losses + lambda_paper * sum of N (N - 1) pair distances
    summed = n * p * adversarial_mean + lambda_paper * n * (n - 1) * travel_mean
    lambda_mean = paper_to_mean_lambda(lambda_paper, batch_size=n, patches=p)
    assert summed == pytest.approx(n * p * (adversarial_mean + lambda_mean * travel_mean), rel=1e-9, abs=1e-9)
    assert mean_to_paper_lambda(lambda_mean, batch_size=n, patches=p) == pytest.approx(lambda_paper, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=1), "batch_size: expected an int >= 2"),
        (dict(patches=0), "patches: expected an int >= 1"),
        (dict(patches=True), "patches: expected an int >= 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paper_to_mean_lambda(0.001, **kwargs)
    with pytest.raises(ValueError, match="lambda: expected a finite number >= 0"):
        paper_to_mean_lambda(float("inf"))


def test_the_numbers_the_readme_quotes():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = "".join(page.read_text() for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    quoted = {
        128: ("1.4e-4", paper_to_mean_lambda(0.001, batch_size=128)),
        8: ("7.8e-6", paper_to_mean_lambda(0.001, batch_size=8)),
        64: ("7.0e-5", paper_to_mean_lambda(0.001, batch_size=1 + 63)),
    }
    for text, value in quoted.values():
        assert f"{value:.1e}".replace("e-0", "e-") == text and text in readme
    from reference.config import TrainConfig

    assert TrainConfig().lambda_travel == "auto" and "--lambda-travel auto" in readme
