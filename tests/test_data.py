"""Image folders and the CycleGAN layout."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reference.data import ImageFolder, UnreadableImageWarning, resolve_unpaired_folders

# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _save(path: Path, pixels: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, **options)
    return path


def _solid(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()


def _record_warnings(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]


def test_image_folder_reads_jpg_png_webp_resized_into_minus_one_one(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _solid(20, 30, (255, 0, 51)))
    _save(tmp_path / "b.JPG", _solid(40, 10, (128, 128, 128)), quality=95)
    _save(tmp_path / "c.webp", _solid(17, 17, (0, 255, 0)), lossless=True)
    _save(tmp_path / "d.jpeg", _solid(16, 16, (10, 20, 30)), quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / "sub" / "e.png", _solid(8, 8, (0, 0, 0)))
    dataset = ImageFolder(tmp_path, size=12)
    assert [p.name for p in dataset.paths] == ["a.png", "b.JPG", "c.webp", "d.jpeg"]
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    assert images.shape == (4, 3, 12, 12) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # solid colours stay solid through the bicubic resize: pixel / 127.5 - 1 exactly for lossless files
    assert torch.equal(images[0], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]).view(3, 1, 1).expand(3, 12, 12))
    assert torch.equal(images[2], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 12, 12))
    assert (images[1] - (128 / 127.5 - 1)).abs().max() <= 3 / 127.5  # JPEG
    assert len(ImageFolder(tmp_path, size=12, recursive=True)) == 5


def test_image_folder_keeps_orientation_and_flips_left_right(tmp_path: Path) -> None:
    left_red_right_blue = np.concatenate([_solid(10, 10, (255, 0, 0)), _solid(10, 10, (0, 0, 255))], axis=1)
    _save(tmp_path / "x.png", left_red_right_blue)
    plain = ImageFolder(tmp_path, size=8)[0]
    assert plain[0, :, 0].eq(1).all() and plain[2, :, -1].eq(1).all()  # red left, blue right
    flipping = ImageFolder(tmp_path, size=8, flip=True)
    torch.manual_seed(0)
    draws = [flipping[0] for _ in range(32)]
    assert all(torch.equal(d, plain) or torch.equal(d, plain.flip(-1)) for d in draws)
    assert 4 < sum(torch.equal(d, plain) for d in draws) < 28
    torch.manual_seed(0)
    assert all(torch.equal(a, flipping[0]) for a in draws)  # reproducible by torch's seed


def _corrupt_files(folder: Path) -> list[Path]:
    """Garbage bytes, a truncated JPEG (PIL's verify() misses it), an empty file, a truncated PNG."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    encoded = {}
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, fmt)
        encoded[fmt] = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "garbage.png": b"this is not an image at all",
        "truncated.jpg": encoded["JPEG"][: len(encoded["JPEG"]) // 2],
        "empty.webp": b"",
        "truncated.png": encoded["PNG"][: len(encoded["PNG"]) // 2],
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in files]


def test_corrupt_files_are_skipped_with_one_warning_each_and_a_count(tmp_path: Path) -> None:
    bad = _corrupt_files(tmp_path)
    good = _save(tmp_path / "good.jpg", _solid(32, 32, (200, 100, 50)))
    dataset, messages = _record_warnings(lambda: ImageFolder(tmp_path, size=16))
    assert dataset.paths == [good] and sorted(dataset.skipped) == sorted(bad)
    for path in bad:
        assert sum(str(path) in m for m in messages) == 1, (path, messages)
    assert sum("skipped 4 unreadable of 5" in m for m in messages) == 1
    assert len(messages) == len(bad) + 1
    assert dataset[0].shape == (3, 16, 16)


def test_clean_folder_gives_no_warning(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", _solid(8, 8, (1, 2, 3)))
    _, messages = _record_warnings(lambda: ImageFolder(tmp_path, size=8))
    assert messages == []


def test_folders_without_a_usable_image_fail_before_training(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no usable image in .*empty"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no usable image"):
        ImageFolder(tmp_path / "text")
    _corrupt_files(tmp_path / "broken")
    with pytest.raises(ValueError, match="4 unreadable"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        ImageFolder(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        ImageFolder(tmp_path / "text" / "readme.txt")
    with pytest.raises(ValueError, match="size"):
        ImageFolder(tmp_path / "text", size=0)


def test_cyclegan_layout_and_explicit_folders(tmp_path: Path) -> None:
    for name in ("trainA", "trainB", "testA"):
        (tmp_path / name).mkdir()
    assert resolve_unpaired_folders(tmp_path) == (tmp_path / "trainA", tmp_path / "trainB")
    with pytest.raises(FileNotFoundError, match="testB"):
        resolve_unpaired_folders(tmp_path, split="test")
    (tmp_path / "testB").mkdir()
    assert resolve_unpaired_folders(str(tmp_path), split="test") == (tmp_path / "testA", tmp_path / "testB")
    assert resolve_unpaired_folders(dir_a=tmp_path / "testA", dir_b=tmp_path / "trainB") == (
        tmp_path / "testA",
        tmp_path / "trainB",
    )
    with pytest.raises(ValueError, match="not both"):
        resolve_unpaired_folders(tmp_path, dir_a=tmp_path / "trainA")
    with pytest.raises(ValueError, match="dir_b=None"):
        resolve_unpaired_folders(dir_a=tmp_path / "trainA")
    with pytest.raises(FileNotFoundError, match="dir_b"):
        resolve_unpaired_folders(dir_a=tmp_path / "trainA", dir_b=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="root"):
        resolve_unpaired_folders(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        resolve_unpaired_folders(tmp_path, split="val")
