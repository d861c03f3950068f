"""The palette-invariant layout embedder of the toy streets: invariance, sensitivity, the kit."""

from __future__ import annotations

import pytest
import torch

from reference.data import CLASSES, ToyStreets, paint_labels
from reference.studies.street_encoder import SelfSimilarityEmbedder, random_toy_encoder, self_similarity_embedder
from travel_loss import travel_loss
from travel_loss.testing import check_embedder


def scenes(domain: str, count: int, size: int = 32, seed: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ToyStreets(domain, size=size, length=count, seed=seed)
    images, labels = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), torch.stack(labels)


def random_palettes(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Each scene painted in its own palette of uniformly random colours (not A's, not B's)."""
    generator = torch.Generator().manual_seed(seed)
    palettes = torch.rand(labels.shape[0], len(CLASSES), 3, generator=generator) * 2 - 1
    return torch.stack([palettes[i][labels[i]] for i in range(labels.shape[0])]).permute(0, 3, 1, 2)


def test_passes_the_kit():
    check_embedder(self_similarity_embedder(32), image_shape=(3, 32, 32))
    check_embedder(random_toy_encoder(32), image_shape=(3, 32, 32))


def test_a_scene_in_random_colours_embeds_near_itself_and_far_from_other_scenes():
    """Distances E(x) - E(x repainted) against E(x) - E(another scene), over 64 scenes of both domains."""
    images_a, labels_a = scenes("A", 32)
    images_b, labels_b = scenes("B", 32)
    images, labels = torch.cat([images_a, images_b]), torch.cat([labels_a, labels_b])
    embedder = self_similarity_embedder(32)
    original, repainted = embedder(images), embedder(random_palettes(labels, seed=0))
    same_scene = (original - repainted).norm(dim=1)
    other_scene = (original - original.roll(1, dims=0)).norm(dim=1)
    # measured: medians 3.6 against 12.3. Not 0: cells that straddle a class boundary average two
    # colours, and a random palette sometimes puts two classes within a few sigma of each other
    assert same_scene.median() < 0.4 * other_scene.median(), (same_scene.median(), other_scene.median())
    assert (same_scene < other_scene).float().mean() >= 0.9


def test_transformation_vectors_survive_the_ideal_translation():
    """travel(E(A scenes), E(their ideal B repaintings)) is near 0; against shuffled partners near 1."""
    images, labels = scenes("A", 64)
    ideal = paint_labels(labels)
    embedder = self_similarity_embedder(32)
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    kept = float(travel_loss(embedder(images), embedder(ideal)))
    broken = float(travel_loss(embedder(images), embedder(ideal[shuffled])))
    assert kept < 0.1 < 0.9 < broken, (kept, broken)


def test_patterns_finer_than_a_cell_do_not_move_the_embedding():
    images, _ = scenes("A", 4)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.4 - 0.2  # zero mean per 2x2 block
    embedder = SelfSimilarityEmbedder(grid=8)
    torch.testing.assert_close(embedder(images + checker), embedder(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("grid", "sigma"), [(1, 0.1), (8, 0.0)])
def test_bad_arguments_are_named(grid, sigma):
    with pytest.raises(ValueError, match="grid" if grid == 1 else "sigma"):
        SelfSimilarityEmbedder(grid=grid, sigma=sigma)
