"""Every PIL image mode loads with the values of an 8-bit twin; files that fail to decode late are skipped."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reference.data import (
    ImageFolder,
    UnreadableImageWarning,
    is_readable_image,
    load_image,
)
from reference.translate import translate_folder

RNG = np.random.default_rng(11)
RGB = RNG.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)  # the 8-bit picture every twin is made of
GREY = RGB[..., 0]
ALPHA = RNG.integers(0, 256, size=(9, 7), dtype=np.uint8)
ALPHA[0, 0], ALPHA[0, 1] = 0, 255  # at least one fully transparent and one opaque pixel


def _as_tensor(rgb: np.ndarray) -> torch.Tensor:
    """The straightforward reference: (H, W, 3) 8-bit -> (3, H, W) in [-1, 1]."""
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.rint(rgb.astype(np.float64) * alpha[..., None] / 255.0).astype(np.uint8)


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    """A "P" image of 4 colours and the RGB picture it shows."""
    colours = np.array([[10, 20, 30], [200, 0, 90], [255, 255, 255], [0, 128, 64]], dtype=np.uint8)
    indices = (GREY % 4).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(colours.flatten().tolist())
    return image, colours[indices]


def _cases() -> dict[str, tuple[Image.Image, str, np.ndarray]]:
    """mode -> (image, file suffix, the 8-bit RGB twin it must load as)."""
    palette, palette_rgb = _palette_image()
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1  # colour index 1 is transparent
    index_is_one = (GREY % 4) == 1
    cmyk = np.concatenate([255 - RGB, np.zeros((9, 7, 1), dtype=np.uint8)], axis=2)
    bits = GREY > 127
    return {
        "1": (Image.fromarray(bits), ".png", _grey_rgb(np.where(bits, 255, 0).astype(np.uint8))),
        "L": (Image.fromarray(GREY), ".png", _grey_rgb(GREY)),
        "LA": (Image.fromarray(np.stack([GREY, ALPHA], axis=2), mode="LA"), ".png", _on_black(_grey_rgb(GREY), ALPHA)),
        "P": (palette, ".png", palette_rgb),
        "P+transparency": (
            transparent_palette,
            ".png",
            np.where(index_is_one[..., None], 0, palette_rgb).astype(np.uint8),
        ),
        "RGB": (Image.fromarray(RGB), ".png", RGB),
        "RGBA": (Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], axis=2)), ".png", _on_black(RGB, ALPHA)),
        "CMYK": (Image.fromarray(cmyk, mode="CMYK"), ".tif", RGB),
        "I;16": (Image.fromarray(GREY.astype(np.uint16) * 257), ".png", _grey_rgb(GREY)),
        "I": (Image.fromarray(GREY.astype(np.int32) * 257, mode="I"), ".tif", _grey_rgb(GREY)),
        "F": (Image.fromarray(GREY.astype(np.float32) / 255, mode="F"), ".tif", _grey_rgb(GREY)),
    }


@pytest.mark.parametrize("mode", list(_cases()))
def test_every_mode_loads_as_its_eight_bit_twin(mode: str, tmp_path: Path) -> None:
    image, suffix, twin = _cases()[mode]
    path = tmp_path / f"picture{suffix}"
    image.save(path)
    with Image.open(path) as reopened:  # the file really holds the mode under test
        assert reopened.mode == mode.split("+")[0], reopened.mode
    loaded = load_image(path)
    assert torch.equal(loaded, _as_tensor(twin))
    twin_path = tmp_path / "twin.png"
    Image.fromarray(twin).save(twin_path)
    assert torch.equal(load_image(path, size=12), load_image(twin_path, size=12))  # resizing too


def _saved_and_loaded(image: Image.Image, path: Path) -> torch.Tensor:
    image.save(path)
    return load_image(path)


def test_sixteen_bit_uses_all_sixteen_bits_not_saturating(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    loaded = _saved_and_loaded(Image.fromarray(ramp), tmp_path / "ramp.png")
    expected = np.rint(ramp / 65535 * 255) / 127.5 - 1
    assert np.allclose(loaded[0].numpy(), expected, atol=1e-6)
    assert float(loaded.mean()) == pytest.approx(0.0, abs=0.02)  # mid-grey on average, not white


def test_float_and_integer_images_clip_out_of_range_values(tmp_path: Path) -> None:
    values = np.array([[-1.0, 0.5, 2.0, np.nan]], dtype=np.float32)
    loaded = _saved_and_loaded(Image.fromarray(values, mode="F"), tmp_path / "float.tif")
    assert loaded[0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0, -1.0], abs=1e-6)
    integers = np.array([[-5, 65535, 70000]], dtype=np.int32)
    loaded = _saved_and_loaded(Image.fromarray(integers, mode="I"), tmp_path / "int.tif")
    assert loaded[0, 0].tolist() == [-1.0, 1.0, 1.0]


def test_translation_reads_sixteen_bit_images_too(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(GREY.astype(np.uint16) * 257).save(tmp_path / "in" / "deep.png")
    Image.fromarray(_grey_rgb(GREY)).save(tmp_path / "twin.png")
    written = translate_folder(torch.nn.Identity(), tmp_path / "in", tmp_path / "out", progress=False)
    assert np.array_equal(np.asarray(Image.open(written[0])), _grey_rgb(GREY))


# ---------------------------------------------------------------------------------------------
# Files that pass the start-up check but fail to decode later
# ---------------------------------------------------------------------------------------------


def corrupt_png_idat(data: bytes) -> bytes:
    """A PNG whose IDAT chunks hold garbage under correct CRCs: ``verify()`` passes, decoding fails."""
    out, position = bytearray(data[:8]), 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            body = bytes(b ^ 0x5A for b in body)
        out += struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        position += 12 + length
    return bytes(out)


def _folder_with_a_late_failure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    bad = folder / "1.png"
    bad.write_bytes(corrupt_png_idat(bad.read_bytes()))
    return bad


def test_corrupt_compressed_data_passes_the_cheap_check_and_fails_to_decode(tmp_path: Path) -> None:
    bad = _folder_with_a_late_failure(tmp_path)
    assert is_readable_image(bad)
    with pytest.raises(OSError, match="1.png"):
        load_image(bad)


def test_a_file_failing_during_training_is_skipped_with_a_warning_and_counted(tmp_path: Path) -> None:
    bad = _folder_with_a_late_failure(tmp_path)
    dataset = ImageFolder(tmp_path, size=8)
    assert len(dataset) == 4 and dataset.unreadable_count == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(4)] + [dataset[1]]
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == 1 and str(bad) in messages[0]  # warned once, though read twice
    assert torch.equal(items[1], items[2]) and torch.equal(items[4], items[2])  # the next file stands in
    assert dataset.unreadable_count == 1 and dataset.unreadable_paths == [bad]


def test_the_count_reaches_the_main_process_from_dataloader_workers(tmp_path: Path) -> None:
    _folder_with_a_late_failure(tmp_path)
    dataset = ImageFolder(tmp_path, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert sum(len(b) for b in batches) == 4
    assert dataset.unreadable_count == 1


def test_a_folder_where_nothing_decodes_raises_naming_it(tmp_path: Path) -> None:
    bad = _folder_with_a_late_failure(tmp_path)
    for path in set(tmp_path.glob("*.png")) - {bad}:
        path.write_bytes(corrupt_png_idat(path.read_bytes()))
    dataset = ImageFolder(tmp_path, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        with pytest.raises(OSError, match="none of the 4 image files decodes"):
            dataset[0]


def test_cached_images_are_exactly_a_fresh_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    cached, uncached = ImageFolder(tmp_path, size=8), ImageFolder(tmp_path, size=8, cache_bytes=0)
    first = [cached[i] for i in range(6)]
    assert len(cached._cache) == 6 and not uncached._cache
    for index in range(6):
        assert torch.equal(cached[index], first[index]) and torch.equal(cached[index], uncached[index])
    cached[0].add_(1.0)  # a caller changing its tensor does not change the cache
    assert torch.equal(cached[0], first[0])
    small = ImageFolder(tmp_path, size=8, cache_bytes=2 * 3 * 8 * 8)  # room for two images
    [small[i] for i in range(6)]
    assert len(small._cache) == 2
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0, got -1"):
        ImageFolder(tmp_path, size=8, cache_bytes=-1)
