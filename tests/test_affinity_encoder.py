"""The toy-demo's embedder, LayoutAffinityEncoder: frozen, cached, and blind to the palette but not to the layout.

It stands in for CLIP on toy streets, so it must not know the benchmark's colours: it is
pretrained on scenes painted in uniformly random palettes and must embed a street by its layout
whatever its colours, with an extra class it never saw on a street too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.data import CLASSES, PALETTE_B, ToyStreets, paint_labels
from reference.studies import street_encoder as toy_encoder
from reference.studies.street_encoder import (
    AFFINITY_CLASSES,
    GRID,
    LayoutAffinityEncoder,
    build_affinity_encoder,
    cell_affinity_target,
    pretrain_affinity_encoder,
    uniform_palette_images,
    weights_cache_dir,
)
from travel_loss import travel_loss
from travel_loss.testing import check_embedder

SIZE = 32


@pytest.fixture(scope="module")
def encoder() -> LayoutAffinityEncoder:
    return build_affinity_encoder(SIZE)


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """24 A scenes of a seed neither pretraining nor the studies use: images and labels."""
    dataset = ToyStreets("A", size=SIZE, length=24, seed=4242, lane_width=2.5)
    images, labels = zip(*(dataset[i] for i in range(24)))
    return torch.stack(images), torch.stack(labels)


def off_diagonal(distances: torch.Tensor) -> torch.Tensor:
    return distances[~torch.eye(len(distances), dtype=torch.bool)]


def test_is_a_frozen_embedder(encoder: LayoutAffinityEncoder) -> None:
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    check_embedder(encoder, image_shape=(3, SIZE, SIZE), batch_size=3)
    cells = GRID * GRID
    assert encoder(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, cells * (cells - 1) // 2)


def test_affinities_are_probabilities_of_sharing_a_group(
    encoder: LayoutAffinityEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    with torch.no_grad():
        matrix = encoder.affinities(held_out[0][:4])
    assert matrix.shape == (4, GRID * GRID, GRID * GRID)
    torch.testing.assert_close(matrix, matrix.transpose(1, 2))
    assert matrix.min() >= 0 and matrix.max() <= 1 + 1e-6
    flat = encoder(held_out[0][:4])
    upper = torch.triu_indices(GRID * GRID, GRID * GRID, offset=1)
    torch.testing.assert_close(flat, matrix[:, upper[0], upper[1]])


def test_same_scene_in_a_random_palette_embeds_closer_than_another_scene(
    encoder: LayoutAffinityEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The property issue-level claims rest on: colours it never saw move E far less than a new layout."""
    _, labels = held_out
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        source = encoder(paint_labels(labels, PALETTE_B)).double()
        repainted = encoder(uniform_palette_images(labels, generator, noise=0.0)).double()
    same_scene = (source - repainted).norm(dim=1)
    other_scene = off_diagonal(torch.cdist(source, source))
    # measured (seed 0 weights): medians 3.5 vs 7.3; two random palettes of one scene: 5.1
    assert same_scene.median() < 0.7 * other_scene.median()
    assert float((same_scene[:, None] < other_scene[None]).double().mean()) > 0.7


def test_an_extra_class_no_street_has_still_embeds_by_layout(
    encoder: LayoutAffinityEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Recolour one class of each scene as a class outside CLASSES: still nearer its own scene than others."""
    _, labels = held_out
    extra = labels.clone()
    extra[labels == CLASSES.index("car")] = len(CLASSES)  # an unseen class in place of the cars
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        source = encoder(uniform_palette_images(labels, generator, noise=0.0)).double()
        changed = encoder(uniform_palette_images(extra, generator, noise=0.0)).double()
    same_layout = (source - changed).norm(dim=1)
    other_layout = off_diagonal(torch.cdist(source, source))
    # measured: median 4.2 against 7.3 (the invariance is partial: nearest-neighbour retrieval of
    # the scene among 24 succeeds for about a quarter of them, against 1/24 by chance)
    assert same_layout.median() < 0.8 * other_layout.median()
    nearest = torch.cdist(changed, source).argmin(dim=1)
    assert float((nearest == torch.arange(len(labels))).double().mean()) > 3 / len(labels)


def test_travel_loss_tells_the_ideal_translation_from_a_shuffle(
    encoder: LayoutAffinityEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = held_out
    with torch.no_grad():
        source, ideal = encoder(images).double(), encoder(paint_labels(labels, PALETTE_B)).double()
    assert travel_loss(source, ideal) < 0.3 * travel_loss(source, ideal.roll(1, dims=0))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_cell_affinity_target_of_a_one_class_image_is_all_ones(seed: int) -> None:
    labels = torch.full((1, 16, 16), seed % AFFINITY_CLASSES)
    torch.testing.assert_close(cell_affinity_target(labels), torch.ones(1, GRID * GRID, GRID * GRID))


def test_cell_affinity_target_of_two_halves() -> None:
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, 8:] = 1  # top half class 0, bottom half class 1: cells agree iff in the same half
    target = cell_affinity_target(labels)[0]
    rows = torch.arange(GRID * GRID) // GRID
    same_half = (rows[:, None] < GRID // 2) == (rows[None] < GRID // 2)
    torch.testing.assert_close(target, same_half.float())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_uniform_palette_images_use_one_colour_per_class(seed: int, n: int) -> None:
    labels = torch.randint(0, AFFINITY_CLASSES, (n, 8, 8), generator=torch.Generator().manual_seed(seed))
    images = uniform_palette_images(labels, torch.Generator().manual_seed(seed), jitter=0.0, noise=0.0)
    assert images.shape == (n, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    for image, label in zip(images, labels):
        for c in label.unique():
            pixels = image[:, label == c]
            assert torch.equal(pixels, pixels[:, :1].expand_as(pixels))


def test_pretraining_lowers_the_loss_and_is_deterministic() -> None:
    def trained(seed: int, steps: int) -> tuple[list[float], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = LayoutAffinityEncoder(SIZE, width=8)
        losses = pretrain_affinity_encoder(model, steps=steps, batch_size=8, scenes=8, seed=seed)
        assert model.size == SIZE  # restored after pretraining at the native size
        return losses, [p.detach().clone() for p in model.parameters()]

    losses, _ = trained(1, steps=60)
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])  # measured: 0.71
    (_, first), (_, again), (_, other) = trained(1, 3), trained(1, 3), trained(2, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_weights_are_cached_and_a_damaged_cache_is_rebuilt(
    encoder: LayoutAffinityEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = sorted(weights_cache_dir().glob("layout_affinity_*seed0.pt"))
    assert len(cached) == 1 and not list(weights_cache_dir().glob("*.tmp"))
    toy_encoder._pretrained_affinity_state.cache_clear()
    calls: list[int] = []
    real_pretrain = toy_encoder.pretrain_affinity_encoder

    def counting(model: LayoutAffinityEncoder, **kwargs: int) -> list[float]:
        calls.append(1)
        return real_pretrain(model, **kwargs)

    monkeypatch.setattr(toy_encoder, "pretrain_affinity_encoder", counting)
    again = build_affinity_encoder(SIZE)  # read back from disk, no pretraining
    assert calls == []
    for (name, a), (_, b) in zip(encoder.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    pretrained = Path(cached[0]).read_bytes()
    try:
        Path(cached[0]).write_bytes(b"not a checkpoint")
        toy_encoder._pretrained_affinity_state.cache_clear()
        monkeypatch.setattr(toy_encoder, "pretrain_affinity_encoder", lambda model, **kwargs: calls.append(1) or [])
        build_affinity_encoder(SIZE)
        assert calls == [1]
        assert torch.load(cached[0], weights_only=True).keys() == again.state_dict().keys()
    finally:  # the other tests of this session share the cache: put the pretrained weights back
        Path(cached[0]).write_bytes(pretrained)
        toy_encoder._pretrained_affinity_state.cache_clear()


def test_random_encoder_ablation_differs_and_bad_seed_raises(encoder: LayoutAffinityEncoder) -> None:
    random = toy_encoder.random_affinity_encoder(SIZE)
    assert not all(torch.equal(a, b) for a, b in zip(encoder.parameters(), random.parameters()))
    check_embedder(random, image_shape=(3, SIZE, SIZE), batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        build_affinity_encoder(SIZE, seed=-1)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        encoder(torch.zeros(1, 3, 16, 16))
