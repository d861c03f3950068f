r"""A small frozen encoder for the toy streets that needs no weights from anywhere.

The travel loss needs an embedder E under which the transformation vector between two images,
:math:`E(x_i) - E(x_j)`, says how their *content* differs, not their style. A pretrained CLIP
gives that for photographs. For the toy streets (:class:`reference.data.ToyStreets`) the same
property is obtained in a few seconds by pretraining a small convolutional network, once, on a
proxy task built from toy scenes of *both* domains:

    predict, for each cell of an 8 x 8 grid, the fraction of the cell's pixels in each class
    (sky, road, lane, car, tree, hood),

from scenes painted with a random palette per image, interpolated (and extrapolated a little)
between domain A's and domain B's colours, jittered per class, with pixel noise, half of them
with a band of stripes or speckle of random classes (so that the network counts class pixels
in patterned regions too, rather than trusting that a region is uniform). Colour is thus a
nuisance the network must ignore: yellow and white lane lines are both "lane", A's and
B's skies both "sky". What it must see is *where* each class is. The embedding is the grid of
predicted class distributions, :math:`E(x) \in [0, 1]^{K \times 8 \times 8}` flattened to
:math:`D = 6 \cdot 64 = 384`: an image and its ideal translation (its label map repainted in
B's palette) embed almost the same, while two scenes with different layouts embed far apart.

The network is the analogue of the paper's frozen CLIP, not a copy of it: it is a semantic
segmenter pretrained on toy-street layouts, so the travel loss it drives protects exactly the
layout (sky stays sky, cars stay where they are) and leaves the palette free to change.

Shapes: input (N, 3, size, size) in [-1, 1] (``size`` fixed at construction; other sizes are
resampled bilinearly to the native 64 px before the network), output (N, 384).
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.data import CLASSES, PALETTE_A, PALETTE_B, ToyStreets

__all__ = [
    "GRID",
    "NATIVE_SIZE",
    "LayoutAffinityEncoder",
    "SelfSimilarityEmbedder",
    "ToyLayoutEncoder",
    "affinity_encoder",
    "build_affinity_encoder",
    "build_toy_encoder",
    "cell_class_fractions",
    "pretrain_layout_encoder",
    "random_affinity_encoder",
    "random_palette_images",
    "random_toy_encoder",
    "scramble_labels",
    "self_similarity_embedder",
]

NATIVE_SIZE = 64  # the resolution the network is pretrained and run at
GRID = NATIVE_SIZE // 8  # cells per side of the predicted layout (three stride-2 convolutions)


class ToyLayoutEncoder(nn.Module):
    """Images (N, 3, size, size) in [-1, 1] -> per-cell class distributions (N, len(CLASSES) * GRID * GRID).

    Layers (at the native 64 px)::

        conv3 s2 3 -> width/2, ReLU        (32 x 32)
        conv3 s2 -> width, ReLU            (16 x 16)
        conv3 s2 -> width, ReLU            (8 x 8)
        conv3 s1 -> width, ReLU            (8 x 8)
        conv1 -> len(CLASSES) logits, softmax over classes, flatten

    There is no normalisation layer, so each embedding depends on its own image only. The
    module is inert on its own: :func:`build_toy_encoder` pretrains and freezes it.
    """

    def __init__(self, size: int = NATIVE_SIZE, width: int = 32) -> None:
        super().__init__()
        for name, value, minimum in (("size", size, 8), ("width", width, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=1, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(width, len(CLASSES), 1)

    @property
    def embedding_dim(self) -> int:
        return len(CLASSES) * GRID * GRID

    def logits(self, images: Tensor) -> Tensor:
        """Class logits per cell: (N, 3, size, size) -> (N, len(CLASSES), GRID, GRID)."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"ToyLayoutEncoder expects images of shape (N, 3, {self.size}, {self.size}), got {tuple(images.shape)}"
            )
        if self.size != NATIVE_SIZE:
            images = F.interpolate(images, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", align_corners=False)
        return self.head(self.body(images))

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, size, size) in [-1, 1] -> (N, embedding_dim): softmax over classes in each cell, flattened."""
        return self.logits(images).softmax(dim=1).flatten(1)


def _palette_matrix(
    palette: dict[str, tuple[float, float, float]], fallback: dict[str, tuple[float, float, float]]
) -> Tensor:
    """(len(CLASSES), 3) RGB in [0, 1]; classes missing from ``palette`` take ``fallback``'s colour."""
    return torch.tensor([palette.get(name, fallback[name]) for name in CLASSES], dtype=torch.float32)


def random_palette_images(
    labels: Tensor, generator: torch.Generator, jitter: float = 0.1, noise: float = 0.1
) -> Tensor:
    r"""Paint label maps (N, H, W) with one random palette per image: (N, 3, H, W) in [-1, 1].

    Each image's palette is :math:`(1 - t) P_A + t P_B + u` with :math:`t \sim U(-0.2, 1.2)`
    (A's colours, B's colours and everything between and a little beyond) and a per-class,
    per-channel offset :math:`u \sim U(-\text{jitter}, \text{jitter})`, clipped to [0, 1]; then
    Gaussian pixel noise of a per-image standard deviation drawn from :math:`U(0, \text{noise})`.
    Classes A lacks (the hood) take B's colour.
    """
    n = labels.shape[0]
    palette_a, palette_b = _palette_matrix(PALETTE_A, PALETTE_B), _palette_matrix(PALETTE_B, PALETTE_B)
    t = torch.rand(n, 1, 1, generator=generator) * 1.4 - 0.2
    offsets = (torch.rand(n, len(CLASSES), 3, generator=generator) * 2 - 1) * jitter
    palettes = ((1 - t) * palette_a + t * palette_b + offsets).clamp(0, 1) * 2 - 1  # (n, K, 3)
    images = torch.stack([palettes[i][labels[i]] for i in range(n)]).permute(0, 3, 1, 2)  # (n, 3, H, W)
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * noise
    return images + sigma * torch.randn(images.shape, generator=generator)


def scramble_labels(
    labels: Tensor, generator: torch.Generator, fraction: float = 0.5, classes: int = len(CLASSES)
) -> Tensor:
    """Overwrite parts of label maps (N, H, W) with random classes: a copy, for about ``fraction`` of the images.

    Each chosen image gets one of: random rows, random columns (stripes) or random pixels
    (speckle) within a random band, set to random classes. Trained on these, the encoder counts
    the pixels of each class in a cell also where a region is striped or speckled, the patterns
    a generator produces when it tries to fool a network that has only seen clean scenes.
    The random classes are drawn from ``range(classes)``.
    """
    labels = labels.clone()
    n, height, width = labels.shape
    for i in range(n):
        if float(torch.rand((), generator=generator)) >= fraction:
            continue
        top, left = (int(torch.randint(0, side // 2, (), generator=generator)) for side in (height, width))
        bottom, right = (
            int(torch.randint(start + side // 4, side + 1, (), generator=generator))
            for start, side in ((top, height), (left, width))
        )
        band = labels[i, top:bottom, left:right]
        density = float(torch.rand((), generator=generator)) * 0.6
        pattern = int(torch.randint(0, 3, (), generator=generator))
        if pattern == 0:  # rows
            mask = (torch.rand(band.shape[0], 1, generator=generator) < density).expand_as(band)
        elif pattern == 1:  # columns
            mask = (torch.rand(1, band.shape[1], generator=generator) < density).expand_as(band)
        else:  # pixels
            mask = torch.rand(band.shape, generator=generator) < density
        band[mask] = torch.randint(0, classes, band.shape, generator=generator)[mask]
    return labels


def cell_class_fractions(labels: Tensor) -> Tensor:
    """The proxy task's target: (N, H, W) class ids -> (N, len(CLASSES), GRID, GRID) class fractions per cell."""
    one_hot = F.one_hot(labels.long(), len(CLASSES)).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, GRID)


def pretrain_layout_encoder(
    encoder: ToyLayoutEncoder,
    *,
    steps: int = 300,
    batch_size: int = 32,
    scenes: int = 512,
    seed: int = 0,
    lr: float = 3e-3,
) -> list[float]:
    r"""Train ``encoder`` in place on the proxy task; returns the loss of every step.

    Data: the label maps of ``scenes`` toy scenes of each domain (64 px, seeds derived from
    ``seed``), half of them scrambled in a random band by :func:`scramble_labels`, repainted
    on the fly by :func:`random_palette_images`. Loss: cross-entropy of
    the predicted cell distributions against the true class fractions :math:`q`,
    :math:`-\frac{1}{N\,G^2} \sum_{n,\text{cell}} \sum_k q_k \log \mathrm{softmax}(z)_k`.
    Adam with learning rate ``lr``. Deterministic for a given seed on a given machine.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.stack(
        [ToyStreets(domain, NATIVE_SIZE, scenes, seed=seed)[i][1] for domain in ("A", "B") for i in range(scenes)]
    )
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    device = next(encoder.parameters()).device
    native = encoder.size
    encoder.size = NATIVE_SIZE  # train at the native resolution whatever size the encoder serves
    losses = []
    try:
        for _ in range(steps):
            index = torch.randint(0, labels.shape[0], (batch_size,), generator=generator)
            batch = scramble_labels(labels[index], generator)
            images = random_palette_images(batch, generator).to(device)
            log_probabilities = encoder.logits(images).log_softmax(dim=1)
            loss = -(cell_class_fractions(batch).to(device) * log_probabilities).sum(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        encoder.size = native
    return losses


@functools.lru_cache(maxsize=4)
def _pretrained_state(seed: int) -> dict[str, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ToyLayoutEncoder(NATIVE_SIZE)
        pretrain_layout_encoder(encoder, seed=seed)
    return {name: value.detach().clone() for name, value in encoder.state_dict().items()}


def build_toy_encoder(size: int, seed: int = 0, *, pretrained: bool = True) -> ToyLayoutEncoder:
    """A frozen :class:`ToyLayoutEncoder` for (N, 3, size, size) images, pretrained on the toy streets.

    The first call for a ``seed`` pretrains the network (a few seconds on a CPU, no download,
    global RNG untouched); later calls in the same process reuse the weights. The result has
    no parameter that requires grad and is in eval mode; gradients flow to its input.
    ``pretrained=False`` gives the same network with its random initial weights (seeded by
    ``seed``): the toy version of the paper's random-CLIP ablation.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ToyLayoutEncoder(size)
    if pretrained:
        encoder.load_state_dict(_pretrained_state(seed))
    encoder.requires_grad_(False)
    return encoder.eval()


class SelfSimilarityEmbedder(nn.Module):
    r"""Where each colour region is, whatever the colours: a palette-invariant layout embedder without weights.

    The image (N, 3, S, S) in [-1, 1] is average-pooled to ``grid`` x ``grid`` cells (a low-pass
    front end: a pattern finer than a cell cannot move the embedding), and the embedding is the
    similarity of every pair of cells p < q,

    .. math::  E(x)_{pq} = \exp\bigl(-\lVert c_p - c_q \rVert^2 / (2 \sigma^2)\bigr),

    with :math:`c_p` the mean colour of cell p: about 1 when two cells show the same class, about
    0 when they show different ones (two classes' colours lie more than a few ``sigma`` apart).
    Repainting a scene in any palette that keeps its classes distinct leaves E unchanged, while
    moving the horizon, a car or a tree changes it: it sees the layout, like the self-similarity
    of a vision transformer's keys that structure-preserving translation methods compare
    (Tumanyan et al., "Splicing ViT Features", 2022). It knows nothing of either domain.
    Output (N, grid^2 (grid^2 - 1) / 2).
    """

    def __init__(self, grid: int = 8, sigma: float = 0.1) -> None:
        super().__init__()
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.grid, self.sigma = grid, float(sigma)
        pairs = torch.triu_indices(grid * grid, grid * grid, offset=1)
        self.register_buffer("pairs", pairs, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        cells = F.adaptive_avg_pool2d(images, self.grid).flatten(2).transpose(1, 2)  # (N, grid^2, 3)
        first, second = cells[:, self.pairs[0]], cells[:, self.pairs[1]]
        return torch.exp(-(first - second).square().sum(-1) / (2 * self.sigma**2))


def self_similarity_embedder(image_size: int = NATIVE_SIZE) -> SelfSimilarityEmbedder:
    """Factory for ``--encoder-mode module --encoder reference/studies/street_encoder.py:self_similarity_embedder``.

    An 8 x 8 grid of cells at any ``image_size`` (it needs no weights, so the size only has to
    be at least 8 pixels).
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size!r}")
    return SelfSimilarityEmbedder(grid=8, sigma=0.1).eval()


def random_toy_encoder(image_size: int = NATIVE_SIZE) -> ToyLayoutEncoder:
    """Factory for the random-encoder ablation: :class:`ToyLayoutEncoder` with its random initial weights."""
    return build_toy_encoder(image_size, seed=0, pretrained=False)


# ---------------------------------------------------------------------------------------------
# A palette-free layout encoder: pretrained on scenes in random palettes, it embeds which cells
# show the same thing, not what colour anything is.
# ---------------------------------------------------------------------------------------------

AFFINITY_SLOTS = 16  # soft groups a cell is assigned to; more than the classes of any scene it is trained on
AFFINITY_CLASSES = len(CLASSES) + 2  # the pretraining scenes hold up to two classes no toy street has


class LayoutAffinityEncoder(nn.Module):
    r"""Images (N, 3, size, size) in [-1, 1] -> cell affinities (N, GRID^2 (GRID^2 - 1) / 2).

    The convolutional body of :class:`ToyLayoutEncoder` assigns each of the GRID x GRID cells a
    soft group :math:`s_p = \mathrm{softmax}(h_p) \in \Delta^{16}`; the embedding is the affinity
    of every pair of cells p < q, :math:`E(x)_{pq} = s_p^\top s_q`: the probability that the two
    cells fall in the same group. Groups have no fixed meaning (any permutation of them gives the
    same E), so the network need not know what a sky or a road looks like, only which regions of
    *this* image belong together. :func:`pretrain_affinity_encoder` teaches it that on scenes
    painted in uniformly random palettes, so E is invariant to the palette and changes when the
    layout does, like the self-similarity of a ViT's keys that structure-preserving translation
    methods compare (Tumanyan et al., "Splicing ViT Features", 2022).
    """

    def __init__(self, size: int = NATIVE_SIZE, width: int = 32) -> None:
        super().__init__()
        trunk = ToyLayoutEncoder(size, width)  # validates size and width
        self.size, self.body = size, trunk.body
        self.head = nn.Conv2d(width, AFFINITY_SLOTS, 1)
        self.register_buffer("pairs", torch.triu_indices(GRID * GRID, GRID * GRID, offset=1), persistent=False)

    def affinities(self, images: Tensor) -> Tensor:
        """(N, 3, size, size) -> the full (N, GRID^2, GRID^2) matrix of :math:`s_p^\\top s_q`."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"LayoutAffinityEncoder expects images of shape (N, 3, {self.size}, {self.size}), "
                f"got {tuple(images.shape)}"
            )
        if self.size != NATIVE_SIZE:
            images = F.interpolate(images, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", align_corners=False)
        groups = self.head(self.body(images)).flatten(2).softmax(dim=1)  # (N, slots, cells)
        return groups.transpose(1, 2) @ groups

    def forward(self, images: Tensor) -> Tensor:
        return self.affinities(images)[:, self.pairs[0], self.pairs[1]]


def uniform_palette_images(
    labels: Tensor, generator: torch.Generator, jitter: float = 0.05, noise: float = 0.08
) -> Tensor:
    """Paint label maps (N, H, W) of class ids < AFFINITY_CLASSES with a uniformly random colour per
    class and image, a per-pixel jitter of up to ``jitter`` per channel and Gaussian noise of a
    per-image standard deviation in U(0, ``noise``): (N, 3, H, W) in [-1, 1]. Knows no palette."""
    n = labels.shape[0]
    palettes = torch.rand(n, AFFINITY_CLASSES, 3, generator=generator) * 2 - 1
    images = torch.stack([palettes[i][labels[i]] for i in range(n)]).permute(0, 3, 1, 2)
    images = images + (torch.rand(images.shape, generator=generator) * 2 - 1) * 2 * jitter
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 2 * noise
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def cell_affinity_target(labels: Tensor, classes: int = AFFINITY_CLASSES) -> Tensor:
    r"""(N, H, W) class ids -> (N, GRID^2, GRID^2): :math:`\sum_k q_k(p)\, q_k(q)`, the probability that
    a pixel of cell p and a pixel of cell q show the same class (q(p): cell p's class fractions)."""
    fractions = F.adaptive_avg_pool2d(F.one_hot(labels.long(), classes).permute(0, 3, 1, 2).float(), GRID)
    cells = fractions.flatten(2)  # (N, classes, cells)
    return cells.transpose(1, 2) @ cells


def pretrain_affinity_encoder(
    encoder: LayoutAffinityEncoder, *, steps: int = 400, batch_size: int = 32, scenes: int = 512, seed: int = 0,
    lr: float = 3e-3,
) -> list[float]:  # fmt: skip
    r"""Train ``encoder`` in place to predict cell affinities; returns the loss of every step.

    Data: label maps of ``scenes`` toy streets of each domain at 64 px (ToyStreets seed
    ``1000 + seed``, none of the seeds the studies train or score on), half of them overwritten in
    a random band with stripes or speckle of random classes, including two classes no street
    has (:func:`scramble_labels`), painted by :func:`uniform_palette_images`. Loss: the mean
    squared error between :meth:`LayoutAffinityEncoder.affinities` and
    :func:`cell_affinity_target`. Adam with learning rate ``lr``.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.stack([
        ToyStreets(domain, NATIVE_SIZE, scenes, seed=1000 + seed)[i][1] for domain in ("A", "B") for i in range(scenes)
    ])  # fmt: skip
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    native, encoder.size = encoder.size, NATIVE_SIZE
    losses = []
    try:
        for _ in range(steps):
            batch = labels[torch.randint(0, labels.shape[0], (batch_size,), generator=generator)]
            batch = scramble_labels(batch, generator, classes=AFFINITY_CLASSES)
            predicted = encoder.affinities(uniform_palette_images(batch, generator))
            loss = (predicted - cell_affinity_target(batch)).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        encoder.size = native
    return losses


AFFINITY_PRETRAINING_VERSION = 1  # bump when the pretraining changes, so that cached weights are not reused


def weights_cache_dir() -> Path:
    """Where pretrained toy weights are kept between processes: ``$TRAVEL_LOSS_CACHE`` if set, else
    ``$XDG_CACHE_HOME/travel-loss`` (``~/.cache/travel-loss``)."""
    if os.environ.get("TRAVEL_LOSS_CACHE"):
        return Path(os.environ["TRAVEL_LOSS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "travel-loss"


@functools.lru_cache(maxsize=4)
def _pretrained_affinity_state(seed: int) -> dict[str, Tensor]:
    """Pretrained weights for ``seed``: from the cache folder if there, else pretrained (deterministic)
    and written there atomically, so that the trainer runs of a study pretrain once between them."""
    path = weights_cache_dir() / f"layout_affinity_v{AFFINITY_PRETRAINING_VERSION}_seed{seed}.pt"
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        pass  # absent or damaged: pretrain again
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = LayoutAffinityEncoder(NATIVE_SIZE)
        pretrain_affinity_encoder(encoder, seed=seed)
    state = {name: value.detach().clone() for name, value in encoder.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            torch.save(state, handle)
        os.replace(handle.name, path)
    except OSError:
        pass  # a read-only cache only costs the pretraining next time
    return state


def build_affinity_encoder(size: int, seed: int = 0, *, pretrained: bool = True) -> LayoutAffinityEncoder:
    """A frozen :class:`LayoutAffinityEncoder` for (N, 3, size, size) images; the first call per seed
    pretrains it (seconds on a CPU, global RNG untouched). ``pretrained=False``: random weights."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = LayoutAffinityEncoder(size)
    if pretrained:
        encoder.load_state_dict(_pretrained_affinity_state(seed))
    encoder.requires_grad_(False)
    return encoder.eval()


def affinity_encoder(image_size: int = NATIVE_SIZE) -> LayoutAffinityEncoder:
    """Factory for ``--encoder-mode module --encoder reference/studies/street_encoder.py:affinity_encoder``."""
    return build_affinity_encoder(image_size)


def random_affinity_encoder(image_size: int = NATIVE_SIZE) -> LayoutAffinityEncoder:
    """Factory for the random-encoder ablation of the toy-demo: the same network at its random initial weights."""
    return build_affinity_encoder(image_size, pretrained=False)
