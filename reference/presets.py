r"""Named recipes for :class:`reference.train.TrainConfig`: the paper's experiments and the digit study's settings.

``python reference/train.py --preset NAME`` starts from one (flags given beside it win);
``python reference/presets.py`` lists them. ``digits-demo`` is the digit study's networks,
optimiser and budget (16 px, ``reference/studies/digits.py``), usable on any small data set.
The others are the paper's experiments, for GPU users with the real data sets: Monet -> photo
(Kaggle's "I'm Something of a Painter Myself" data: folders ``monet_jpg/`` and ``photo_jpg/``)
and GTA -> Cityscapes (a CycleGAN-layout root with ``trainA/`` = GTA frames and ``trainB/`` =
Cityscapes frames). Every paper preset uses the paper's settings: 256 x 256 images, batch 128,
CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) on the central 224 x 224 crop with pooled
features, Adam (lr 2e-4 for G, 4e-4 for D, betas (0.5, 0.999)), non-saturating BCE. Print the
training command of one, after checking that it can run here, with
``python reference/presets.py NAME --data ROOT``.

Two lambda conventions
======================

The paper's lambda multiplies *summed* losses: the authors' code summed the generator's BCE
over the whole :math:`N \times 30 \times 30` PatchGAN logit map of a batch (no reduction) and
summed its travel term. This project's default averages both: ``generator_adversarial_loss`` is
the mean over the N P logits (P logits per image, :math:`P = 30^2 = 900` at 256 px with the
3-layer PatchGAN), and ``travel_loss(reduction="mean")`` the mean over the :math:`N(N-1)` ordered
pairs. With per-logit losses :math:`\ell_{b,p}` and pair distances :math:`d_{ij}`, write the means
:math:`A = \frac{1}{NP}\sum_{b,p}\ell_{b,p}` and :math:`T = \frac{1}{N(N-1)}\sum_{i \ne j} d_{ij}`.
The paper's equation 2 with sums is then

.. math::

    J_\mathrm{paper} = \sum_{b,p} \ell_{b,p} + \lambda_\mathrm{paper} \sum_{i \ne j} d_{ij}
                     = NP \cdot A + \lambda_\mathrm{paper} N(N-1) \cdot T
                     = NP \Bigl(A + \lambda_\mathrm{paper} \frac{N-1}{P}\, T\Bigr)
                     = NP \cdot J_\mathrm{mean},

    \boxed{\lambda_\mathrm{mean} = \lambda_\mathrm{paper} \, \frac{N - 1}{P}}
    \qquad (N = 128,\ P = 900:\ \lambda_\mathrm{mean} = 0.1411\, \lambda_\mathrm{paper}).

So :math:`\nabla J_\mathrm{paper} = NP\, \nabla J_\mathrm{mean}`: the same direction, the same
ratio between the adversarial and the travel gradient, at every step. The common factor NP
does not change Adam's updates (Adam divides by the gradient's running RMS; only its
:math:`\epsilon = 10^{-8}` sees the scale). Under DDP, N is the global batch (the travel loss
gathers all ranks' embeddings) and P stays per image. :func:`paper_to_mean_lambda` and
:func:`mean_to_paper_lambda` apply the formula; the tests check the gradient identity.

The authors' notebook did not compute equation 2 exactly: it took the cosine over the *batch*
axis of (N-1, N, D) stacks of differences and summed the (N-1) D results
(``reference.losses.notebook_travel_loss``, ``travel_objective="notebook"``). With that
objective and this project's mean adversarial loss, the same algebra gives the exact equivalent

.. math::  J_\mathrm{notebook} = NP \cdot A + \lambda_\mathrm{paper} L_\mathrm{nb}
           = NP \Bigl(A + \frac{\lambda_\mathrm{paper}}{NP} L_\mathrm{nb}\Bigr)
           \quad\Rightarrow\quad \lambda = \frac{\lambda_\mathrm{paper}}{NP}
           \ \ (= 8.7 \times 10^{-6}\, \lambda_\mathrm{paper}).

No exact mapping exists between the notebook's objective and equation 2: they are different
functions. Their *values* relate by the number of terms, :math:`L_\mathrm{nb} \approx
\frac{D}{N} \sum_{i \ne j} d_{ij}` (measured on random embeddings, N = 128, D = 1024, to within
1 %), but their *gradients* differ by a factor that depends on how anisotropic the embeddings are
(8x for isotropic Gaussian embeddings, about 90x when per-dimension scales span two decades, and
the gradient directions then differ too). The paper's lambda values were tuned with the notebook's
objective, so the presets offer both:

- ``convention="mean"`` (the default): this project's objective (equation 2, per-pair cosine,
  means) with :math:`\lambda_\mathrm{mean} = \lambda_\mathrm{paper}(N-1)/P`, the exact image of the
  paper's equation 2 as written;
- ``convention="notebook"``: the authors' objective with :math:`\lambda_\mathrm{paper}/(NP)`, the
  exact image of what their code optimised, for reproducing Table 1.

Where the flip / translate / identity regimes fall for the ``"mean"`` objective has to be found
by a sweep (or ``lambda_travel="auto"``).

Facts the presets carry and assumptions they make
=================================================

From the paper: the lambda values and update counts of Table 1 and their FIDs; batch 128; ViT-L/14
on the central 224 crop; Adam. From the authors' code: pooled features, the crop
``x[16:240, 16:240]``, D's learning rate twice G's, augmentation of D's inputs. Assumptions (the
paper does not say): the Monet -> photo lambda (0.001, Table 1's balanced value) and update count
(20 000); constant learning rates (the notebook lowered them in stages, 2e-4 -> 1e-4 -> 3e-5,
every 1 400 steps, which the trainer does not offer); DiffAugment's colour, translation and
cutout for D's inputs (the notebook's exact augmentations differ); bfloat16 autocast (set
``amp="off"`` for float32); the TraVeLGAN baseline at the same batch, networks and step count as
CLIPTraVeLGAN (the original TraVeLGAN used batch 16) with TraVeLGAN's own objective and weight
(its terms are averaged, so its weight 10 is already in the mean convention).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.config import PAPER_ENCODER, command_line_flags
from reference.data import IMAGE_EXTENSIONS
from reference.models import PatchDiscriminator
from travel_loss.lambdas import (
    PAPER_BATCH_SIZE,
    _check_batch_and_patches,
    _check_lambda,
    mean_to_paper_lambda,
    paper_to_mean_lambda,
)

__all__ = [
    "CONVENTIONS",
    "DIGITS_DEMO_SETTINGS",
    "PAPER_BATCH_SIZE",
    "PAPER_ENCODER",
    "PAPER_SIZE",
    "PRESETS",
    "Preset",
    "PresetNotRunnableError",
    "check_preset_runnable",
    "mean_to_paper_lambda",
    "notebook_lambda",
    "paper_to_mean_lambda",
    "patches_per_image",
    "preset_command",
    "preset_config",
    "preset_data",
]

PAPER_SIZE = 256
CONVENTIONS = ("mean", "notebook")


# ---------------------------------------------------------------------------------------------
# Lambda conventions
# ---------------------------------------------------------------------------------------------


def patches_per_image(size: int = PAPER_SIZE, d_layers: int = 3) -> int:
    """P, the number of logits the PatchGAN discriminator gives one size x size image (900 at 256 px)."""
    side = PatchDiscriminator(3, width=1, n_layers=d_layers).output_size(size)
    if side < 1:
        raise ValueError(f"size: {size} px is too small for a {d_layers}-layer PatchGAN")
    return side * side


def notebook_lambda(lambda_paper: float, *, batch_size: int = PAPER_BATCH_SIZE, patches: int | None = None) -> float:
    r""":math:`\lambda_\mathrm{paper} / (NP)`: the weight of ``travel_objective="notebook"`` next to this
    project's mean adversarial loss that reproduces the notebook's summed objective."""
    n, p = _check_batch_and_patches(batch_size, patches)  # patches None: PAPER_PATCHES, patches_per_image()
    return _check_lambda(lambda_paper) / (n * p)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One recipe: the data set, the paper's lambda (summed-loss convention) or a fixed
    mean-convention weight, the update count, and the TrainConfig fields that differ from its
    base settings (the shared paper settings unless ``settings`` says otherwise)."""

    name: str
    dataset: str | None  # "monet2photo" | "gta2cityscapes" (DATASET_FOLDERS); None: any --data
    description: str
    steps: int
    lambda_paper: float | None = None  # the paper's value; None when the fields set lambda_travel themselves
    fields: Mapping[str, Any] = field(default_factory=dict)
    paper_result: str = ""
    settings: Mapping[str, Any] | None = None  # the base TrainConfig fields; None: PAPER_SETTINGS

    @property
    def base(self) -> Mapping[str, Any]:
        return PAPER_SETTINGS if self.settings is None else self.settings

    @property
    def needs_gpu(self) -> bool:
        """The paper's experiments train batches of 128 images of 256 px through ViT-L/14."""
        return self.settings is None


# TrainConfig fields shared by every preset (the paper's settings and the stated assumptions).
PAPER_SETTINGS: dict[str, Any] = {
    "size": PAPER_SIZE,
    "batch_size": PAPER_BATCH_SIZE,
    "flip": True,
    "encoder": PAPER_ENCODER,
    "encoder_mode": "clip",
    "crop": "center",
    "features": "pooled",
    "gan_loss": "bce",
    "augment": "color,translation,cutout",
    "lr": 2e-4,
    "lr_d": 4e-4,
    "beta1": 0.5,
    "beta2": 0.999,
    "decay_steps": 0,
    "d_layers": 3,
    "amp": "bf16",
    "checkpoint_every": 1000,
    "sample_every": 1000,
}

# The folders of each data set, relative to the root the user passes (--data ROOT).
DATASET_FOLDERS: dict[str, tuple[str, str]] = {
    "monet2photo": ("monet_jpg", "photo_jpg"),  # the Kaggle competition's layout
    "gta2cityscapes": ("trainA", "trainB"),  # CycleGAN layout: GTA frames, Cityscapes frames
}

# The digit study's recipe (reference/studies/digits.py): a 16 px ResNet G of width 16 and 3 blocks,
# a 2-layer PatchGAN, LSGAN, batch 32, the stroke embedder, and an EMA of G for evaluation.
DIGITS_DEMO_SETTINGS: dict[str, Any] = {
    "size": 16,
    "flip": False,
    "num_workers": 0,
    "gan_loss": "lsgan",
    "lambda_travel": 10.0,
    "encoder_mode": "module",
    "encoder": f"{Path(__file__).resolve().parent / 'studies' / 'digit_data.py'}:stroke_embedder",
    "g_width": 16,
    "g_blocks": 3,
    "d_width": 16,
    "d_layers": 2,
    "batch_size": 32,
    "lr": 2e-4,
    "g_ema": 0.99,  # evaluation with the EMA of G's weights: less speckle for every method
}

_TRAVELGAN = {"encoder_mode": "siamese", "travel_distance": "travelgan", "lambda_travel": 10.0, "siamese_margin": 10.0}


def _table1(lambda_paper: float, steps: int, fid: float, result: str) -> Preset:
    return Preset(
        name=f"gta2cityscapes-lambda{lambda_paper:g}-{steps // 1000}k",
        dataset="gta2cityscapes",
        description=f"Table 1: CLIPTraVeLGAN, lambda {lambda_paper:g}, {steps} updates",
        steps=steps,
        lambda_paper=lambda_paper,
        paper_result=f"FID {fid}; {result}",
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in [
        _table1(0.0003, 40_000, 5.74, "trees and artefacts in the sky; lanes turn white"),
        _table1(0.001, 40_000, 6.22, "hallucinated hood ornaments; artefacts outside the CLIP crop"),
        _table1(0.001, 20_000, 6.81, "no semantic flipping; yellow lanes turn white"),
        _table1(0.003, 17_000, 9.09, "no translation: yellow lanes remain"),
        _table1(0.01, 17_000, 9.08, "output almost equals input"),
        _table1(0.01, 40_000, 8.90, "output almost equals input, artefacts outside the CLIP crop"),
        Preset(
            name="gta2cityscapes-travelgan",
            dataset="gta2cityscapes",
            description="TraVeLGAN baseline: a trainable Siamese embedder with the margin loss instead of CLIP",
            steps=20_000,
            fields=_TRAVELGAN,
            paper_result="hallucinates cars (Figure 3)",
        ),
        Preset(
            name="gta2cityscapes-random-clip",
            dataset="gta2cityscapes",
            description="ablation: ViT-L/14 with random weights (no download needed)",
            steps=20_000,
            lambda_paper=0.001,
            fields={"encoder_mode": "random-clip"},
            paper_result="does not work: the travel loss compares noise vectors (Figure 6)",
        ),
        Preset(
            name="monet2photo-cliptravelgan",
            dataset="monet2photo",
            description="CLIPTraVeLGAN, Monet paintings -> photos (lambda and steps assumed)",
            steps=20_000,
            lambda_paper=0.001,
            paper_result="FID 7.3 (CycleGAN 6.9, TraVeLGAN 7.7)",
        ),
        Preset(
            name="monet2photo-travelgan",
            dataset="monet2photo",
            description="TraVeLGAN baseline, Monet paintings -> photos",
            steps=20_000,
            fields=_TRAVELGAN,
            paper_result="FID 7.7",
        ),
        Preset(
            name="digits-demo",
            dataset=None,
            description="the digit study's networks, optimiser and budget (16 px, CPU minutes); any small data set",
            steps=500,  # with the EMA the picture of 1000 steps in half the time: the study fits in 5 minutes
            settings=DIGITS_DEMO_SETTINGS,
        ),
    ]
}


def _get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(
    name: str,
    *,
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    convention: str = "mean",
    world_size: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments of :class:`reference.train.TrainConfig` for preset ``name``.

    Args:
        data: the data set's root; the preset picks its two folders under it
            (:data:`DATASET_FOLDERS`), or takes it as ``data`` (a CycleGAN-layout root) where it
            names no data set. ``None`` leaves the data fields out.
        out: the run folder (default ``runs/NAME``).
        convention: ``"mean"`` (this project's objective, lambda converted by
            :func:`paper_to_mean_lambda`) or ``"notebook"`` (the authors' objective, lambda by
            :func:`notebook_lambda`); see the module docstring. Presets whose weight is not a
            paper lambda (the TraVeLGAN baseline) ignore it.
        world_size: processes under torchrun; ``batch_size`` becomes the per-process share of
            the preset's global batch (the paper's 128; it must divide it).
        **overrides: any TrainConfig fields, applied last (e.g. ``steps=1000``, ``amp="off"``).
    """
    preset = _get(name)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {', '.join(map(repr, CONVENTIONS))}, got {convention!r}")
    config: dict[str, Any] = {**preset.base, "steps": preset.steps, **preset.fields}
    global_batch = int(config["batch_size"])
    if not isinstance(world_size, int) or world_size < 1 or global_batch % world_size:
        raise ValueError(
            f"world_size: expected an int >= 1 that divides the batch of {global_batch}, got {world_size!r}"
        )
    if preset.lambda_paper is not None:
        patches = patches_per_image(config["size"], config["d_layers"])
        if convention == "mean":
            config["lambda_travel"] = paper_to_mean_lambda(
                preset.lambda_paper, batch_size=PAPER_BATCH_SIZE, patches=patches
            )
        else:
            config["travel_objective"] = "notebook"
            config["lambda_travel"] = notebook_lambda(preset.lambda_paper, batch_size=PAPER_BATCH_SIZE, patches=patches)
    config["batch_size"] = global_batch // world_size
    if data is not None:
        config |= preset_data(name, data)
    config["out"] = str(out) if out is not None else f"runs/{name}"
    config.update(overrides)
    return config


def preset_data(name: str, data: str | os.PathLike[str]) -> dict[str, str]:
    """The data fields of preset ``name`` for the root ``data``: its data set's two folders under
    it (``data_a``, ``data_b``), or ``data`` itself where the preset names no data set."""
    dataset = _get(name).dataset
    if dataset is None:
        return {"data": str(data)}
    folder_a, folder_b = DATASET_FOLDERS[dataset]
    return {"data_a": str(Path(data) / folder_a), "data_b": str(Path(data) / folder_b)}


class PresetNotRunnableError(RuntimeError):
    """A preset cannot run on this machine; the message lists everything that is missing."""


def check_preset_runnable(
    name: str,
    *,
    data: str | os.PathLike[str] | None = None,
    require_gpu: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    **config_options: Any,
) -> dict[str, Any]:
    """The preset's TrainConfig kwargs (as :func:`preset_config`) once data, weights and GPU are checked.

    Checks, all before raising one :class:`PresetNotRunnableError` that lists every problem:

    - the data root and its two image folders exist and hold images;
    - for ``encoder_mode="clip"``: the CLIP checkpoint is a local folder with ``config.json``, or
      its ``config.json`` and weights are in the Hugging Face cache (nothing is downloaded);
    - with ``require_gpu``, for the paper's experiments: a CUDA GPU is visible (batch 128 of
      256 px images through ViT-L/14 is GPU work).
    """
    preset = _get(name)
    config = preset_config(name, data=data, **config_options)
    problems: list[str] = []
    if preset.dataset is None:
        if data is None or not (Path(data) / "trainA").is_dir() or not (Path(data) / "trainB").is_dir():
            problems.append(f"data: expected a root holding trainA/ and trainB/ image folders, got {data}")
    elif data is None:
        folder_a, folder_b = DATASET_FOLDERS[preset.dataset]
        problems.append(
            f"data: no data root given; pass the {preset.dataset} root holding {folder_a}/ and {folder_b}/ "
            f"({_data_hint(preset.dataset)})"
        )
    elif not Path(data).is_dir():
        problems.append(f"data: the root {data} does not exist ({_data_hint(preset.dataset)})")
    else:
        for key in ("data_a", "data_b"):
            problem = _image_folder_problem(Path(config[key]))
            if problem:
                problems.append(f"data: {problem} ({_data_hint(preset.dataset)})")
    if config.get("encoder_mode", "clip") == "clip":
        problem = _encoder_problem(config["encoder"], cache_dir)
        if problem:
            problems.append(f"encoder: {problem}")
    if require_gpu and preset.needs_gpu:
        import torch

        if not torch.cuda.is_available():
            problems.append(
                "GPU: no CUDA device visible; the preset trains on batches of 128 images of 256 px through "
                "CLIP ViT-L/14 (pass require_gpu=False to try anyway, or lower batch_size and size)"
            )
    if problems:
        raise PresetNotRunnableError(f"preset {name!r} cannot run here:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _data_hint(dataset: str | None) -> str:
    if dataset == "monet2photo":
        return (
            "download the Kaggle competition data 'I'm Something of a Painter Myself' (gan-getting-started) "
            "and unzip it"
        )
    return "put GTA frames in trainA/ and Cityscapes leftImg8bit frames in trainB/ (CycleGAN layout)"


def _image_folder_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"missing folder {folder}"
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
        return f"no {'/'.join(IMAGE_EXTENSIONS)} image in {folder}"
    return None


def _encoder_problem(encoder: str, cache_dir: str | os.PathLike[str] | None) -> str | None:
    folder = Path(os.path.expanduser(encoder))
    if folder.is_dir():
        return (
            None
            if (folder / "config.json").is_file()
            else f"the folder {folder} holds no config.json (a save_pretrained checkpoint)"
        )
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return f"{encoder!r} is not a local folder and huggingface_hub is not installed to look in the cache"
    cache = None if cache_dir is None else os.fspath(cache_dir)  # the hub's annotation: str | Path | None
    config_file = try_to_load_from_cache(encoder, "config.json", cache_dir=cache)
    weights = [try_to_load_from_cache(encoder, f, cache_dir=cache) for f in ("model.safetensors", "pytorch_model.bin")]
    if isinstance(config_file, str) and any(isinstance(w, str) for w in weights):
        return None
    return (
        f"the weights of {encoder!r} are not in the Hugging Face cache; download them once with network "
        f"access (`hf download {encoder}`), or pass encoder=PATH to a local save_pretrained folder"
    )


def preset_command(config: Mapping[str, Any], *, script: str = "reference/train.py", launcher: str = "python") -> str:
    """The ``reference/train.py`` command line (one flag per TrainConfig field) for ``config``."""
    return shlex.join([*shlex.split(launcher), script, *command_line_flags(config)])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _listing(convention_rows: Sequence[Preset]) -> str:
    lines = [
        f"{'preset':<34} {'steps':>6} {'lambda paper':>12} {'mean conv.':>11} {'notebook conv.':>15}  paper's result"
    ]
    for preset in convention_rows:
        if preset.lambda_paper is None:
            weights = f"{'-':>12} {float({**preset.base, **preset.fields}['lambda_travel']):>11} {'-':>15}"
        else:
            weights = (
                f"{preset.lambda_paper:>12g} {paper_to_mean_lambda(preset.lambda_paper):>11.4g} "
                f"{notebook_lambda(preset.lambda_paper):>15.4g}"
            )
        lines.append(f"{preset.name:<34} {preset.steps:>6} {weights}  {preset.paper_result or preset.description}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reference/presets.py",
        description="List the named recipes, or check one and print its training command.",
    )
    parser.add_argument("name", nargs="?", help="a preset name (omit to list them)")
    parser.add_argument("--data", help="the data set's root folder")
    parser.add_argument("--out", help="run folder (default runs/NAME)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="mean")
    parser.add_argument("--world-size", type=int, default=1, help="processes under torchrun (divides the batch of 128)")
    parser.add_argument(
        "--encoder", help=f"CLIP checkpoint: hub id in the HF cache or local folder (the paper's: {PAPER_ENCODER})"
    )
    parser.add_argument("--no-gpu-check", action="store_true", help="do not require a CUDA GPU")
    args = parser.parse_args(argv)
    if args.name is None:
        print(_listing(list(PRESETS.values())))
        return 0
    try:
        config = check_preset_runnable(
            args.name, data=args.data, out=args.out, convention=args.convention, world_size=args.world_size,
            require_gpu=not args.no_gpu_check, **({"encoder": args.encoder} if args.encoder else {}),
        )  # fmt: skip
    except (PresetNotRunnableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    launcher = "python" if args.world_size == 1 else f"torchrun --nproc_per_node {args.world_size}"
    print(preset_command(config, launcher=launcher))
    return 0


if __name__ == "__main__":
    sys.exit(main())
