"""Data for the reference trainer: unpaired image folders.

Images are float32 tensors (3, size, size) with values in [-1, 1] (``pixel / 127.5 - 1``).
Every PIL mode is read with its own range (:func:`to_rgb`): 16-bit and 32-bit integer images
are scaled by 255 / 65535, floating-point images are taken in [0, 1], and transparency is
composited on black.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TooManyUnreadableImagesError",
    "UnreadableImageWarning",
    "is_readable_image",
    "list_images",
    "load_image",
    "resolve_unpaired_folders",
    "to_rgb",
    "unreadable_count",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


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
