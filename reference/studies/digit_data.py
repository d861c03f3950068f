r"""Real handwritten digits for the digit study: two styles, a class-prior mismatch, a label judge.

The data are scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797 real
8 x 8 scans with labels, shipped inside scikit-learn, no download). Four disjoint subsets of the
scans are drawn with a fixed seed:

- **A-train** and **A-test**: the source domain, rendered in style A (light ink on a dark
  navy background, thin strokes), every class about equally often;
- **B**: the target domain, rendered in style B (dark red ink on cream paper, thick strokes:
  the opposite polarity), with *strongly skewed class frequencies*: class ``order[k]`` keeps a
  fraction ``skew ** k`` of its scans, so the two most common classes make up about half of B
  and the rarest ones a few images. This is the mechanism behind CycleGAN painting trees into
  GTA's sky: a discriminator that sees whole images learns B's class prior, and a generator
  that only has to look like B is pushed to turn rare classes into common ones;
- **judge**: a third set, rendered in style B with all classes, on which a label classifier
  (the *judge*) is fitted. It scores a translation by whether it still shows the input's digit.

Scores of translations ``G(x)`` of A-test images (:func:`score_digit_translations`):

- **label accuracy** (1 is ideal): the judge's label of G(x) equals x's label;
- **KID** (0 is ideal): :func:`kid` in :func:`pixel_features` (pixels and local contrast) against
  B-style renders of balanced held-out scans (``realism_reference``): realism that sees speckle;
- **L1 to the ideal** (0 is ideal): :func:`fidelity_l1`, the ideal being the scan rendered in B's style;
- **colour fraction** (1 is ideal, secondary): :func:`realism`, pixels on B's ink-paper colour
  segment; blind to where they are, so B-coloured speckle scores 1.

The embedders of the study (:func:`stroke_embedder`, :func:`pixel_embedder`) are fitted
without labels on A-train only; see their docstrings for why one works and the other does not.

Shapes: images (N, 3, S, S) float32 in [-1, 1] (S = ``size``, 16 by default); labels (N,) int64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIGIT_SIZE",
    "DigitDomains",
    "DigitJudge",
    "OrientationPrototypeEmbedder",
    "PixelPCAEmbedder",
    "StrokePCAEmbedder",
    "audit_digit_translations",
    "coloured_noise",
    "digit_domains",
    "fidelity_l1",
    "kid",
    "orientation_embedder",
    "orientation_map",
    "pixel_embedder",
    "pixel_features",
    "random_embedder",
    "render_digits",
    "salt_and_pepper",
    "score_digit_translations",
    "stroke_embedder",
]

DIGIT_SIZE = 16
STYLE_A = {"paper": (0.08, 0.10, 0.30), "ink": (1.00, 0.88, 0.25), "thickness": 0}  # light on dark navy
STYLE_B = {"paper": (0.96, 0.92, 0.82), "ink": (0.55, 0.06, 0.10), "thickness": 1}  # dark red on cream
REALISM_TOLERANCE = 0.12  # RGB distance in [0, 1] units to B's paper-ink segment
SPLIT_SIZES = {"a_train": 500, "a_test": 200, "judge": 400}  # the rest (697 scans) is B's pool
DEFAULT_SKEW = 0.6


@functools.lru_cache(maxsize=1)
def _scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def render_digits(
    scans: Tensor, style: dict, size: int = DIGIT_SIZE, generator: torch.Generator | None = None
) -> Tensor:
    """Paint 8 x 8 scans (N, 8, 8) in [0, 1] as (N, 3, size, size) images in [-1, 1] in ``style``.

    The scan is upsampled bilinearly, thickened by ``style["thickness"]`` 3 x 3 dilations (a max
    filter), softened by ``style.get("blur", 0)`` 3 x 3 box filters, and each pixel mixes the
    style's paper and ink colours by its ink amount. With a ``generator``, each image is shifted by
    up to one pixel and its two colours jittered by +-0.04 per channel, so that a domain is a
    distribution, not a single rendering.
    """
    ink = F.interpolate(scans[:, None].float(), size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    for _ in range(style["thickness"]):
        ink = F.max_pool2d(ink, 3, stride=1, padding=1)
    for _ in range(style.get("blur", 0)):
        ink = F.avg_pool2d(ink, 3, stride=1, padding=1, count_include_pad=False)
    paper = torch.tensor(style["paper"]).view(1, 3, 1, 1).expand(len(scans), 3, 1, 1)
    colour = torch.tensor(style["ink"]).view(1, 3, 1, 1).expand(len(scans), 3, 1, 1)
    if generator is not None:
        shifts = torch.randint(-1, 2, (len(scans), 2), generator=generator)
        ink = torch.stack([torch.roll(i, (int(dy), int(dx)), dims=(-2, -1)) for i, (dy, dx) in zip(ink, shifts)])
        paper = (paper + 0.04 * (2 * torch.rand(len(scans), 3, 1, 1, generator=generator) - 1)).clamp(0, 1)
        colour = (colour + 0.04 * (2 * torch.rand(len(scans), 3, 1, 1, generator=generator) - 1)).clamp(0, 1)
    return (paper + ink * (colour - paper)) * 2 - 1


@dataclass(frozen=True)
class DigitDomains:
    """The study's data: images in [-1, 1] and labels of the four disjoint subsets (see the module docstring)."""

    a_train: Tensor
    a_train_labels: Tensor
    a_test: Tensor
    a_test_labels: Tensor
    a_test_ideal: Tensor  # A-test scans rendered in style B: the ideal translations
    b: Tensor
    b_labels: Tensor
    judge: Tensor
    judge_labels: Tensor
    class_order: tuple[int, ...]  # B's classes from most to least frequent
    realism_reference: Tensor  # judge scans in style B, every class equally often: KID's reference set
    realism_reference_labels: Tensor
    scan_ids: dict[str, Tensor]  # subset name -> indices into load_digits() of its scans (disjoint)


SPLIT_SEED = 0  # the split into A-train, A-test, judge and B's pool, the same for every study seed


def digit_domains(
    seed: int = 0, size: int = DIGIT_SIZE, skew: float = DEFAULT_SKEW, copies: int = 2,
    style_a: dict = STYLE_A, style_b: dict = STYLE_B,
) -> DigitDomains:  # fmt: skip
    """Split scikit-learn's digits into A-train, A-test, B (class frequencies ``skew ** rank``) and judge sets.

    The split, A's renders and the judge's are fixed (``SPLIT_SEED``), so the embedders fitted
    on A-train are the same for every study seed; ``seed`` draws B's class order and B's
    render jitter. Training sets hold ``copies`` renderings of each scan (random one-pixel
    shifts and colour jitter); test and ideal images are rendered once without jitter.
    ``skew`` in (0, 1]: 1 keeps B balanced. ``style_a`` and ``style_b`` (:func:`render_digits`)
    paint A (A-train, A-test) and B (B, the judge's set, the ideal translations, KID's reference).
    """
    if not 0 < skew <= 1:
        raise ValueError(f"skew must be in (0, 1], got {skew!r}")
    images, labels = _scans()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    bounds = np.cumsum([SPLIT_SIZES["a_train"], SPLIT_SIZES["a_test"], SPLIT_SIZES["judge"]])
    a_train, a_test, judge, pool_b = np.split(order, bounds)
    class_order = tuple(int(c) for c in np.random.default_rng(seed).permutation(10))
    keep = []
    for rank, digit in enumerate(class_order):
        members = pool_b[labels[pool_b] == digit]
        keep.append(members[: max(1, round(len(members) * skew**rank))])
    b = np.concatenate(keep)
    scans, targets = torch.from_numpy(images), torch.from_numpy(labels)

    def rendered(index: np.ndarray, style: dict, jitter_seed: int) -> tuple[Tensor, Tensor]:
        index = np.tile(index, copies)
        return render_digits(scans[index], style, size, torch.Generator().manual_seed(jitter_seed)), targets[index]

    a_train_images, a_train_labels = rendered(a_train, style_a, SPLIT_SEED)
    b_images, b_labels = rendered(b, style_b, 1000 + seed)
    judge_images, judge_labels = rendered(judge, style_b, SPLIT_SEED + 1)
    balanced = np.concatenate(
        [judge[labels[judge] == d][: min(np.bincount(labels[judge], minlength=10))] for d in range(10)]
    )
    return DigitDomains(
        a_train=a_train_images, a_train_labels=a_train_labels,
        a_test=render_digits(scans[a_test], style_a, size), a_test_labels=targets[a_test],
        a_test_ideal=render_digits(scans[a_test], style_b, size),
        b=b_images, b_labels=b_labels, judge=judge_images, judge_labels=judge_labels, class_order=class_order,
        realism_reference=render_digits(scans[balanced], style_b, size, torch.Generator().manual_seed(SPLIT_SEED + 2)),
        realism_reference_labels=targets[balanced],
        scan_ids={name: torch.from_numpy(ids) for name, ids in
                  (("a_train", a_train), ("a_test", a_test), ("b", b), ("judge", judge))},
    )  # fmt: skip


class DigitJudge:
    """A label classifier for style-B digits: an RBF support-vector machine on the pixels.

    Fitted on the judge set (style B, all classes, disjoint from A and B). ``predict(images)``
    (N, 3, S, S) in [-1, 1] -> labels (N,).
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        from sklearn.svm import SVC

        self._model = SVC(C=10.0, gamma="scale")
        self._model.fit(self._features(images), labels.numpy())

    @staticmethod
    def _features(images: Tensor) -> np.ndarray:
        return images.detach().float().flatten(1).cpu().numpy()

    def predict(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self._model.predict(self._features(images)))

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((self.predict(images) == labels.cpu()).float().mean())


def realism(images: Tensor, style: dict = STYLE_B, tolerance: float = REALISM_TOLERANCE) -> float:
    """Fraction of pixels whose colour lies within ``tolerance`` of the style's paper-ink segment (RGB in [0, 1]).

    A secondary score: it cannot see *where* the pixels are, so speckle in B's two colours scores 1.
    """
    pixels = ((images.detach().float().cpu() + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 3)
    paper, ink = torch.tensor(style["paper"]), torch.tensor(style["ink"])
    direction = ink - paper
    t = ((pixels - paper) @ direction / direction.dot(direction)).clamp(0, 1)
    distance = (pixels - (paper + t[:, None] * direction)).norm(dim=1)
    return float((distance <= tolerance).float().mean())


CONTRAST_WEIGHT = 6.0  # on balanced B renders the contrast block then varies about as much as the pixels


def pixel_features(images: Tensor) -> Tensor:
    """KID's feature space for the digits: the pixels and their local contrast, (N, 3, S, S) in [-1, 1] -> (N, 6 S^2).

    For x on the [0, 1] scale: ``[x, CONTRAST_WEIGHT * |x - box3(x)|]`` per pixel and channel, where
    box3 is the 3 x 3 mean (replicate padding). The pixels see where the strokes are and their
    colours; the local contrast sees texture: B-coloured speckle, which keeps the mean colour and
    hardly moves a pixel-space KID, multiplies the contrast away from the strokes. The space is
    fixed and no method trains in it (the travel embedders see pooled stroke maps or principal
    components), and at 16 px there is no detail that a pretrained network would add.
    """
    pixels = (images.detach().double().cpu() + 1) / 2
    local_mean = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return torch.cat([pixels.flatten(1), CONTRAST_WEIGHT * (pixels - local_mean).abs().flatten(1)], dim=1)


def kid(images: Tensor, reference: Tensor, *, subsets: int = 50, subset_size: int = 100) -> tuple[float, float]:
    """KID (Binkowski et al. 2018) between ``images`` and ``reference`` in :func:`pixel_features`:
    mean and standard deviation over ``subsets`` random subsets of the unbiased MMD^2 with the
    cubic kernel :math:`k(a, b) = (a^\top b / d + 1)^3`; 0 when the two sets come from one distribution."""
    from reference.evaluate import kernel_distance

    return kernel_distance(pixel_features(images), pixel_features(reference), subsets=subsets, subset_size=subset_size)


def fidelity_l1(translated: Tensor, ideal: Tensor) -> float:
    """Mean absolute difference to the ideal translations per pixel and channel, on the [0, 1] scale
    (0: the ideal itself). Shapes (N, 3, S, S), the same for both."""
    if translated.shape != ideal.shape:
        raise ValueError(
            f"translated, ideal: expected the same shape, got {tuple(translated.shape)} and {tuple(ideal.shape)}"
        )
    return float((translated.detach().float().cpu() - ideal.float().cpu()).abs().mean() / 2)


def salt_and_pepper(
    images: Tensor, density: float, generator: torch.Generator, style: dict = STYLE_B
) -> Tensor:  # fmt: skip
    """``images`` with a fraction ``density`` of pixels set to the style's ink or paper colour at random
    (B-coloured speckle: the colour fraction cannot see it). Shapes (N, 3, S, S) in [-1, 1]."""
    if not 0 <= density <= 1:
        raise ValueError(f"density: expected a fraction in [0, 1], got {density!r}")
    n, _, height, width = images.shape
    hit = torch.rand(n, 1, height, width, generator=generator) < density
    ink = torch.rand(n, 1, height, width, generator=generator) < 0.5
    colours = torch.where(
        ink, torch.tensor(style["ink"]).view(1, 3, 1, 1), torch.tensor(style["paper"]).view(1, 3, 1, 1)
    )
    return torch.where(hit, colours * 2 - 1, images)


def coloured_noise(count: int, size: int, generator: torch.Generator, style: dict = STYLE_B) -> Tensor:
    """(count, 3, size, size) images whose every pixel is an independent uniform mix of the style's
    paper and ink colours: all in B's colours, no digit."""
    mix = torch.rand(count, 1, size, size, generator=generator)
    paper, ink = (torch.tensor(style[key]).view(1, 3, 1, 1) for key in ("paper", "ink"))
    return (paper + mix * (ink - paper)) * 2 - 1


def score_digit_translations(
    translated: Tensor, domains: DigitDomains, judge: DigitJudge
) -> dict[str, float]:  # fmt: skip
    """The study's scores of translations (N, 3, S, S) of ``domains.a_test``:

    - ``label_accuracy``: the judge reads the input's digit (1 is ideal);
    - ``kid``, ``kid_std``: :func:`kid` against B-style renders of balanced held-out scans (0 is ideal);
    - ``fidelity_l1``: :func:`fidelity_l1` to the ideal translations (0 is ideal);
    - ``realism``: the colour fraction, :func:`realism` (1 is ideal; blind to speckle).
    """
    kid_mean, kid_std = kid(translated, domains.realism_reference)
    return {
        "label_accuracy": judge.accuracy(translated, domains.a_test_labels),
        "kid": kid_mean,
        "kid_std": kid_std,
        "fidelity_l1": fidelity_l1(translated, domains.a_test_ideal),
        "realism": realism(translated),
    }


# ---------------------------------------------------------------------------------------------
# The frozen embedders, fitted without labels on A-train only
# ---------------------------------------------------------------------------------------------


def _pca_basis(features: Tensor, components: int) -> tuple[Tensor, Tensor]:
    """Mean (F,) and the top ``components`` principal directions (F, k) of (N, F) features."""
    mean = features.mean(0)
    _, _, v = torch.linalg.svd(features - mean, full_matrices=False)
    return mean, v[:components].T.contiguous()


class StrokePCAEmbedder(nn.Module):
    r"""Where the strokes are, whatever their colour: a style-invariant embedder for the digit study.

    For an image x (N, 3, S, S) in [-1, 1]: the paper colour is the per-image, per-channel median
    :math:`p`; the stroke map is the colour distance to it, :math:`s = \lVert x - p \rVert_2` per
    pixel, divided by its root mean square (so that ink contrast does not matter); it is
    average-pooled to ``grid`` x ``grid`` cells (a low-pass front end: patterns finer than a cell
    cannot change the embedding) and projected on the top principal directions of A-train's
    pooled stroke maps. Light-on-dark and dark-on-light strokes give the same map, so a digit and
    its ideal translation embed alike, while two different digits embed apart. Output (N, k).
    """

    mean: Tensor  # buffers
    basis: Tensor

    def __init__(self, mean: Tensor, basis: Tensor, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)

    @staticmethod
    def stroke_field(images: Tensor) -> Tensor:
        """The stroke map at full resolution, (N, 1, S, S): colour distance to the paper, RMS-normalised."""
        paper = images.flatten(2).median(dim=2).values[..., None, None]
        stroke = (images - paper).square().sum(1, keepdim=True).add(1e-6).sqrt()
        return stroke / stroke.square().mean((2, 3), keepdim=True).add(1e-6).sqrt()

    @staticmethod
    def stroke_map(images: Tensor, grid: int) -> Tensor:
        return F.adaptive_avg_pool2d(StrokePCAEmbedder.stroke_field(images), grid).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        return (self.stroke_map(images, self.grid) - self.mean) @ self.basis

    def tokens(self, images: Tensor) -> Tensor:
        """Spatial features for the structure term: the 3 x 3 patch of the stroke field around each
        pixel, (N, 9, S, S) (zero outside the image). Colour-free like the embedding, but at full
        resolution and local: which pixels' neighbourhoods look alike (stroke, edge, paper)."""
        field = self.stroke_field(images)
        return F.unfold(field, 3, padding=1).unflatten(2, tuple(field.shape[-2:]))


class PixelPCAEmbedder(nn.Module):
    """The ablation: principal components of A-train's raw pixels, (N, 3, S, S) -> (N, k).

    Also fitted without labels on A only, but *not* invariant to the style change: B's opposite
    polarity turns a stroke's contribution around, so the transformation vector between two
    translated digits points roughly opposite to the one between the inputs.
    """

    mean: Tensor  # buffers
    basis: Tensor

    def __init__(self, mean: Tensor, basis: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)

    def forward(self, images: Tensor) -> Tensor:
        return (images.flatten(1) - self.mean) @ self.basis


@functools.lru_cache(maxsize=4)
def _a_train(size: int) -> Tensor:
    return digit_domains(size=size).a_train  # the same for every study seed


def stroke_embedder(image_size: int = DIGIT_SIZE, components: int = 32, grid: int = 8) -> nn.Module:
    """The digit study's frozen embedder: :class:`StrokePCAEmbedder` fitted on A-train (no labels).

    A factory for ``reference/train.py --encoder-mode module
    --encoder reference/studies/digit_data.py:stroke_embedder``.
    """
    a_train = _a_train(image_size)
    mean, basis = _pca_basis(StrokePCAEmbedder.stroke_map(a_train, grid), components)
    return StrokePCAEmbedder(mean, basis, grid).eval().requires_grad_(False)


def pixel_embedder(image_size: int = DIGIT_SIZE, components: int = 32) -> nn.Module:
    """The ablation's frozen embedder: :class:`PixelPCAEmbedder` fitted on A-train (no labels)."""
    a_train = _a_train(image_size)
    mean, basis = _pca_basis(a_train.flatten(1), components)
    return PixelPCAEmbedder(mean, basis).eval().requires_grad_(False)


def random_embedder(image_size: int = DIGIT_SIZE, width: int = 32, dim: int = 64) -> nn.Module:
    """The random-weights ablation (the paper's random CLIP, at this scale): a small conv net
    (3 x [conv3 stride 2, ReLU], global average pool, linear to ``dim``) with fixed random weights
    (seed 0), frozen. (N, 3, S, S) -> (N, dim)."""
    del image_size  # any size: the pool makes the output size-free
    generator = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(3):
        conv = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        layers += [conv, nn.ReLU()]
        channels = width
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, dim))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.5 if parameter.dim() > 1 else 0.1))
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# A second frozen embedder, for auditing: no method of the study trains against it
# ---------------------------------------------------------------------------------------------


def orientation_map(images: Tensor, cell: int = 4, bins: int = 8) -> Tensor:
    r"""Where the strokes run in which direction, whatever their colour and thickness (HOG-like).

    (N, 3, S, S) images in [-1, 1] -> (N, bins * (S // cell)^2), each row of unit length. The
    full-resolution stroke map of :class:`StrokePCAEmbedder` (colour distance to the paper,
    RMS-normalised: polarity and colours gone) is smoothed by a 3 x 3 binomial filter, its Sobel
    gradient's magnitude is split between the two nearest of ``bins`` *unsigned* orientations in
    [0, pi) (both edges of a stroke count alike, so a thicker stroke moves edges by a pixel but
    keeps their orientation), and summed over ``cell`` x ``cell`` pixel cells.
    """
    size = images.shape[-1]
    stroke = StrokePCAEmbedder.stroke_map(images, size).view(-1, 1, size, size)
    binomial = torch.tensor([1.0, 2.0, 1.0])
    smooth = (binomial[:, None] * binomial[None, :] / 16).view(1, 1, 3, 3)
    stroke = F.conv2d(F.pad(stroke, (1, 1, 1, 1), mode="replicate"), smooth)
    sobel_x = (binomial[:, None] * torch.tensor([-1.0, 0.0, 1.0])[None, :] / 4).view(1, 1, 3, 3)
    padded = F.pad(stroke, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, sobel_x), F.conv2d(padded, sobel_x.transpose(-1, -2))
    magnitude = (gx.square() + gy.square()).sqrt()
    position = torch.atan2(gy, gx).remainder(torch.pi) / torch.pi * bins
    lower = position.floor()
    weight = position - lower
    lower = lower.long() % bins
    histogram = torch.zeros(images.shape[0], bins, size, size, dtype=magnitude.dtype)
    histogram.scatter_add_(1, lower, magnitude * (1 - weight))
    histogram.scatter_add_(1, (lower + 1) % bins, magnitude * weight)
    features = F.avg_pool2d(histogram, cell).flatten(1)
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-6)


class OrientationPrototypeEmbedder(nn.Module):
    r"""The audit's embedder: soft assignments of an image's :func:`orientation_map` to prototypes.

    With prototypes :math:`c_1..c_K` (k-means centres of A-train's orientation maps, no labels)
    and the scale :math:`\tau` (the median squared distance of an A-train map to its nearest
    centre), the embedding of an image with orientation map :math:`f` is
    :math:`\mathrm{softmax}_k(-\|f - c_k\|^2 / \tau)`, (N, 3, S, S) -> (N, K): which shapes, among
    the prototypes, the digit resembles. A translation that turns a 0 into a 6 moves its mass to
    other prototypes; one that only changes colours, polarity or stroke width does not.
    """

    centres: Tensor  # buffers
    scale: Tensor

    def __init__(self, centres: Tensor, scale: Tensor, cell: int) -> None:
        super().__init__()
        self.cell = cell
        self.register_buffer("centres", centres)
        self.register_buffer("scale", scale)

    def forward(self, images: Tensor) -> Tensor:
        squared = torch.cdist(orientation_map(images, self.cell).to(self.centres.dtype), self.centres).square()
        return torch.softmax(-squared / self.scale, dim=1)


def orientation_embedder(image_size: int = DIGIT_SIZE, prototypes: int = 30, cell: int = 4) -> nn.Module:
    """The study's audit embedder: :class:`OrientationPrototypeEmbedder` fitted on A-train (k-means,
    no labels, seed 0). No method of the study trains against it, so a generator cannot have gamed it.

    A factory for ``reference/evaluate.py --encoder-mode module
    --encoder reference/studies/digit_data.py:orientation_embedder``.
    """
    from sklearn.cluster import KMeans

    features = orientation_map(_a_train(image_size), cell).double()
    kmeans = KMeans(prototypes, n_init=4, random_state=0).fit(features.numpy())
    centres = torch.from_numpy(kmeans.cluster_centers_)
    scale = torch.cdist(features, centres).square().min(dim=1).values.median()
    return OrientationPrototypeEmbedder(centres.float(), scale.float(), cell).eval().requires_grad_(False)


def audit_digit_translations(translated: Tensor, domains: DigitDomains, judge: DigitJudge) -> dict[str, float | None]:
    """How well the label-free audit (:func:`travel_loss.flip_scores`, row mean) finds the judge's flips.

    A flip: the judge reads another digit in the translation than the input's. Returns the share of
    flips and, for the audit embedder (:func:`orientation_embedder`) and the study's training
    embedder (:func:`stroke_embedder`, suffix ``_stroke``): ``audit_auroc``, the probability that
    a flipped translation scores above a kept one (0.5: chance), and ``audit_top10_flips``, the
    share of flips among the 10 % most suspicious. Both are None when every or no translation flipped.
    """
    from sklearn.metrics import roc_auc_score

    from travel_loss import flip_scores

    flipped = (judge.predict(translated) != domains.a_test_labels.cpu()).numpy()
    result: dict[str, float | None] = {"flip_share": float(flipped.mean())}
    for suffix, embedder in (
        ("", _audit_embedder(translated.shape[-1])),
        ("_stroke", _stroke_embedder(translated.shape[-1])),
    ):
        auroc = top = None
        if 0 < flipped.sum() < len(flipped):
            with torch.no_grad():
                scores = flip_scores(embedder(domains.a_test.float()), embedder(translated.float().cpu())).numpy()
            auroc = float(roc_auc_score(flipped, scores))
            top = float(flipped[np.argsort(-scores, kind="stable")[: max(1, len(scores) // 10)]].mean())
        result[f"audit_auroc{suffix}"], result[f"audit_top10_flips{suffix}"] = auroc, top
    return result


@functools.lru_cache(maxsize=2)
def _audit_embedder(image_size: int) -> nn.Module:
    return orientation_embedder(image_size)


@functools.lru_cache(maxsize=2)
def _stroke_embedder(image_size: int) -> nn.Module:
    return stroke_embedder(image_size)
