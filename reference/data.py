"""Data for the reference trainer: unpaired image folders and the toy-street benchmark.

Images are float32 tensors (3, size, size) with values in [-1, 1] (``pixel / 127.5 - 1``).
Every PIL mode is read with its own range (:func:`to_rgb`): 16-bit and 32-bit integer images
are scaled by 255 / 65535, floating-point images are taken in [0, 1], and transparency is
composited on black.

Toy streets mimic the paper's GTA -> Cityscapes task with a known ground truth. Every scene
is a flat-coloured street seen from a car, drawn from a label map with classes
:data:`CLASSES`; domain A ("game") and domain B ("city") differ in layout and palette:

=========  ==========================================  ============================================
           A, "game"                                   B, "city"
=========  ==========================================  ============================================
horizon    45-60 % of the height: much open sky        30-40 %: less sky
road       perspective trapezoid, grass verges beside  the same
lanes      YELLOW: dashed centre line, two edge lines  WHITE: the same lines
cars       1-3 boxes with a cabin, on the road         1-3, the same
trees      at most one tree on a verge                 trees along both sides and a canopy on top
hood       none                                        the same hood shape at the bottom, always
colours    saturated palette, jittered per image       muted palette, jittered per image
=========  ==========================================  ============================================

"tree" is the vegetation class: trees and the grass verges. Scoring a translation G(a) of an A
image classifies every output pixel by the nearest colour of B's palette and compares it with
a's label map (:func:`score_translations`): the ideal translator, which repaints a's label map
in B's palette (``paint_labels(labels, PALETTE_B)``), scores a flip rate of 0, a lane
accuracy of 1 and a realism of 1; "output equals input" scores a flip rate of 0, a lane
accuracy of 0 and a realism of 0.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "CLASSES",
    "IMAGE_EXTENSIONS",
    "PALETTE_A",
    "PALETTE_B",
    "ImageFolder",
    "TooManyUnreadableImagesError",
    "ToyStreets",
    "UnreadableImageWarning",
    "classify_pixels",
    "is_readable_image",
    "list_images",
    "load_image",
    "paint_labels",
    "resolve_unpaired_folders",
    "score_translations",
    "to_rgb",
    "unreadable_count",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


class UnreadableImageWarning(UserWarning):
    """An image file was skipped because PIL could not open or verify it."""


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Files of ``folder`` (and its subfolders with ``recursive``) whose extension is in
    :data:`IMAGE_EXTENSIONS`, sorted."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def is_readable_image(path: str | os.PathLike[str], size: int = 256) -> bool:
    """Whether PIL can read ``path``, checked cheaply.

    JPEG: decoded at the smallest DCT scale that still gives at least ``size`` pixels a side
    (``draft``), because ``verify()`` does not look at JPEG scan data and so misses truncated
    files. PNG and WebP: ``verify()``, which checks every chunk's checksum / the container
    without decoding pixels.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (size, size))
                image.load()
            else:
                image.verify()
    except Exception:  # PIL raises a wide variety of exceptions for damaged files
        return False
    return True


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, with each mode read in its own range.

    - "1", "L", "P", "RGB", "CMYK", "YCbCr", ...: PIL's own conversion to RGB.
    - 16-bit ("I;16", "I;16B", ...) and 32-bit integer ("I", how older Pillow versions open
      16-bit PNGs) greyscale: ``round(value * 255 / 65535)``, values outside [0, 65535] clipped.
    - "F" (32-bit float) greyscale: values in [0, 1], ``round(value * 255)``, clipped; NaN -> 0.
    - With transparency ("LA", "PA", "RGBA", "La", "RGBa", or a palette / "L" / "RGB" image
      with a transparent colour): composited on black, ``round(colour * alpha / 255)``, so a
      fully transparent pixel is black whatever colour the file stores under it.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        composited = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # exact rounding of colour * alpha / 255
        return Image.fromarray(composited.astype(np.uint8))
    return image.convert("RGB")


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(path: str | os.PathLike[str], size: int | None = None) -> torch.Tensor:
    """Image file -> float32 (3, H, W) in [-1, 1] (``pixel / 127.5 - 1``), RGB, optionally resized
    to ``size x size`` (bicubic).

    Any PIL mode is read in its own range (:func:`to_rgb`: 16-bit scaled by 255 / 65535, float
    in [0, 1], transparency composited on black). Raises OSError naming the file if PIL cannot
    decode it.
    """
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
            if size is not None:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
    except Exception as error:
        raise OSError(f"cannot decode image file {path}: {error}") from error
    return _pil_to_tensor(image)


class TooManyUnreadableImagesError(RuntimeError):
    """More image files failed to decode during training than the allowed fraction."""


class ImageFolder(Dataset):
    """The images of one folder, resized to ``size x size`` (bicubic), as (3, size, size) in [-1, 1].

    Files with an extension in :data:`IMAGE_EXTENSIONS` (any case) are taken in sorted path
    order, from ``folder`` only or, with ``recursive=True``, from its subfolders too. Every
    file is checked at construction (:func:`is_readable_image`, cheap); each one that fails is
    skipped with one :class:`UnreadableImageWarning` naming it, and when any was skipped a
    last warning gives the count. A missing folder raises ``FileNotFoundError``, a folder
    without a usable image ``ValueError``, both before any training work.

    A file that passes that check but fails to decode when it is read (corrupt compressed data
    behind valid checksums) is skipped: one :class:`UnreadableImageWarning` names it and the
    next readable file in order stands in for it, so training continues. Such files are marked
    in :attr:`unreadable`, a bool tensor in shared memory, so that the count
    (:attr:`unreadable_count`) is seen by the training process even when DataLoader workers
    read the files. With ``flip=True``
    an image is mirrored left-right with probability 1/2, drawn from torch's global RNG, so
    runs are reproducible by seed (DataLoader workers get seeds derived from it too).

    Decoded images are kept in memory (as uint8, per process) while they fit in ``cache_bytes``
    (256 MiB: about 1,300 images at 256 px, every image of a small data set), so a file is decoded
    once instead of once per epoch; the tensors are exactly those of a fresh decode.
    """

    def __init__(
        self, folder: str | os.PathLike[str], size: int = 256, flip: bool = False, recursive: bool = False,
        cache_bytes: int = 256 * 2**20,
    ) -> None:  # fmt: skip
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if not isinstance(cache_bytes, int) or isinstance(cache_bytes, bool) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_slots = cache_bytes // (3 * size * size)
        self.folder = Path(folder)
        if not self.folder.exists():
            raise FileNotFoundError(f"image folder does not exist: {self.folder}")
        if not self.folder.is_dir():
            raise NotADirectoryError(f"image folder is not a directory: {self.folder}")
        self.size, self.flip = size, flip

        candidates = list_images(self.folder, recursive)
        self.paths: list[Path] = []
        self.skipped: list[Path] = []
        checking = tqdm(
            candidates, desc=f"checking {self.folder.name}", unit="img", leave=False, disable=len(candidates) < 500
        )
        for path in checking:
            if is_readable_image(path, size):
                self.paths.append(path)
            else:
                self.skipped.append(path)
                warnings.warn(f"skipping unreadable image file {path}", UnreadableImageWarning, stacklevel=2)
        if self.skipped:
            warnings.warn(
                f"{self.folder}: skipped {len(self.skipped)} unreadable of {len(candidates)} image files, "
                f"using {len(self.paths)}",
                UnreadableImageWarning,
                stacklevel=2,
            )
        if not self.paths:
            raise ValueError(
                f"no usable image in {self.folder} (looked for {', '.join(IMAGE_EXTENSIONS)}"
                f"{' recursively' if recursive else ''}; found {len(candidates)} candidate files, "
                f"{len(self.skipped)} unreadable)"
            )

        self.unreadable = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def unreadable_count(self) -> int:
        """How many files failed to decode when read (each counted once)."""
        return int(self.unreadable.sum())

    @property
    def unreadable_paths(self) -> list[Path]:
        return [self.paths[i] for i in self.unreadable.nonzero().flatten().tolist()]

    def __getitem__(self, index: int) -> torch.Tensor:
        tensor = self._load_or_stand_in(index)
        if self.flip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor

    def _load_or_stand_in(self, index: int) -> torch.Tensor:
        """The image at ``index``, or the next one in order that decodes; OSError if none does."""
        count = len(self.paths)
        for offset in range(count):
            candidate = (index + offset) % count
            if offset and self.unreadable[candidate]:
                continue
            cached = self._cache.get(candidate)
            if cached is not None:
                return cached.float().div_(127.5).sub_(1.0)  # the arithmetic of _pil_to_tensor
            try:
                image = load_image(self.paths[candidate], self.size)
            except OSError as error:
                if not self.unreadable[candidate]:
                    self.unreadable[candidate] = True
                    warnings.warn(f"skipping {error}", UnreadableImageWarning, stacklevel=3)
                continue
            if len(self._cache) < self._cache_slots:
                self._cache[candidate] = image.add(1.0).mul_(127.5).round_().to(torch.uint8)
            return image
        raise OSError(f"{self.folder}: none of the {count} image files decodes")


def unreadable_count(*datasets: Dataset, group: object = None) -> int:
    """Files of the :class:`ImageFolder` datasets among ``datasets`` that failed to decode so far.

    With a process ``group`` (torch.distributed), the largest count of any rank: every rank
    reads other files, and all must agree on stopping.
    """
    count = sum(d.unreadable_count for d in datasets if isinstance(d, ImageFolder))
    if group is not None:
        import torch.distributed as dist

        total = torch.tensor([count])
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        count = int(total)
    return count


def resolve_unpaired_folders(
    root: str | os.PathLike[str] | None = None,
    dir_a: str | os.PathLike[str] | None = None,
    dir_b: str | os.PathLike[str] | None = None,
    split: str = "train",
) -> tuple[Path, Path]:
    """The two image folders of an unpaired task: ``root/{split}A`` and ``root/{split}B``
    (CycleGAN layout), or ``dir_a`` and ``dir_b``.

    Give either ``root`` alone or both ``dir_a`` and ``dir_b``. ``split`` is "train" or "test".
    Raises ValueError for a wrong combination of arguments and FileNotFoundError naming the
    missing folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None:
        if dir_a is not None or dir_b is not None:
            raise ValueError("give either root (CycleGAN layout) or dir_a and dir_b, not both")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root does not exist or is not a directory: {root}")
        folders = (root / f"{split}A", root / f"{split}B")
        for folder in folders:
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"missing folder {folder}: a dataset root must hold {split}A/ and {split}B/ "
                    "(CycleGAN layout: trainA, trainB, testA, testB)"
                )
        return folders
    if dir_a is None or dir_b is None:
        raise ValueError(f"give a dataset root or both dir_a and dir_b; got dir_a={dir_a!r}, dir_b={dir_b!r}")
    folders = (Path(dir_a), Path(dir_b))
    for name, folder in zip(("dir_a", "dir_b"), folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} does not exist or is not a directory: {folder}")
    return folders


# ---------------------------------------------------------------------------------------------
# Toy streets
# ---------------------------------------------------------------------------------------------

CLASSES = ("sky", "road", "lane", "car", "tree", "hood")
SKY, ROAD, LANE, CAR, TREE, HOOD = range(len(CLASSES))

# RGB in [0, 1]. The per-image jitter moves a colour by at most JITTER_RADIUS = 0.069.
# B's colours are at least 0.28 apart (> 2 JITTER_RADIUS), so real B pixels always classify
# correctly. A's colours (lane excepted) are nearest to B's colour of the same class, so
# "output equals input" keeps the semantics but not the lane colour; every A colour is more
# than 0.15 (> 2 JITTER_RADIUS) from every B colour, so no pixel of an unchanged A image is
# within JITTER_RADIUS of B's palette (its realism is 0).
PALETTE_A: dict[str, tuple[float, float, float]] = {
    "sky": (0.35, 0.65, 1.00),
    "road": (0.45, 0.40, 0.52),
    "lane": (1.00, 0.80, 0.00),
    "car": (0.95, 0.10, 0.10),
    "tree": (0.15, 0.70, 0.15),
}
PALETTE_B: dict[str, tuple[float, float, float]] = {
    "sky": (0.62, 0.74, 0.86),
    "road": (0.36, 0.36, 0.40),
    "lane": (0.95, 0.95, 0.95),
    "car": (0.75, 0.15, 0.15),
    "tree": (0.20, 0.45, 0.18),
    "hood": (0.08, 0.08, 0.10),
}
COLOUR_JITTER = 0.04  # half-width of the uniform per-image, per-class, per-channel colour offset
JITTER_RADIUS = COLOUR_JITTER * math.sqrt(3)  # the farthest a jittered colour lies from its palette colour

_DOMAINS = {"A": 0, "B": 1}
_LAYOUT = {  # domain -> (horizon range, number of cars range)
    "A": ((0.45, 0.60), (1, 3)),
    "B": ((0.30, 0.40), (1, 3)),
}


def _hood_mask(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The fixed hood of domain B: below a parabola rising to 0.87 of the height at the centre, with an ornament."""
    u = (xs - 0.5) / 0.5
    edge = 0.87 + 0.09 * u**2 - 0.05 * np.clip(1.0 - np.abs(xs - 0.5) / 0.025, 0.0, None)
    return ys > edge


def _disc(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    return (ys - cy) ** 2 + (xs - cx) ** 2 < radius**2


def _box(ys: np.ndarray, xs: np.ndarray, top: float, bottom: float, left: float, right: float) -> np.ndarray:
    return (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)


def _draw_tree(
    labels: np.ndarray, ys: np.ndarray, xs: np.ndarray, base_y: float, x: float, height: float, radius: float
) -> None:
    """A trunk from ``base_y`` up to a round canopy of ``radius``, all in the tree class."""
    trunk_half = max(0.25 * radius, 0.6 / labels.shape[0]) / 2
    labels[_box(ys, xs, base_y - height, base_y, x - trunk_half, x + trunk_half)] = TREE
    labels[_disc(ys, xs, base_y - height, x, radius)] = TREE


def _street_labels(domain: str, size: int, rng: np.random.Generator, lane_width: float = 1.0) -> np.ndarray:
    """One scene's label map (size, size) of class ids, drawn with ``rng``; coordinates in [0, 1], y down.

    ``lane_width`` scales the width of the lane lines (1: about 2 % of the image width near the bottom).
    """
    centres = (np.arange(size) + 0.5) / size
    ys, xs = centres[:, None], centres[None, :]
    pixel = 1.0 / size
    (horizon_lo, horizon_hi), (cars_lo, cars_hi) = _LAYOUT[domain]
    horizon = rng.uniform(horizon_lo, horizon_hi)

    # Ground: a road whose centre and half-width run linearly in the depth parameter
    # t = (y - horizon) / (1 - horizon), from the vanishing point (t = 0) to the bottom (t = 1).
    vanish_x, bottom_x = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
    top_half, bottom_half = rng.uniform(0.02, 0.04), rng.uniform(0.55, 0.75)
    depth = np.clip((ys - horizon) / (1.0 - horizon), 0.0, 1.0)
    centre = vanish_x + (bottom_x - vanish_x) * depth
    half = top_half + (bottom_half - top_half) * depth
    offset = np.abs(xs - centre)
    below = ys > horizon

    labels = np.full((size, size), SKY, dtype=np.int64)
    labels[below & (offset >= half)] = TREE  # grass verge
    labels[below & (offset < half)] = ROAD

    # Lanes: solid edge lines and a dashed centre line; dashes are periodic in the ground
    # distance 1 / (y - horizon), so they shorten towards the horizon.
    line_half = lane_width * np.maximum(0.018 * depth, 0.55 * pixel)
    visible = below & (depth > 0.08)
    edges = np.abs(offset - 0.82 * half) < line_half
    dash = np.mod(0.25 / np.maximum(ys - horizon, 1e-6) + rng.uniform(), 1.0) < 0.5
    labels[visible & (edges | ((offset < line_half) & dash))] = LANE

    # Trees, drawn before the cars that drive in front of them.
    if domain == "A":
        if rng.uniform() < 0.5:
            side = rng.choice([-1.0, 1.0])
            x = 0.5 + side * rng.uniform(0.32, 0.45)
            _draw_tree(
                labels, ys, xs, horizon + rng.uniform(0.01, 0.05), x, rng.uniform(0.06, 0.12), rng.uniform(0.05, 0.08)
            )
    else:
        for side in (-1.0, 1.0):
            for _ in range(rng.integers(2, 4)):
                x = 0.5 + side * rng.uniform(0.38, 0.55)
                base = horizon + rng.uniform(0.0, 0.08)
                _draw_tree(labels, ys, xs, base, x, rng.uniform(0.1, 0.25), rng.uniform(0.08, 0.16))
        canopy = rng.uniform(0.04, 0.12) + 0.04 * np.sin(
            2 * np.pi * rng.uniform(1.0, 3.0) * xs + rng.uniform(0, 2 * np.pi)
        )
        labels[ys < canopy] = TREE

    # Cars: far ones first, so near ones occlude them. A car's width is a fraction of the road
    # half-width (one lane) at its depth; it sits in the left or right lane.
    car_depths = np.sort(rng.uniform(0.3, 0.85, size=rng.integers(cars_lo, cars_hi + 1)))
    for t in car_depths:
        bottom = horizon + t * (1.0 - horizon)
        road_half = top_half + (bottom_half - top_half) * t
        road_centre = vanish_x + (bottom_x - vanish_x) * t
        width = rng.uniform(0.5, 0.65) * road_half
        x = road_centre + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.6) * road_half
        body_top = bottom - 0.45 * width
        labels[_box(ys, xs, body_top, bottom, x - width / 2, x + width / 2)] = CAR
        labels[_box(ys, xs, body_top - 0.3 * width, body_top, x - 0.35 * width, x + 0.35 * width)] = CAR

    if domain == "B":
        labels[_hood_mask(ys, xs)] = HOOD
    return labels


def _palette_array(palette: Mapping[str, tuple[float, float, float]]) -> np.ndarray:
    """(len(CLASSES), 3) array of RGB in [0, 1]; NaN rows for classes the palette lacks."""
    colours = np.full((len(CLASSES), 3), np.nan)
    for index, name in enumerate(CLASSES):
        if name in palette:
            colours[index] = palette[name]
    return colours


class ToyStreets(Dataset):
    """Toy street scenes of ``domain`` "A" (game) or "B" (city), generated on the fly.

    ``domain`` is "A"/"a" or "B"/"b" (stored upper-case). ``dataset[i]`` is ``(image, labels)``:
    image float32 (3, size, size) in [-1, 1] and labels int64 (size, size) of indices into
    :data:`CLASSES`. Item i depends only on (seed, domain, i): it is drawn from its own
    ``numpy.random.Generator``, so it is the same in any read order, in any DataLoader worker.
    Use different seeds for training and evaluation sets. ``lane_width`` scales the lane lines'
    width (1: one or two pixels at 32-64 px; the toy-street study draws them 2.5 times wider, so
    that a small generator can reproduce them and the yellow-to-white change is measurable).
    """

    def __init__(self, domain: str, size: int = 64, length: int = 10_000, seed: int = 0, lane_width: float = 1.0):
        if not isinstance(domain, str) or domain.upper() not in _DOMAINS:
            raise ValueError(f"domain must be 'A' or 'B' (either case), got {domain!r}")
        domain = domain.upper()
        if not isinstance(size, int) or isinstance(size, bool) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not isinstance(lane_width, (int, float)) or isinstance(lane_width, bool) or not 0 < lane_width <= 10:
            raise ValueError(f"lane_width must be a number in (0, 10], got {lane_width!r}")
        self.domain, self.size, self.length, self.seed = domain, size, length, seed
        self.lane_width = float(lane_width)
        self.palette = PALETTE_A if domain == "A" else PALETTE_B

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ToyStreets of length {self.length}")
        rng = np.random.default_rng([self.seed, _DOMAINS[self.domain], int(index)])
        labels = _street_labels(self.domain, self.size, rng, self.lane_width)
        colours = _palette_array(self.palette)
        colours = np.clip(colours + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=colours.shape), 0.0, 1.0)
        image = colours[labels].transpose(2, 0, 1) * 2.0 - 1.0
        return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _palette_tensor(palette: Mapping[str, tuple[float, float, float]]) -> tuple[torch.Tensor, list[int]]:
    """Colours in [-1, 1] as (K, 3) and the class ids they stand for, for the classes the palette has."""
    unknown = set(palette) - set(CLASSES)
    if unknown:
        raise ValueError(f"palette has unknown classes {sorted(unknown)}; classes are {CLASSES}")
    ids = [index for index, name in enumerate(CLASSES) if name in palette]
    colours = torch.tensor([palette[CLASSES[index]] for index in ids], dtype=torch.float32) * 2 - 1
    return colours, ids


def paint_labels(labels: torch.Tensor, palette: Mapping[str, tuple[float, float, float]] = PALETTE_B) -> torch.Tensor:
    """Image of a label map: (..., H, W) class ids -> (..., 3, H, W) float32 in [-1, 1], each pixel its class's colour.

    ``paint_labels(labels_of_a, PALETTE_B)`` is the ideal translation of an A image.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() < 2:
        raise ValueError(
            f"labels must be an integer tensor (..., H, W), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    colours, ids = _palette_tensor(palette)
    present = torch.unique(labels).tolist()
    missing = [c for c in present if c not in ids]
    if missing:
        names = [CLASSES[c] if 0 <= c < len(CLASSES) else str(c) for c in missing]
        raise ValueError(f"labels hold classes {names} that the palette has no colour for")
    lookup = torch.zeros(len(CLASSES), 3)
    lookup[ids] = colours
    return lookup[labels.long()].movedim(-1, -3).contiguous()


def classify_pixels(
    images: torch.Tensor, palette: Mapping[str, tuple[float, float, float]] = PALETTE_B, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest palette colour of every pixel: (N, 3, H, W) in [-1, 1] -> class ids (N, H, W) int64
    and distances (N, H, W).

    Distances are Euclidean in RGB with channels in [0, 1] (half the distance in [-1, 1]).
    Work is done ``chunk`` images at a time to bound memory.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be a float tensor (N, 3, H, W), got {images.dtype} of shape {tuple(images.shape)}"
        )
    colours, ids = _palette_tensor(palette)
    ids_tensor = torch.tensor(ids)
    classes, distances = [], []
    for part in images.detach().float().cpu().split(chunk):
        # (n, K, H, W): squared distances to each palette colour
        squared = ((part.unsqueeze(1) - colours[None, :, :, None, None]) ** 2).sum(2)
        nearest_squared, nearest = squared.min(1)
        classes.append(ids_tensor[nearest])
        distances.append(nearest_squared.sqrt() / 2)
    return torch.cat(classes), torch.cat(distances)


def score_translations(
    translated: torch.Tensor,
    labels: torch.Tensor,
    palette: Mapping[str, tuple[float, float, float]] = PALETTE_B,
) -> dict[str, float | dict[str, float]]:
    """Score translations G(a) of A images against a's label maps, by the nearest colour of B's palette.

    ``translated`` (N, 3, H, W) in [-1, 1], ``labels`` (N, H, W) class ids. With c(p) the class
    of output pixel p's nearest palette colour and l(p) its label:

    - ``semantic_flip_rate`` = #{p : l(p) != lane, c(p) != l(p)} / #{p : l(p) != lane}
      (0 is ideal; trees in the sky, hallucinated hoods, lost cars all count);
    - ``lane_accuracy`` = #{p : l(p) = lane, c(p) = lane} / #{p : l(p) = lane} (1 is ideal;
      NaN if there are no lane pixels);
    - ``realism`` = #{p : d(p) <= JITTER_RADIUS} / #{p}, with d(p) the RGB distance ([0, 1]
      channels) from output pixel p to its nearest palette colour: the fraction of output
      pixels whose colour a real B image can hold (B's colour jitter moves a colour by at most
      JITTER_RADIUS = 0.069). 1 for real B images and for the ideal translation, 0 for A
      images left unchanged; blur, noise and off-palette colours lower it, and it never rises
      when any pixel moves away from the palette. It judges colours only, not layout: a
      translation without B's hood is not penalised, since the ideal one has none;
    - ``palette_distance`` = mean of d(p) over all output pixels, a graded companion to
      realism (0 for B's exact palette, about 0.04 for real B images, about 0.25 for A images
      left unchanged);
    - ``flipped_into``: class -> fraction of non-lane pixels wrongly given that class (these
      sum to the flip rate; "hood" counts hallucinated hood);
    - ``flip_rate_by_class``: class -> fraction of that label's pixels given another class
      (for the non-lane classes present; "car" counts lost cars);
    - ``predicted_fraction``: class -> fraction of all output pixels given that class.
    """
    if labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor (N, H, W), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if translated.dim() != 4 or translated.shape[1] != 3 or translated.shape[:1] + translated.shape[2:] != labels.shape:
        raise ValueError(
            f"translated must be (N, 3, H, W) matching labels (N, H, W) = {tuple(labels.shape)}, "
            f"got {tuple(translated.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(
            f"labels must be class ids in [0, {len(CLASSES)}), got values in [{labels.min()}, {labels.max()}]"
        )
    if not torch.isfinite(translated).all():
        raise ValueError("translated holds NaN or infinite values")

    predicted, distance = classify_pixels(translated, palette)
    labels = labels.cpu().long()
    k = len(CLASSES)
    # confusion[l, c] = number of pixels with label l classified as c
    confusion = torch.bincount(labels.flatten() * k + predicted.flatten(), minlength=k * k).reshape(k, k).double()

    lane_total = confusion[LANE].sum()
    non_lane_ids = [c for c in range(k) if c != LANE]
    wrong = confusion[non_lane_ids]  # rows of the non-lane labels; a copy
    non_lane_total = wrong.sum()
    wrong[range(len(non_lane_ids)), non_lane_ids] = 0  # keep only the misclassified pixels

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        return float(numerator / denominator) if denominator > 0 else math.nan

    return {
        "semantic_flip_rate": ratio(wrong.sum(), non_lane_total),
        "lane_accuracy": ratio(confusion[LANE, LANE], lane_total),
        "realism": float((distance <= JITTER_RADIUS + 1e-5).double().mean()),
        "palette_distance": float(distance.double().mean()),
        "flipped_into": {CLASSES[c]: ratio(wrong[:, c].sum(), non_lane_total) for c in range(k)},
        "flip_rate_by_class": {
            CLASSES[c]: ratio(confusion[c].sum() - confusion[c, c], confusion[c].sum())
            for c in range(k)
            if c != LANE and confusion[c].sum() > 0
        },
        "predicted_fraction": {CLASSES[c]: ratio(confusion[:, c].sum(), confusion.sum()) for c in range(k)},
    }
