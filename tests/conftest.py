"""Shared fixtures: tiny CLIP checkpoints on disk, no network for any test, hypothesis profiles.

The checkpoints are built from a small ``CLIPVisionConfig`` with random weights and written with
``save_pretrained`` (safetensors), so tests load them exactly as users load real ones, by path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests derandomized (the same examples on every run), so that a red CI
# always reproduces; locally they explore new examples every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def seeded_generators() -> None:
    """Every test starts from seeded global generators (torch, numpy, random), so a test that draws
    without a generator of its own sees the same numbers on every run and every machine."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


TINY_CLIP_CONFIG = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=16,
)
# Deliberately not OpenAI's constants, so that tests can tell whether they were read.
TINY_CLIP_MEAN = (0.5, 0.4, 0.3)
TINY_CLIP_STD = (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny convolutions on a shared 2-core machine are far faster on one thread than on two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Pretrained toy weights are cached in a folder of the test session, not the user's cache,
    from the first fixture on (module-scoped fixtures build encoders before any test runs)."""
    folder = tmp_path_factory.mktemp("weights-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRAVEL_LOSS_CACHE", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch, _weights_cache: Path) -> None:
    """Every test runs in Hugging Face offline mode: nothing can reach the network."""
    monkeypatch.setenv("TRAVEL_LOSS_CACHE", str(_weights_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants
    except ImportError:
        return
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPVisionModelWithProjection checkpoint (32 px, patch 8, hidden 32, 2 layers,
    projection 16) with a modern preprocessor_config.json written by transformers' CLIP image
    processor: shortest edge 32, crop 32 x 32, mean TINY_CLIP_MEAN, std TINY_CLIP_STD."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = _save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(TINY_CLIP_MEAN),
        image_std=list(TINY_CLIP_STD),
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir_without_processor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of checkpoint with no preprocessor_config.json (as save_pretrained leaves)."""
    return _save_tiny_clip(tmp_path_factory.mktemp("tiny_clip_no_processor"))


@pytest.fixture(scope="session")
def tiny_clip_dir_legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose preprocessor_config.json has the legacy int keys of OpenAI's
    original files, with a shortest edge (36) larger than the crop (32)."""
    folder = _save_tiny_clip(tmp_path_factory.mktemp("tiny_clip_legacy"))
    legacy = {
        "crop_size": 32,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(TINY_CLIP_MEAN),
        "image_std": list(TINY_CLIP_STD),
        "resample": 3,
        "size": 36,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(legacy, indent=2))
    return folder
