"""Image folders, the CycleGAN layout, the toy-street benchmark and its scoring."""

from __future__ import annotations

import io
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from reference.data import (
    CAR,
    CLASSES,
    COLOUR_JITTER,
    HOOD,
    JITTER_RADIUS,
    LANE,
    PALETTE_A,
    PALETTE_B,
    ROAD,
    SKY,
    TREE,
    ImageFolder,
    ToyStreets,
    UnreadableImageWarning,
    classify_pixels,
    paint_labels,
    resolve_unpaired_folders,
    score_translations,
)

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


# ---------------------------------------------------------------------------------------------
# Toy streets
# ---------------------------------------------------------------------------------------------


def _batch(domain: str, count: int = 48, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ToyStreets(domain, size=size, length=count, seed=seed)
    images, labels = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), torch.stack(labels)


def test_toy_streets_are_deterministic_by_seed_and_index() -> None:
    dataset = ToyStreets("A", size=32, length=20, seed=7)
    forward = [dataset[i] for i in range(20)]
    backward = [ToyStreets("a", size=32, length=20, seed=7)[i] for i in reversed(range(20))][::-1]
    for (image, labels), (image2, labels2) in zip(forward, backward):
        assert torch.equal(image, image2) and torch.equal(labels, labels2)
    assert not torch.equal(forward[0][0], forward[1][0])
    assert not torch.equal(forward[0][0], ToyStreets("A", size=32, length=20, seed=8)[0][0])
    assert not torch.equal(forward[0][1], ToyStreets("B", size=32, length=20, seed=7)[0][1])
    assert ToyStreets("b", size=32, length=1).domain == "B"


def test_toy_streets_are_the_same_in_dataloader_workers() -> None:
    dataset = ToyStreets("B", size=32, length=12, seed=3)
    images, labels = zip(*(dataset[i] for i in range(12)))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    loaded_images, loaded_labels = map(torch.cat, zip(*loader))
    assert torch.equal(loaded_images, torch.stack(images)) and torch.equal(loaded_labels, torch.stack(labels))


@pytest.mark.parametrize("domain", ["A", "B"])
def test_toy_images_are_flat_jittered_paintings_of_their_labels(domain: str) -> None:
    images, labels = _batch(domain, count=24)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (24, 3, 64, 64) and labels.shape == (24, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    palette = PALETTE_A if domain == "A" else PALETTE_B
    painted = paint_labels(labels, palette)
    rgb, painted_rgb = (images + 1) / 2, (painted + 1) / 2  # [0, 1]
    assert (rgb - painted_rgb).abs().max() <= COLOUR_JITTER + 1e-6
    road_colours = set()
    for image, label_map in zip(rgb, labels):
        for k in label_map.unique():
            pixels = image[:, label_map == k]
            assert torch.equal(pixels, pixels[:, :1].expand_as(pixels))  # one colour per class per image
        road_colours.add(tuple(image[:, label_map == ROAD][:, 0].tolist()))
    assert len(road_colours) == len(images)  # the jitter is per image


def test_toy_domains_differ_as_game_and_city_streets() -> None:
    images_a, labels_a = _batch("A")
    images_b, labels_b = _batch("B")
    rgb_a, rgb_b = (images_a + 1) / 2, (images_b + 1) / 2
    for labels in (labels_a, labels_b):  # every scene has lanes and at least one car
        assert (labels == LANE).flatten(1).any(1).all() and (labels == CAR).flatten(1).any(1).all()
    lane_a = rgb_a.permute(1, 0, 2, 3)[:, labels_a == LANE]
    lane_b = rgb_b.permute(1, 0, 2, 3)[:, labels_b == LANE]
    assert (lane_a[0] > 0.9).all() and (lane_a[1] > 0.7).all() and (lane_a[2] < 0.1).all()  # yellow
    assert (lane_b > 0.9).all()  # white
    # B: the same hood at the bottom of every image; A: never a hood
    hood = labels_b == HOOD
    assert hood[0].any() and torch.equal(hood, hood[:1].expand_as(hood))
    assert not hood[:, : int(0.8 * 64)].any()
    assert not (labels_a == HOOD).any()
    # A: much open sky, few trees above the road; B: less sky, a canopy of trees on top
    sky_a, sky_b = (labels_a == SKY).float().mean(), (labels_b == SKY).float().mean()
    assert sky_a > 0.4 and sky_b < 0.3
    assert (labels_a[:, :32] == TREE).float().mean() < 0.05 < 0.4 < (labels_b[:, :32] == TREE).float().mean()
    assert not (labels_a[:, :6] == TREE).any() and (labels_b[:, :6] == TREE).float().mean() > 0.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": "C"}, "domain"),
        ({"size": 8}, "size"),
        ({"length": 0}, "length"),
        ({"seed": -1}, "seed"),
        ({"lane_width": 0}, "lane_width"),
        ({"lane_width": 11.0}, "lane_width"),
        ({"lane_width": True}, "lane_width"),
    ],
)
def test_toy_streets_reject_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ToyStreets(**{"domain": "A", **kwargs})


def test_lane_width_widens_the_lanes_and_nothing_else() -> None:
    """Same scene, same seed: wider lane lines only take pixels the thin ones did not, and only lanes grow."""
    thin = torch.stack([ToyStreets("A", size=32, length=8, seed=9)[i][1] for i in range(8)])
    wide = torch.stack([ToyStreets("A", size=32, length=8, seed=9, lane_width=2.5)[i][1] for i in range(8)])
    assert ((thin == LANE) <= (wide == LANE)).all()
    assert (wide == LANE).sum() > 1.8 * (thin == LANE).sum()
    changed = thin != wide
    assert (wide[changed] == LANE).all()


def test_toy_streets_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        ToyStreets("A", size=16, length=3)[3]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _figures(scores: dict) -> tuple[float, float, float]:
    return scores["semantic_flip_rate"], scores["lane_accuracy"], scores["realism"]


def test_ideal_translation_and_real_b_images_score_perfectly() -> None:
    _, labels_a = _batch("A", count=16)
    assert _figures(score_translations(paint_labels(labels_a, PALETTE_B), labels_a)) == (0.0, 1.0, 1.0)
    images_b, labels_b = _batch("B", count=16)
    scores = score_translations(images_b, labels_b)
    assert _figures(scores) == (0.0, 1.0, 1.0)
    assert 0 < scores["palette_distance"] <= JITTER_RADIUS


def test_output_equals_input_keeps_semantics_but_not_lanes_nor_realism() -> None:
    images_a, labels_a = _batch("A", count=32, seed=5)
    scores = score_translations(images_a, labels_a)
    assert _figures(scores) == (0.0, 0.0, 0.0)
    assert scores["palette_distance"] > 0.2


def test_trees_painted_into_the_sky_count_exactly() -> None:
    _, labels = _batch("A", count=8)
    translated = paint_labels(labels, PALETTE_B)
    generator = torch.Generator().manual_seed(0)
    painted = (labels == SKY) & (torch.rand(labels.shape, generator=generator) < 0.3)
    translated = torch.where(painted[:, None], paint_labels(torch.full_like(labels, TREE)), translated)
    scores = score_translations(translated, labels)
    expected = painted.sum().item() / (labels != LANE).sum().item()
    assert scores["semantic_flip_rate"] == pytest.approx(expected, rel=1e-12)
    assert scores["flipped_into"]["tree"] == pytest.approx(expected, rel=1e-12)
    assert scores["flip_rate_by_class"]["sky"] == pytest.approx(painted.sum().item() / (labels == SKY).sum().item())
    assert scores["lane_accuracy"] == 1.0 and scores["realism"] == 1.0


def test_a_hallucinated_hood_is_a_flip_and_hides_lanes() -> None:
    _, labels_a = _batch("A", count=8)
    _, labels_b = _batch("B", count=1)
    hood = (labels_b[0] == HOOD).expand_as(labels_a)
    translated = paint_labels(torch.where(hood, HOOD, labels_a), PALETTE_B)
    scores = score_translations(translated, labels_a)
    non_lane, lane = labels_a != LANE, labels_a == LANE
    expected_flip = (hood & non_lane).sum().item() / non_lane.sum().item()
    assert expected_flip > 0.05
    assert scores["semantic_flip_rate"] == pytest.approx(expected_flip, rel=1e-12)
    assert scores["flipped_into"]["hood"] == pytest.approx(expected_flip, rel=1e-12)
    assert scores["lane_accuracy"] == pytest.approx(1 - (hood & lane).sum().item() / lane.sum().item(), rel=1e-12)


def test_lost_cars_are_flips() -> None:
    _, labels = _batch("A", count=8)
    translated = paint_labels(torch.where(labels == CAR, ROAD, labels), PALETTE_B)
    scores = score_translations(translated, labels)
    assert scores["flip_rate_by_class"]["car"] == 1.0
    assert scores["flip_rate_by_class"]["sky"] == 0.0
    expected = (labels == CAR).sum().item() / (labels != LANE).sum().item()
    assert scores["semantic_flip_rate"] == pytest.approx(expected, rel=1e-12)
    assert scores["flipped_into"]["road"] == pytest.approx(expected, rel=1e-12)


def test_realism_falls_as_outputs_leave_the_palette() -> None:
    _, labels = _batch("A", count=8)
    ideal = paint_labels(labels, PALETTE_B)
    noise = torch.randn(ideal.shape, generator=torch.Generator().manual_seed(0))
    realism, distance = [], []
    for sigma in (0.0, 0.01, 0.03, 0.1, 0.3):  # noise std in [0, 1] units
        scores = score_translations((ideal + 2 * sigma * noise).clamp(-1, 1), labels)
        realism.append(scores["realism"])
        distance.append(scores["palette_distance"])
    assert realism[0] == 1.0 and realism[-1] < 0.1
    assert all(a > b for a, b in itertools.pairwise(realism[1:]))  # sigma 0.01 keeps every pixel within tolerance
    assert distance == sorted(distance) and distance[0] == 0.0


def _naive_scores(translated: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Pixel by pixel, with B's palette in [0, 1] RGB."""
    names = list(PALETTE_B)
    flips = non_lane = lane_hits = lanes = realistic = pixels = 0
    for n, y, x in np.ndindex(*labels.shape):
        rgb = (translated[n, :, y, x].astype(np.float64) + 1) / 2
        distances = [np.linalg.norm(rgb - np.array(PALETTE_B[name])) for name in names]
        predicted = CLASSES.index(names[int(np.argmin(distances))])
        label = labels[n, y, x]
        pixels += 1
        realistic += min(distances) <= JITTER_RADIUS
        if label == LANE:
            lanes += 1
            lane_hits += predicted == LANE
        else:
            non_lane += 1
            flips += predicted != label
    return flips / non_lane, lane_hits / lanes, realistic / pixels


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([0.02, 0.1, 0.5]))
def test_scores_agree_with_a_pixel_by_pixel_count(seed: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=(2, 5, 6))
    labels[0, 0, 0], labels[1, 0, 0] = LANE, SKY  # both groups are never empty
    noisy_palette = np.array([PALETTE_B[rng.choice(list(PALETTE_B))] for _ in range(60)]).reshape(2, 5, 6, 3)
    translated = (noisy_palette + rng.normal(0, spread, size=noisy_palette.shape)).clip(0, 1).transpose(
        0, 3, 1, 2
    ) * 2 - 1
    translated = translated.astype(np.float32)
    scores = score_translations(torch.from_numpy(translated), torch.from_numpy(labels))
    flip, lane, realism = _naive_scores(translated, labels)
    assert scores["semantic_flip_rate"] == pytest.approx(flip, abs=1e-12)
    assert scores["lane_accuracy"] == pytest.approx(lane, abs=1e-12)
    assert scores["realism"] == pytest.approx(realism, abs=1e-12)
    assert sum(scores["flipped_into"].values()) == pytest.approx(flip)
    assert sum(scores["predicted_fraction"].values()) == pytest.approx(1.0)


def test_classify_pixels_does_not_depend_on_the_chunk() -> None:
    images = torch.rand(5, 3, 7, 9) * 2 - 1
    classes, distances = classify_pixels(images, chunk=64)
    classes_1, distances_1 = classify_pixels(images, chunk=1)
    assert torch.equal(classes, classes_1) and torch.equal(distances, distances_1)
    assert classes.shape == distances.shape == (5, 7, 9)


@pytest.mark.parametrize(
    ("translated", "labels", "match"),
    [
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long), "matching labels"),
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), "matching labels"),
        (torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), "integer"),
        (torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 6), "class ids"),
        (torch.full((1, 3, 2, 2), float("nan")), torch.zeros(1, 2, 2, dtype=torch.long), "NaN"),
    ],
)
def test_score_translations_rejects_bad_inputs(translated: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        score_translations(translated, labels)


def test_paint_labels_shapes_and_missing_colours() -> None:
    labels = torch.tensor([[SKY, LANE], [CAR, HOOD]])
    painted = paint_labels(labels)
    assert painted.shape == (3, 2, 2)
    assert torch.allclose(painted[:, 1, 1], torch.tensor(PALETTE_B["hood"]) * 2 - 1)
    with pytest.raises(ValueError, match="hood"):
        paint_labels(labels, PALETTE_A)
    with pytest.raises(ValueError, match="integer"):
        paint_labels(labels.float())
