"""Translating a folder: any image size, same base names, checkpoints in the trainer's format."""

from __future__ import annotations

import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reference.data import UnreadableImageWarning
from reference.models import ResnetGenerator
from reference.translate import (
    generator_kwargs_from_state_dict,
    load_generator,
    main,
    pad_to_multiple,
    translate_folder,
    translate_images,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR_KWARGS = {"in_channels": 3, "out_channels": 3, "width": 4, "n_blocks": 1}


class Negate(nn.Module):
    """A pointwise 'generator' (x -> -x) that insists on ResnetGenerator's input sizes.

    Its output pixel depends on the input pixel at the same place only, so any shift or
    wrong crop in the padding shows up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        assert height % 4 == 0 and width % 4 == 0 and height >= 8 and width >= 8
        self.sizes.append((height, width))
        return -x


def _random_image(path: Path, height: int, width: int, seed: int, **options) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return pixels


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    generator = ResnetGenerator(**GENERATOR_KWARGS)
    with torch.no_grad():  # move away from the init so that a wrong load shows
        for parameter in generator.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path / "latest.pt"
    torch.save(
        {"generator": generator.state_dict(), "generator_kwargs": GENERATOR_KWARGS, "config": {"size": 64}, "step": 3},
        path,
    )
    return path


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    _random_image(folder / "odd.png", 37, 53, 0)
    _random_image(folder / "tiny.png", 3, 5, 1)
    _random_image(folder / "square.jpg", 64, 64, 2, quality=90)
    _random_image(folder / "wide.webp", 20, 41, 3, lossless=True)
    return folder


def test_odd_sizes_come_back_at_their_size_with_the_same_base_names(
    checkpoint: Path, odd_folder: Path, tmp_path: Path
) -> None:
    written = translate_folder(load_generator(checkpoint), odd_folder, tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["odd.png", "square.png", "tiny.png", "wide.png"]
    for path in written:
        source = next(odd_folder.glob(f"{path.stem}.*"))
        with Image.open(source) as original, Image.open(path) as translated:
            assert translated.format == "PNG" and translated.mode == "RGB"
            assert translated.size == original.size


def test_padding_is_cropped_back_without_a_shift(tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    originals = {
        name: _random_image(folder / f"{name}.png", h, w, seed)
        for seed, (name, h, w) in enumerate([("odd", 37, 53), ("tiny", 3, 5), ("exact", 12, 16), ("tall", 61, 9)])
    }
    negate = Negate()
    written = translate_folder(negate, folder, tmp_path / "out", progress=False)
    for path in written:
        assert np.array_equal(_read(path), 255 - originals[path.stem].astype(np.int16))
    assert sorted(negate.sizes) == sorted([(40, 56), (8, 8), (12, 16), (64, 12)])


def test_translation_equals_the_generator_on_a_ready_sized_image(checkpoint: Path, tmp_path: Path) -> None:
    pixels = _random_image(tmp_path / "in" / "x.png", 32, 24, 0)
    generator = load_generator(checkpoint)
    expected = generator(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    expected = ((expected + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).detach().numpy()
    (path,) = translate_folder(generator, tmp_path / "in", tmp_path / "out", progress=False)
    assert np.abs(_read(path) - expected).max() <= 1
    assert np.abs(_read(path) - pixels.astype(np.int16)).mean() > 10  # it did translate


def test_load_generator_restores_the_saved_weights(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)["generator"]
    generator = load_generator(checkpoint)
    assert not generator.training
    for key, value in generator.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # a bare state_dict, as saved from a DistributedDataParallel-wrapped model
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in saved.items()}, bare)
    assert generator_kwargs_from_state_dict(saved) == GENERATOR_KWARGS
    assert all(torch.equal(v, saved[k]) for k, v in load_generator(bare).state_dict().items())
    big = ResnetGenerator(in_channels=1, out_channels=2, width=8, n_blocks=3).state_dict()
    assert generator_kwargs_from_state_dict(big) == {"in_channels": 1, "out_channels": 2, "width": 8, "n_blocks": 3}


def test_batches_and_resizing_keep_names_and_sizes(checkpoint: Path, odd_folder: Path, tmp_path: Path) -> None:
    generator = load_generator(checkpoint)
    one = translate_folder(generator, odd_folder, tmp_path / "one", progress=False)
    for name in ("copy1", "copy2"):  # equal sizes share a batch
        (odd_folder / f"{name}.png").write_bytes((odd_folder / "odd.png").read_bytes())
    batched = translate_folder(generator, odd_folder, tmp_path / "batched", batch_size=3, progress=False)
    assert sorted(p.name for p in batched) == sorted([*(p.name for p in one), "copy1.png", "copy2.png"])
    for path in one:
        assert np.abs(_read(path) - _read(tmp_path / "batched" / path.name)).max() <= 1
    assert np.abs(_read(tmp_path / "batched" / "copy2.png") - _read(tmp_path / "one" / "odd.png")).max() <= 1
    _random_image(tmp_path / "single" / "odd.png", 37, 53, 0)
    (resized,) = translate_folder(generator, tmp_path / "single", tmp_path / "resized", size=16, progress=False)
    assert _read(resized).shape == (37, 53, 3)


def test_generator_gets_its_training_mode_back(tmp_path: Path) -> None:
    _random_image(tmp_path / "in" / "a.png", 8, 8, 0)
    generator = ResnetGenerator(**GENERATOR_KWARGS).train()
    translate_folder(generator, tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    assert generator.training


def test_unreadable_inputs_are_skipped_with_a_warning(checkpoint: Path, tmp_path: Path) -> None:
    _random_image(tmp_path / "in" / "good.png", 9, 9, 0)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = translate_folder(load_generator(checkpoint), tmp_path / "in", tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["good.png"]
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert sum("broken.jpg" in m for m in messages) == 1 and any("skipped 1 unreadable of 2" in m for m in messages)


def test_clear_errors_before_any_work(checkpoint: Path, tmp_path: Path) -> None:
    generator = Negate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        translate_folder(generator, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing"):
        translate_folder(generator, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        translate_folder(generator, tmp_path / "broken", tmp_path / "out")
    _random_image(tmp_path / "twins" / "a.png", 8, 8, 0)
    _random_image(tmp_path / "twins" / "a.jpg", 8, 8, 0)
    with pytest.raises(ValueError, match="both be written as a.png"):
        translate_folder(generator, tmp_path / "twins", tmp_path / "out")
    with pytest.raises(ValueError, match="differ from the input"):
        translate_folder(generator, tmp_path / "twins", tmp_path / "twins")
    with pytest.raises(ValueError, match="batch_size"):
        translate_folder(generator, tmp_path / "twins", tmp_path / "out", batch_size=0)
    assert not (tmp_path / "out").exists() and generator.sizes == []
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_generator(tmp_path / "nothing.pt")
    torch.save({"step": torch.tensor(1), "optimizer": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="generator"):
        load_generator(tmp_path / "other.pt")


def test_pad_to_multiple_reflects_at_the_bottom_right() -> None:
    image = torch.arange(2 * 9 * 10, dtype=torch.float32).view(1, 2, 9, 10)
    padded = pad_to_multiple(image)
    assert padded.shape == (1, 2, 12, 12)
    assert torch.equal(padded[..., :9, :10], image)
    assert torch.equal(padded[..., 9, :10], image[..., 7, :])  # reflection, the edge row not repeated
    assert pad_to_multiple(torch.zeros(1, 3, 8, 16)).shape == (1, 3, 8, 16)
    assert pad_to_multiple(torch.zeros(1, 3, 1, 2)).shape == (1, 3, 8, 8)
    assert translate_images(Negate(), image[:, :1].expand(1, 3, 9, 10)).shape == (1, 3, 9, 10)


def test_command_line_in_process(
    checkpoint: Path, odd_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(odd_folder),
                "--output",
                str(tmp_path / "cli"),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "wrote 4 images" in captured.out and "translating" in captured.err  # the progress bar
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["odd.png", "square.png", "tiny.png", "wide.png"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "absent.pt"), "--input", str(odd_folder), "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "x")])
    assert "no image files" in capsys.readouterr().err


def test_runs_as_a_script_from_anywhere_and_as_a_module(
    checkpoint: Path, odd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "reference" / "translate.py"),
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(odd_folder),
            "--output",
            str(tmp_path / "script"),
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr
    assert len(list((tmp_path / "script").glob("*.png"))) == 4
    arguments = [
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(odd_folder),
        "--output",
        str(tmp_path / "module"),
        "--no-progress",
    ]
    monkeypatch.setattr(sys, "argv", ["translate", *arguments])
    monkeypatch.delitem(sys.modules, "reference.translate")  # run it fresh, as `-m` does
    with pytest.raises(SystemExit) as exit_info:  # what `python -m reference.translate` runs
        runpy.run_module("reference.translate", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert len(list((tmp_path / "module").glob("*.png"))) == 4


def test_a_run_folder_stands_for_its_latest_checkpoint(checkpoint: Path, odd_folder: Path, tmp_path: Path) -> None:
    run_folder = checkpoint.parent  # the fixture writes RUN/latest.pt, as the trainer does
    from_folder, from_file = load_generator(run_folder), load_generator(checkpoint)
    assert all(torch.equal(v, from_file.state_dict()[k]) for k, v in from_folder.state_dict().items())
    argv = ["--checkpoint", str(run_folder), "--input", str(odd_folder), "--output", str(tmp_path / "cli")]
    argv.append("--no-progress")
    assert main(argv) == 0
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        load_generator(tmp_path / "not_a_run")
