"""Shared fixtures: tiny CLIP checkpoints and tiny image folders on disk, no network for any test,
hypothesis profiles.

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


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in Hugging Face offline mode: nothing can reach the network."""
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


TINY_FOLDER_IMAGES = 32  # per domain
TINY_FOLDER_SIZE = 32  # pixels a side


def _write_rectangle_images(folder: Path, count: int, size: int, rng, bright: bool) -> None:
    """``count`` PNGs of ``size`` px: a flat background and two to four flat rectangles, colours from
    the bright (domain A) or the dark, muted (domain B) half of the RGB cube."""
    import numpy as np
    from PIL import Image

    def colour() -> np.ndarray:
        return rng.integers(128, 256, 3) if bright else rng.integers(0, 128, 3)

    folder.mkdir(parents=True)
    for index in range(count):
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = colour()
        for _ in range(rng.integers(2, 5)):
            top, left = rng.integers(0, size - 4, 2)
            height, width = rng.integers(4, size // 2 + 1, 2)
            pixels[top : top + height, left : left + width] = colour()
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CycleGAN-layout data root: ``trainA/`` and ``trainB/`` of TINY_FOLDER_IMAGES PNGs each, at
    TINY_FOLDER_SIZE px, seeded (the same files in every session): coloured rectangles on a flat
    background, bright in A, dark in B. Shared by the whole session: never write into it."""
    import numpy as np

    root = tmp_path_factory.mktemp("tiny_folders")
    rng = np.random.default_rng(0)
    for side, bright in (("A", True), ("B", False)):
        _write_rectangle_images(root / f"train{side}", TINY_FOLDER_IMAGES, TINY_FOLDER_SIZE, rng, bright)
    return root
