"""Translate a folder of images with a trained generator.

    python reference/translate.py --checkpoint OUT/latest.pt --input photos/ --output translated/

Every image of ``--input`` (jpg, png, webp, bmp, tif) is translated at its own size: the (1, 3, H, W)
image in [-1, 1] is reflect-padded at the bottom and right to H' x W', the next multiples of 4
(at least 8, the generator's smallest input), translated, and cropped back to H x W. The result
is written to ``--output`` as ``<base name>.png``. ``--size S`` instead resizes each image so
that its shorter side is S (bicubic), translates it, and resizes the result back to H x W;
use it when the images are much larger or smaller than the training images. Files of the same
name already in ``--output`` are not replaced unless ``--overwrite`` is given.

The checkpoint is read with ``torch.load(weights_only=True)``. It is either the trainer's
dict, holding ``"generator"`` (a state_dict) and ``"generator_kwargs"`` (the
:class:`~reference.models.ResnetGenerator` arguments), or a bare generator state_dict, whose
architecture is then read off the weight shapes. A trainer checkpoint of a run with ``--g-ema``
also holds ``"generator_ema"``, the moving average of G's weights: translation uses it. A run
with ``--lambda-cycle`` translates A -> B (G_AB, ``"generator"``; G_BA is ``"generator_ba"``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from reference.checkpoint import load_checkpoint
from reference.data import IMAGE_EXTENSIONS, UnreadableImageWarning, is_readable_image, list_images, load_image
from reference.models import ResnetGenerator
from reference.runtime import import_xla

__all__ = [
    "generator_kwargs_from_state_dict",
    "load_generator",
    "main",
    "pad_to_multiple",
    "translate_folder",
    "translate_images",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def generator_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The :class:`ResnetGenerator` arguments that produced ``state_dict``, read off its weight shapes.

    The stem conv ``net.1.weight`` is (width, in_channels, 7, 7), the head conv (the last
    ``net.<i>.weight``) is (out_channels, width, 7, 7), and each residual block has one
    ``net.<i>.body.1.weight``.
    """
    if "net.1.weight" not in state_dict:
        raise ValueError(f"not a ResnetGenerator state_dict: no 'net.1.weight' among keys {sorted(state_dict)[:8]}...")
    stem = state_dict["net.1.weight"]
    top_level = [int(m.group(1)) for key in state_dict if (m := re.fullmatch(r"net\.(\d+)\.weight", key))]
    head = state_dict[f"net.{max(top_level)}.weight"]
    n_blocks = sum(1 for key in state_dict if re.fullmatch(r"net\.\d+\.body\.1\.weight", key))
    return {"in_channels": stem.shape[1], "out_channels": head.shape[0], "width": stem.shape[0], "n_blocks": n_blocks}


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def load_generator(checkpoint: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ResnetGenerator:
    """The generator stored in ``checkpoint``, on ``device``, in eval mode.

    ``checkpoint`` is a checkpoint file or a run folder (the trainer's ``--out``: its ``latest.pt``).
    The A -> B generator: its EMA weights (``"generator_ema"``) when the trainer kept them
    (``--g-ema``), else ``"generator"``.

    Raises FileNotFoundError if the file does not exist, and ValueError if it is damaged
    (:class:`reference.checkpoint.DamagedCheckpointError`, which names the step checkpoints
    beside it) or holds neither the trainer's dict nor a generator state_dict.
    """
    path = Path(checkpoint)
    if path.is_dir() and (path / "latest.pt").is_file():  # a run folder (the trainer's --out)
        path = path / "latest.pt"
    if not path.is_file():
        hint = " (a folder without latest.pt: not a finished run folder)" if path.is_dir() else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    stored = load_checkpoint(path, advice="translate with one of them: --checkpoint FILE")
    if isinstance(stored, Mapping) and "generator" in stored:
        state_dict, kwargs = stored.get("generator_ema", stored["generator"]), stored.get("generator_kwargs")
    elif isinstance(stored, Mapping) and stored and all(isinstance(v, torch.Tensor) for v in stored.values()):
        state_dict, kwargs = stored, None
    else:
        keys = sorted(stored)[:8] if isinstance(stored, Mapping) else type(stored).__name__
        raise ValueError(
            f"checkpoint {path} holds neither a dict with a 'generator' entry nor a generator state_dict (got {keys})"
        )
    state_dict = _strip_wrapper_prefixes(state_dict)
    kwargs = dict(kwargs) if kwargs is not None else generator_kwargs_from_state_dict(state_dict)
    generator = ResnetGenerator(**kwargs)
    try:
        generator.load_state_dict(state_dict)
    except RuntimeError as error:  # size mismatches: one line per tensor
        raise ValueError(
            f"checkpoint {path}: its generator weights do not fit a ResnetGenerator({kwargs}) "
            f"({str(error).splitlines()[-1].strip()})"
        ) from error
    return generator.to(device).eval()


def pad_to_multiple(images: torch.Tensor, multiple: int = 4, minimum: int = 8) -> torch.Tensor:
    """Pad (N, C, H, W) at the bottom and right to (N, C, H', W'),
    H' = max(minimum, H rounded up to a multiple of ``multiple``).

    Reflection padding, so that the border continues the image; replication for images too
    small to reflect (a pad must be smaller than the side it mirrors).
    """
    height, width = images.shape[-2:]
    pad_h = max(minimum, -(-height // multiple) * multiple) - height
    pad_w = max(minimum, -(-width // multiple) * multiple) - width
    if pad_h == 0 and pad_w == 0:
        return images
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)


@torch.inference_mode()
def translate_images(generator: nn.Module, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """G applied to (N, 3, H, W) images in [-1, 1] of any H, W -> (N, C_out, H, W).

    Pads to a multiple of 4 (:func:`pad_to_multiple`), translates and crops back. With
    ``size``, the images are first resized (bicubic, antialiased) so that the shorter side is
    ``size``, and the translation is resized back to H x W.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if size is not None:
        scale = size / min(height, width)
        working = (max(1, round(height * scale)), max(1, round(width * scale)))
        images = F.interpolate(images, size=working, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    inner_h, inner_w = images.shape[-2:]
    translated = generator(pad_to_multiple(images))[..., :inner_h, :inner_w]
    if size is not None:
        translated = F.interpolate(
            translated, size=(height, width), mode="bicubic", antialias=True, align_corners=False
        )
        translated = translated.clamp(-1, 1)
    return translated


def _save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [-1, 1] -> 8-bit RGB PNG."""
    pixels = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())).save(path)


def _usable_images(input_dir: Path, output_dir: Path, overwrite: bool = False) -> list[Path]:
    """The readable images of ``input_dir``; every check that can fail before translating fails here."""
    if not input_dir.exists():
        raise FileNotFoundError(f"input folder does not exist: {input_dir}")
    if not input_dir.is_dir():
        raise NotADirectoryError(f"input is not a folder: {input_dir}")
    if output_dir.resolve() == input_dir.resolve():
        raise ValueError(f"output folder must differ from the input folder, got {output_dir} for both")
    candidates = list_images(input_dir)
    if not candidates:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in input folder {input_dir}")
    stems: dict[str, Path] = {}
    for path in candidates:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem].name} and {path.name} would both be written as {path.stem}.png")
        stems[path.stem] = path
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output folder is a file: {output_dir}")
    existing = [output_dir / f"{stem}.png" for stem in stems if (output_dir / f"{stem}.png").exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} already holds {len(existing)} of the {len(stems)} files to write "
            f"(first: {existing[0].name}); pass --overwrite (overwrite=True) to replace them"
        )
    usable = []
    for path in candidates:
        if is_readable_image(path):
            usable.append(path)
        else:
            warnings.warn(f"skipping unreadable image file {path}", UnreadableImageWarning, stacklevel=3)
    if len(usable) < len(candidates):
        warnings.warn(
            f"{input_dir}: skipped {len(candidates) - len(usable)} unreadable of {len(candidates)} image files",
            UnreadableImageWarning,
            stacklevel=3,
        )
    if not usable:
        raise ValueError(f"no readable image in input folder {input_dir} ({len(candidates)} files, all unreadable)")
    return usable


def translate_folder(
    generator: nn.Module,
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    size: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Translate every image of ``input_dir`` and write ``output_dir/<base name>.png``;
    returns the written paths in input order.

    Images keep their own size (see :func:`translate_images`); consecutive images of equal
    size share a batch of up to ``batch_size``. ``device`` None keeps the generator where it
    is; otherwise it is moved there. The generator runs in eval mode and gets its mode back
    afterwards. Unreadable files are skipped with one warning each and a count. Raises
    FileNotFoundError / NotADirectoryError for a missing input folder, ValueError for a
    folder without a readable image, and FileExistsError if an output file exists and
    ``overwrite`` is False, all before translating anything.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be None or an int >= 1, got {size!r}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    paths = _usable_images(input_dir, output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    if device is not None:
        generator.to(device)
    first_parameter = next(generator.parameters(), None)
    target = first_parameter.device if first_parameter is not None else torch.device("cpu")

    written: list[Path] = []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        translated = translate_images(generator, torch.stack([image for _, image in batch]).to(target), size)
        for (path, _), image in zip(batch, translated):
            destination = output_dir / f"{path.stem}.png"
            _save_png(image, destination)
            written.append(destination)
        batch.clear()

    was_training = generator.training
    generator.eval()
    try:
        for path in tqdm(paths, desc="translating", unit="img", disable=not progress):
            try:
                image = load_image(path)
            except OSError as error:
                warnings.warn(f"skipping unreadable image file {path}: {error}", UnreadableImageWarning, stacklevel=2)
                continue
            if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
                flush()
            batch.append((path, image))
        if batch:
            flush()
    finally:
        generator.train(was_training)
    return written


def positive_int_flag(text: str) -> int:
    """An argparse ``type``: an int >= 1, else the flag's error (argparse names the flag; exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reference/translate.py",
        description="Translate every image of a folder with a trained generator; writes PNGs with the same base names.",
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="trainer checkpoint (e.g. OUT/latest.pt) or generator state_dict"
    )
    parser.add_argument("--input", required=True, type=Path, help="folder of jpg/png/webp/bmp/tif images")
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for the translated PNGs (created if missing)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--batch-size", type=positive_int_flag, default=1, help="images per batch; only equal-sized images share one"
    )
    parser.add_argument(
        "--size",
        type=positive_int_flag,
        default=None,
        help="resize the shorter side to this before translating (default: native size)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same name in --output")
    args = parser.parse_args(argv)
    try:
        if args.checkpoint.is_dir() and (args.checkpoint / "latest.pt").is_file():  # a run folder: its latest.pt
            args.checkpoint = args.checkpoint / "latest.pt"
        if not args.checkpoint.is_file():
            what = "a folder without latest.pt" if args.checkpoint.is_dir() else "checkpoint not found"
            raise FileNotFoundError(f"--checkpoint: {what}: {args.checkpoint}")
        with warnings.catch_warnings():  # translate_folder warns about unreadable files, once
            warnings.simplefilter("ignore", UnreadableImageWarning)
            _usable_images(args.input, args.output, args.overwrite)  # fail on a bad folder before loading the model
        if str(args.device).startswith("xla"):
            import_xla()  # torch knows the xla device type once torch_xla is imported
        generator = load_generator(args.checkpoint, device=args.device)
        written = translate_folder(
            generator, args.input, args.output, batch_size=args.batch_size, size=args.size,
            progress=not args.no_progress, overwrite=args.overwrite,
        )  # fmt: skip
    except (OSError, ValueError) as error:  # missing/damaged files, existing outputs, unwritable folders
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {len(written)} images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
