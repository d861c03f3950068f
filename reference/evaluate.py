r"""Evaluation of unpaired translations: realism and semantic consistency.

Metrics, each a plain function on features or images:

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets,

  .. math::  \mathrm{FD} = \|\mu_a - \mu_b\|^2 + \operatorname{tr}\bigl(\Sigma_a + \Sigma_b
             - 2 (\Sigma_a \Sigma_b)^{1/2}\bigr),

  in float64 with ``scipy.linalg.sqrtm``. With Inception features this is FID; here it is always
  available in the embedding space of a frozen encoder (no download): "encoder FD".
- :func:`kernel_distance`: KID's unbiased squared MMD with the polynomial kernel
  :math:`k(x, y) = (x^\top y / D + 1)^3`, averaged over random subsets.
- :func:`travel_consistency`: the mean over ordered pairs :math:`i \ne j` of the test set of
  :math:`\cos(E(x_i) - E(x_j),\ E(G(x_i)) - E(G(x_j)))`, i.e. ``1 - travel_loss(...)`` with the
  cosine distance and mean reduction. 1: every transformation vector kept its direction. Grade with
  a different encoder from the one used in training, so that a model is not graded by its own
  teacher.
- :func:`inception_metrics`: FID and KID with Inception-v3 through ``torch-fidelity``, only with a
  local Inception weights file (torch-fidelity would otherwise download it, which cannot work
  offline).

Command line, on folders of images (translations are paired with their sources by file stem)::

    python reference/evaluate.py --translations OUT/test_translated --target data/testB \
        --sources data/testA --encoder openai/clip-vit-base-patch32 --out metrics.json

The flip audit (no labels, no ``--target`` needed) ranks every translation by how likely it lost
its content, with an encoder the generator was not trained against, and writes ``audit.csv`` and
``audit.png`` (the K most and K least suspicious pairs) beside ``--out``
(:mod:`reference.audit_report`)::

    python reference/evaluate.py --translations OUT/test_translated --sources data/testA --audit 16 \
        --encoder facebook/dinov2-small --out audit/report.json

An existing ``--out`` file is not replaced unless ``--overwrite`` is given;
every mistake in the arguments is reported in one line before anything is computed (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.audit_report import AuditResult
from reference.data import ImageFolder
from reference.outputs import check_output_file, error_line
from reference.translate import positive_int_flag
from reference.translate import translate_images as translate_one_batch
from travel_loss.metrics import TravelConsistency

if TYPE_CHECKING:
    from travel_loss.encoder import Crop as EncoderCrop

__all__ = [
    "INCEPTION_WEIGHTS_HELP",
    "embed_images",
    "evaluate_folders",
    "format_table",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "inception_metrics",
    "kernel_distance",
    "mmd_squared_unbiased",
    "translate_images",
    "travel_consistency",
]

Features = Tensor | np.ndarray
Images = Tensor | Dataset

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_HELP = (
    "FID/KID with Inception-v3 need torch-fidelity and a local copy of its Inception weights: "
    "torch-fidelity would download them at run time, which cannot work offline. On a machine with "
    f"network access, download the file {INCEPTION_WEIGHTS_FILE} (an asset of torch-fidelity's "
    "GitHub release v0.2.0), copy it here, install torch-fidelity (`pip install torch-fidelity`; it "
    "needs torchvision) and pass --inception-weights FILE (inception_metrics(weights_path=FILE))."
)


# ---------------------------------------------------------------------------------------------
# Distances between feature sets
# ---------------------------------------------------------------------------------------------


def frechet_distance(feats_a: Features, feats_b: Features, *, eps: float = 1e-6) -> float:
    r"""Fréchet distance between Gaussians fitted to (N_a, D) and (N_b, D) features, N >= 2.

    Means and unbiased covariances are taken in float64; see
    :func:`frechet_distance_from_statistics` for the numerical guards and ``eps``.
    """
    a = _as_features("feats_a", feats_a)
    b = _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a, feats_b: expected the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_statistics(
        a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)), b.mean(0), np.atleast_2d(np.cov(b, rowvar=False)), eps=eps
    )


def frechet_distance_from_statistics(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, *, eps: float = 1e-6
) -> float:
    r"""Fréchet distance
    :math:`\|\mu_a - \mu_b\|^2 + \operatorname{tr}(\Sigma_a + \Sigma_b - 2(\Sigma_a\Sigma_b)^{1/2})`.

    Guards, in float64:

    - when :math:`(\Sigma_a \Sigma_b)^{1/2}` from ``scipy.linalg.sqrtm`` is not finite or does
      not square back to the product (relative residual > 1e-3, the near-singular case, e.g.
      fewer samples than dimensions), both covariances get :math:`\epsilon s I` added, with
      :math:`s` the larger mean variance, and the root is taken again;
    - round-off makes the root of this product of two symmetric PSD matrices slightly complex;
      imaginary parts up to 1e-3 of the largest real entry are dropped, larger ones raise
      ``ValueError``;
    - the result is clamped at 0 (it is a squared distance; round-off can make it -1e-12).
    """
    mu_a, mu_b = np.asarray(mu_a, dtype=np.float64), np.asarray(mu_b, dtype=np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, dtype=np.float64), np.asarray(sigma_b, dtype=np.float64)
    dim = mu_a.shape[0]
    for name, mu in (("mu_a", mu_a), ("mu_b", mu_b)):
        if mu.shape != (dim,):
            raise ValueError(f"{name}: expected a vector of length {dim}, got shape {mu.shape}")
    for name, sigma in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name}: expected a ({dim}, {dim}) covariance, got shape {sigma.shape}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")

    product = sigma_a @ sigma_b
    root = _sqrtm_or_none(product)
    if root is None:
        scale = max(float(np.trace(sigma_a)), float(np.trace(sigma_b)), 0.0) / dim or 1.0
        offset = eps * scale * np.eye(dim)
        root = _sqrtm_or_none((sigma_a + offset) @ (sigma_b + offset))
        if root is None:
            raise ValueError(
                "sigma_a, sigma_b: the square root of the covariance product failed even with "
                f"{eps * scale:.3g} * I added; are the features finite and not all identical?"
            )
    if np.iscomplexobj(root):
        largest_imaginary = float(np.abs(root.imag).max())
        largest_real = float(np.abs(root.real).max()) or 1.0
        if largest_imaginary > 1e-3 * largest_real:
            raise ValueError(
                f"sigma_a, sigma_b: the square root of the covariance product has an imaginary part "
                f"of {largest_imaginary:.3g} against real entries up to {largest_real:.3g}; the "
                "covariances are not positive semi-definite or far too ill-conditioned"
            )
        root = root.real
    difference = mu_a - mu_b
    distance = difference @ difference + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(root)
    return max(float(distance), 0.0)


def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
    """scipy's matrix square root if it is finite and squares back to ``matrix`` (rel. 1e-3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; the residual decides
        root = linalg.sqrtm(matrix)
    if isinstance(root, tuple):  # scipy < 1.16 with disp=False semantics
        root = root[0]
    if not np.isfinite(root).all():
        return None
    norm = np.linalg.norm(matrix)
    if norm > 0 and np.linalg.norm(root @ root - matrix) > 1e-3 * norm:
        return None
    return root


def mmd_squared_unbiased(
    feats_a: Features, feats_b: Features, *, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> float:
    r"""Unbiased squared MMD with the polynomial kernel :math:`k(x, y) = (\gamma x^\top y + c)^d`.

    .. math::  \widehat{\mathrm{MMD}}^2 = \frac{1}{m(m-1)}\sum_{i \ne j} k(a_i, a_j)
               + \frac{1}{n(n-1)}\sum_{i \ne j} k(b_i, b_j) - \frac{2}{mn}\sum_{i, j} k(a_i, b_j)

    for (m, D) and (n, D) features; :math:`\gamma = 1/D` by default (KID's kernel).
    """
    a = _as_features("feats_a", feats_a)
    b = _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a, feats_b: expected the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    m, n = a.shape[0], b.shape[0]
    k_aa = (gamma * a @ a.T + coef) ** degree
    k_bb = (gamma * b @ b.T + coef) ** degree
    k_ab = (gamma * a @ b.T + coef) ** degree
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())


def kernel_distance(
    feats_a: Features,
    feats_b: Features,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`mmd_squared_unbiased` over ``subsets`` random subsets.

    Each subset draws ``min(subset_size, N_a, N_b)`` rows of each set without replacement, with
    ``numpy.random.default_rng(seed)`` (the protocol of Bińkowski et al. and torch-fidelity).
    """
    a = _as_features("feats_a", feats_a)
    b = _as_features("feats_b", feats_b)
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets: expected an int >= 1, got {subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size: expected an int >= 2, got {subset_size!r}")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = [
        mmd_squared_unbiased(
            a[rng.choice(a.shape[0], size, replace=False)],
            b[rng.choice(b.shape[0], size, replace=False)],
            degree=degree,
            gamma=gamma,
            coef=coef,
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _as_features(name: str, feats: Features) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().double().numpy()
    elif isinstance(feats, np.ndarray):
        feats = feats.astype(np.float64, copy=False)
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor or numpy array of (N, D) features, got {type(feats).__name__}"
        )
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name}: expected (N, D) features with N >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: expected finite features, got NaN or infinite values")
    return feats


# ---------------------------------------------------------------------------------------------
# Images through an encoder or a generator
# ---------------------------------------------------------------------------------------------


def embed_images(
    encoder: nn.Module,
    images: Images,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Embeddings of all images, computed ``batch_size`` at a time under ``torch.no_grad()``.

    Args:
        encoder: maps (n, 3, H, W) images in the range it expects ([-1, 1] for
            :class:`travel_loss.encoder.FrozenCLIPEncoder`) to (n, D) embeddings, or to a tuple
            of them (an encoder ensemble). It is used as it is (its mode is not changed).
        images: an (N, 3, H, W) tensor, or a dataset whose items are images or tuples starting
            with an image (:class:`reference.data.ImageFolder`).
        device: where to run the batches; by default the device of the encoder's first
            parameter or buffer, else the CPU.

    Returns:
        (N, D) float32 on the CPU, or a tuple of them for a tuple-valued encoder.
    """
    _check_batch_size(batch_size)
    device = _module_device(encoder) if device is None else torch.device(device)
    parts: list[Any] = []
    with torch.no_grad():
        for batch in _batches(images, batch_size, progress, "embedding"):
            output = encoder(batch.to(device))
            if isinstance(output, (tuple, list)):
                parts.append(tuple(o.detach().float().cpu() for o in output))
            elif isinstance(output, Tensor):
                parts.append(output.detach().float().cpu().flatten(1))
            else:
                raise TypeError(
                    f"encoder: expected it to return a tensor or a tuple of tensors, got {type(output).__name__}"
                )
    if not parts:
        raise ValueError("images: expected at least one image, got none")
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))
    return torch.cat(parts)


def translate_images(
    generator: nn.Module,
    images: Images,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """G(x) for all images, in eval mode and without gradients, as (N, 3, H, W) float32 on the CPU.

    Batch by batch through :func:`reference.translate.translate_images` (any H, W); the
    generator's train/eval mode is restored afterwards.
    """
    _check_batch_size(batch_size)
    device = _module_device(generator) if device is None else torch.device(device)
    was_training = generator.training
    generator.eval()
    try:
        outputs = [
            translate_one_batch(generator, batch.to(device)).float().cpu()
            for batch in _batches(images, batch_size, progress, "translating")
        ]
    finally:
        generator.train(was_training)
    if not outputs:
        raise ValueError("images: expected at least one image, got none")
    return torch.cat(outputs)


def travel_consistency(
    encoder: nn.Module,
    sources: Images,
    translations: Images,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> float:
    r"""Mean cosine between :math:`E(x_i) - E(x_j)` and :math:`E(G(x_i)) - E(G(x_j))` over all pairs :math:`i \ne j`.

    Equals ``1 - travel_loss(E(sources), E(translations), distance="cosine", reduction="mean")``
    over the whole set: images are embedded in batches, then one travel loss is taken over all N
    embeddings. That loss works on N x N Gram matrices in float64 (a few N^2 * 8 bytes; about
    1 GB at N = 4000), which is fine up to several thousand images; subsample larger test sets.
    Row i of ``translations`` must be the translation of row i of ``sources``. In [-1, 1];
    1 means every transformation vector kept its direction. Tuple-valued encoders give the mean
    over their members.
    """
    emb_src = embed_images(encoder, sources, batch_size=batch_size, device=device)
    emb_gen = embed_images(encoder, translations, batch_size=batch_size, device=device)
    first_src = emb_src[0] if isinstance(emb_src, tuple) else emb_src
    first_gen = emb_gen[0] if isinstance(emb_gen, tuple) else emb_gen
    if first_src.shape[0] != first_gen.shape[0]:
        raise ValueError(
            f"sources, translations: expected one translation per source, got {first_src.shape[0]} "
            f"sources and {first_gen.shape[0]} translations"
        )
    return _travel_consistency_of(emb_src, emb_gen)


def _travel_consistency_of(emb_src: Tensor | tuple[Tensor, ...], emb_gen: Tensor | tuple[Tensor, ...]) -> float:
    metric = TravelConsistency(sync=False)
    metric.update(emb_src, emb_gen)
    return float(metric.compute())


def _batches(images: Images, batch_size: int, progress: bool, description: str):
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images: expected an (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        starts = range(0, images.shape[0], batch_size)
        for start in _maybe_tqdm(starts, progress, description):
            yield images[start : start + batch_size]
        return
    if not isinstance(images, Dataset):
        raise TypeError(f"images: expected a tensor (N, C, H, W) or a Dataset, got {type(images).__name__}")
    starts = range(0, len(images), batch_size)  # type: ignore[arg-type]
    for start in _maybe_tqdm(starts, progress, description):
        items = [images[index] for index in range(start, min(start + batch_size, len(images)))]  # type: ignore[arg-type]
        yield torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


def _maybe_tqdm(iterable, progress: bool, description: str):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, unit="batch", leave=False)


def _module_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")


# ---------------------------------------------------------------------------------------------
# Inception FID / KID through torch-fidelity (optional)
# ---------------------------------------------------------------------------------------------


def inception_metrics(
    translations: str | os.PathLike[str],
    target: str | os.PathLike[str],
    weights_path: str | os.PathLike[str] | None,
    *,
    kid_subset_size: int = 1000,
    cuda: bool | None = None,
) -> dict[str, float]:
    """FID and KID with Inception-v3 features between two image folders, through torch-fidelity.

    Needs a local Inception weights file (``weights_path``), since torch-fidelity downloads it
    otherwise and that cannot work offline, and ``torch-fidelity`` installed (an optional
    dependency; it pulls torchvision). Both are checked before any work, with
    :data:`INCEPTION_WEIGHTS_HELP` in the error. torch-fidelity reads every image of each folder;
    all images of a folder must have one size. KID subsets have ``min(kid_subset_size, N)``
    images.

    Returns ``{"inception_fid", "inception_kid_mean", "inception_kid_std"}``.
    """
    if weights_path is None:
        raise FileNotFoundError("no Inception weights file given. " + INCEPTION_WEIGHTS_HELP)
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {weights_path}. " + INCEPTION_WEIGHTS_HELP)
    try:
        import torch_fidelity
    except ImportError as error:
        raise ImportError("torch-fidelity is not installed. " + INCEPTION_WEIGHTS_HELP) from error
    counts = [_count_images(Path(folder)) for folder in (translations, target)]
    metrics = torch_fidelity.calculate_metrics(
        input1=str(translations),
        input2=str(target),
        fid=True,
        kid=True,
        kid_subset_size=min(kid_subset_size, *counts),
        feature_extractor_weights_path=str(weights_path),
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        verbose=False,
    )
    return {
        "inception_fid": float(metrics["frechet_inception_distance"]),
        "inception_kid_mean": float(metrics["kernel_inception_distance_mean"]),
        "inception_kid_std": float(metrics["kernel_inception_distance_std"]),
    }


def _count_images(folder: Path) -> int:
    from reference.data import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {folder}")
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------


def evaluate_folders(
    translations: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    sources: str | os.PathLike[str] | None = None,
    encoder: nn.Module | None = None,
    size: int = 256,
    inception_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """All metrics that the given inputs allow, as ``{"metrics": {name: float}, "details": ..., "notes": [...]}``.

    Images are loaded at ``size x size`` with :class:`reference.data.ImageFolder`. Translations
    pair with sources by file stem (``reference/translate.py`` keeps base names); a translation
    without a source is an error.
    """
    fakes = ImageFolder(translations, size=size)
    reals = ImageFolder(target, size=size)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"count_translations": len(fakes), "count_target": len(reals)}
    notes: list[str] = []
    paired_sources = None
    translated: Images = fakes  # in the order of paired_sources when sources are given
    if sources is not None:
        sources_folder = ImageFolder(sources, size=size)
        paired_sources, translated = _pair_by_stem(sources_folder, fakes)

    if encoder is not None:
        metrics.update(_encoder_metrics(encoder, translated, reals, paired_sources, batch_size, device))
    else:
        notes.append("no encoder given: encoder Fréchet distance and travel consistency skipped")

    if inception_weights is not None:
        metrics.update(inception_metrics(translations, target, inception_weights))
    else:
        notes.append("Inception FID/KID skipped. " + INCEPTION_WEIGHTS_HELP)
    return {"metrics": metrics, "details": details, "notes": notes}


def _pair_by_stem(sources: ImageFolder, translations: ImageFolder) -> tuple[Subset, Subset]:
    """Sources and translations reordered so that row i of each shares a file stem."""
    source_index = {path.stem: i for i, path in enumerate(sources.paths)}
    translation_index = {path.stem: i for i, path in enumerate(translations.paths)}
    orphans = sorted(set(translation_index) - set(source_index))
    if orphans:
        raise ValueError(
            f"translations: {len(orphans)} of {len(translation_index)} images have no source of the same "
            f"name in {sources.folder} (first: {orphans[0]!r})"
        )
    stems = sorted(translation_index)
    return Subset(sources, [source_index[s] for s in stems]), Subset(
        translations, [translation_index[s] for s in stems]
    )


def _encoder_metrics(
    encoder: nn.Module,
    translated: Images,
    targets: Images,
    sources: Images | None,
    batch_size: int,
    device: torch.device | str | None,
) -> dict[str, float]:
    emb_fake = embed_images(encoder, translated, batch_size=batch_size, device=device)
    emb_real = embed_images(encoder, targets, batch_size=batch_size, device=device)
    if isinstance(emb_fake, tuple) or isinstance(emb_real, tuple):  # the same encoder: both or neither
        raise TypeError("encoder: expected one encoder with (N, D) outputs for the Fréchet distance, got an ensemble")
    kid_mean, kid_std = kernel_distance(emb_fake, emb_real)
    metrics = {
        "encoder_frechet_distance": frechet_distance(emb_fake, emb_real),
        "encoder_kernel_distance": kid_mean,
        "encoder_kernel_distance_std": kid_std,
    }
    if sources is not None:
        emb_src = embed_images(encoder, sources, batch_size=batch_size, device=device)
        metrics["travel_consistency"] = _travel_consistency_of(emb_src, emb_fake)
    return metrics


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    markdown: bool = False,
    right: Collection[str] = (),
) -> str:
    """Rows of dicts as an aligned text table (or a markdown table) of ``columns``; floats to 4
    significant digits, None as "-", strings as they are. Columns named in ``right`` are
    right-aligned (numbers); the text table's lines carry no trailing spaces."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return "-" if value is None else str(value)

    table = [list(columns)] + [[cell(row.get(column)) for column in columns] for row in rows]
    if markdown:
        rule = "|" + "|".join("---:" if column in right else "---" for column in columns) + "|"
        lines = ["| " + " | ".join(table[0]) + " |", rule]
        lines += ["| " + " | ".join(line) + " |" for line in table[1:]]
        return "\n".join(lines)
    widths = [max(len(line[k]) for line in table) for k in range(len(columns))]
    justify = [str.rjust if column in right else str.ljust for column in columns]
    lines = ["  ".join(pad(text, width) for text, width, pad in zip(line, widths, justify)) for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def load_encoder(
    spec: str,
    *,
    crop: EncoderCrop = "center",
    features: str | None = None,
    device: str = "cpu",
    mode: str = "clip",
    size: int = 256,
) -> nn.Module:
    """The frozen encoder ``--encoder`` names, as the trainer takes it (``--encoder-mode``).

    - ``clip``: a :class:`travel_loss.FrozenEncoder` from a local folder or a hub id already in the
      Hugging Face cache (CLIP, SigLIP, DINOv2, DINOv3, ViT: read off the checkpoint's
      ``model_type``); never downloads (``local_files_only=True``): a checkpoint that is not
      available locally raises ``travel_loss.CheckpointNotFoundError`` saying how to get it.
      ``features`` None takes the family's default (CLIP ``pooled``, DINOv2 ``cls``).
    - ``module``: ``FILE.py:FACTORY`` or ``package.module:FACTORY``, built, frozen and checked as the
      trainer does (``reference.user_embedder``; the factory gets ``image_size=size``).
    """
    if mode == "module":
        from reference.user_embedder import build_user_embedder

        return build_user_embedder(spec, size).to(device)
    from travel_loss.encoder import FrozenEncoder

    return FrozenEncoder(spec, crop=crop, features=features, local_files_only=True).to(device)


def _parser() -> argparse.ArgumentParser:
    from travel_loss.audit import METHODS

    parser = argparse.ArgumentParser(
        prog="reference/evaluate.py",
        description="Evaluate translations: encoder Fréchet distance, travel consistency "
        "and Inception FID/KID with a local weights file; with --audit, rank the translations by how "
        "likely each one lost its content (no labels).",
    )
    parser.add_argument("--translations", required=True, help="folder of translated images G(x)")
    parser.add_argument(
        "--target", help="folder of real images of the target domain (required unless --audit is given)"
    )
    parser.add_argument("--sources", help="folder of the source images x (paired with translations by file stem)")
    parser.add_argument(
        "--encoder",
        help="frozen encoder: a CLIP/SigLIP/DINOv2 checkpoint (local folder or a model id in the HF cache), "
        "or FILE.py:FACTORY with --encoder-mode module",
    )
    parser.add_argument("--encoder-mode", default="clip", choices=["clip", "module"], help="as in train.py")
    parser.add_argument("--encoder-crop", default="center", choices=["center", "resize", "full"])
    parser.add_argument(
        "--encoder-features",
        choices=["pooled", "projected", "cls", "mean"],
        help="which output is the embedding (default: the family's, CLIP pooled, DINOv2 cls)",
    )
    parser.add_argument(
        "--inception-weights", help=f"local Inception weights file ({INCEPTION_WEIGHTS_FILE}) for FID/KID"
    )
    parser.add_argument(
        "--size", type=positive_int_flag, default=256, help="images are resized to SIZE x SIZE (default 256)"
    )
    parser.add_argument("--batch-size", type=positive_int_flag, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--audit",
        type=positive_int_flag,
        metavar="K",
        help="rank every translation by how likely it lost its content (needs --sources and --encoder, one "
        "the generator was NOT trained against); writes audit.csv and audit.png (the K most and K least "
        "suspicious pairs) into the folder of --out",
    )
    parser.add_argument("--audit-method", default="row_mean", choices=list(METHODS), help="travel_loss.flip_scores")
    parser.add_argument(
        "--audit-neighbours", type=positive_int_flag, default=10, help="k of --audit-method local (default 10)"
    )
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and audit files)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Raise (ValueError or OSError) with one line naming the flag, before anything is computed."""
    if args.target is None and args.audit is None:
        raise ValueError("--target: required unless --audit is given (a folder of real target-domain images)")
    if args.audit is not None and args.sources is None:
        raise ValueError("--sources: --audit pairs each translation with its source; pass the folder of source images")
    if args.audit is not None and args.encoder is None:
        raise ValueError(
            "--encoder: --audit needs a frozen encoder, one the generator was not trained against "
            "(e.g. DINOv2 or SigLIP for a CLIP-trained generator)"
        )
    if args.encoder_mode == "module" and (args.encoder is None or ":" not in args.encoder):
        raise ValueError(f"--encoder: expected FILE.py:FACTORY with --encoder-mode module, got {args.encoder!r}")
    for flag, folder in (("--translations", args.translations), ("--target", args.target), ("--sources", args.sources)):
        if folder is not None and not Path(folder).is_dir():
            found = "a file" if Path(folder).exists() else "nothing"
            raise FileNotFoundError(f"{flag}: expected a folder of images, found {found} at {folder}")
    check_output_file(args.out, "--out", overwrite=args.overwrite)
    if args.audit is not None:
        from reference.audit_report import AUDIT_CSV, AUDIT_FIGURE

        for name in (AUDIT_CSV, AUDIT_FIGURE):
            check_output_file(Path(args.out).parent / name, "--out", overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check_arguments(args)  # before computing anything
    except (OSError, ValueError) as error:
        print(error_line(parser.prog, error), file=sys.stderr)
        return 2
    encoder = None
    if args.encoder:
        try:
            encoder = load_encoder(
                args.encoder, crop=args.encoder_crop, features=args.encoder_features, device=args.device,
                mode=args.encoder_mode, size=args.size,
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as error:
            print(error_line(parser.prog, error), file=sys.stderr)
            return 2
    result: dict[str, Any] = {"metrics": {}, "details": {}, "notes": []}
    audit = None
    try:
        if args.target is not None:
            result = evaluate_folders(
                args.translations,
                args.target,
                sources=args.sources,
                encoder=encoder,
                size=args.size,
                inception_weights=args.inception_weights,
                batch_size=args.batch_size,
                device=args.device,
            )
        if args.audit is not None:
            audit = _run_audit(args, encoder, result)
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(error_line(parser.prog, error), file=sys.stderr)
        return 2
    result["inputs"] = {
        "translations": args.translations,
        "target": args.target,
        "sources": args.sources,
        "encoder": args.encoder,
        "encoder_mode": args.encoder_mode,
        "size": args.size,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["metrics"]:
        rows = [{"metric": name, "value": value} for name, value in result["metrics"].items()]
        print(format_table(rows, ["metric", "value"]))
    for note in result["notes"]:
        print(f"note: {note}")
    for line in audit or ():
        print(line)
    print(f"wrote {out}")
    return 0


def audit_folders(
    translations: str | os.PathLike[str],
    sources: str | os.PathLike[str],
    encoder: nn.Module,
    *,
    size: int = 256,
    method: str = "row_mean",
    neighbours: int = 10,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> AuditResult:
    """Embed every translation and its source (paired by file stem; a translation without a source is
    an error), then score each pair with :func:`travel_loss.flip_scores` (both methods are kept)."""
    from travel_loss.audit import flip_scores

    paired_sources, paired_translations = _pair_by_stem(
        ImageFolder(sources, size=size), ImageFolder(translations, size=size)
    )
    if len(paired_translations) < 2:
        raise ValueError(f"translations: expected at least 2 images to rank, got {len(paired_translations)}")
    options: dict[str, Any] = dict(batch_size=batch_size, device=device, progress=progress)
    emb_src = embed_images(encoder, paired_sources, **options)
    emb_gen = embed_images(encoder, paired_translations, **options)
    by_method = {m: flip_scores(emb_src, emb_gen, method=m, neighbours=neighbours) for m in ("row_mean", "local")}
    return AuditResult(
        files=[paired_translations.dataset.paths[i] for i in paired_translations.indices],  # type: ignore[attr-defined]
        sources=[paired_sources.dataset.paths[i] for i in paired_sources.indices],  # type: ignore[attr-defined]
        scores=by_method[method],
        by_method=by_method,
        method=method,
        neighbours=neighbours,
        travel_consistency=_travel_consistency_of(emb_src, emb_gen),
    )


def _run_audit(args: argparse.Namespace, encoder: nn.Module | None, result: dict[str, Any]) -> list[str]:
    """The flip audit into ``result["audit"]``, audit.csv and audit.png beside --out; the lines to print."""
    from reference.audit_report import (
        AUDIT_CSV,
        AUDIT_FIGURE,
        save_audit_figure,
        score_lines,
        write_audit_csv,
    )

    assert encoder is not None  # _check_arguments: --audit needs --encoder
    audit = audit_folders(
        args.translations, args.sources, encoder, size=args.size, method=args.audit_method,
        neighbours=args.audit_neighbours, batch_size=args.batch_size, device=args.device, progress=True,
    )  # fmt: skip
    folder = Path(args.out).parent
    folder.mkdir(parents=True, exist_ok=True)
    summary = audit.summary(args.audit)
    summary["csv"] = str(write_audit_csv(audit, folder / AUDIT_CSV))
    summary["figure"] = str(save_audit_figure(audit, args.audit, folder / AUDIT_FIGURE))
    result["audit"] = summary
    scores = summary["scores"]
    lines = [
        f"audit: {summary['count']} translations, {args.audit_method} scores median {scores['median']:.4f}, "
        f"p90 {scores['p90']:.4f}, max {scores['max']:.4f} (higher = more likely flipped); "
        f"travel consistency {summary['travel_consistency']:.4f}",
        *score_lines(audit, args.audit),
        f"audit: every score in {summary['csv']}, the {min(args.audit, summary['count'])} most and least "
        f"suspicious pairs in {summary['figure']}",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
