"""The toy encoder (frozen, deterministic, layout not palette) and the toy-street demo (a valid report)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reference.config import TRAINER_PRESETS
from reference.data import CLASSES, PALETTE_A, PALETTE_B, ToyStreets, paint_labels
from reference.studies.street_encoder import (
    GRID,
    ToyLayoutEncoder,
    build_toy_encoder,
    cell_class_fractions,
    pretrain_layout_encoder,
    random_palette_images,
    scramble_labels,
)
from reference.studies.streets import (
    GRID_NAME,
    METHODS,
    QUICK,
    REPORT_NAME,
    DemoSettings,
    Method,
    format_table,
    run_demo,
    select_best,
)
from reference.train import TrainConfig
from travel_loss import travel_loss
from travel_loss.testing import check_embedder

LANE = CLASSES.index("lane")


@pytest.fixture(scope="module")
def encoder() -> ToyLayoutEncoder:
    return build_toy_encoder(64, seed=0)


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """32 A scenes of a seed the encoder never saw: images (32, 3, 64, 64), labels (32, 64, 64)."""
    dataset = ToyStreets("A", size=64, length=32, seed=777)
    images, labels = zip(*(dataset[i] for i in range(32)))
    return torch.stack(images), torch.stack(labels)


# --------------------------------------------------------------------------------------------
# The encoder as an embedder
# --------------------------------------------------------------------------------------------


def test_toy_encoder_is_a_frozen_embedder(encoder: ToyLayoutEncoder) -> None:
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    check_embedder(encoder, image_shape=(3, 64, 64), batch_size=3)
    out = encoder(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, encoder.embedding_dim) == (2, len(CLASSES) * GRID * GRID)


def test_embedding_is_a_distribution_per_cell(
    encoder: ToyLayoutEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    with torch.no_grad():
        cells = encoder(held_out[0][:4]).view(4, len(CLASSES), GRID, GRID)
    assert (cells >= 0).all()
    torch.testing.assert_close(cells.sum(1), torch.ones(4, GRID, GRID))


def test_build_is_deterministic_and_other_sizes_work(encoder: ToyLayoutEncoder) -> None:
    again = build_toy_encoder(64, seed=0)
    for (name, a), (_, b) in zip(encoder.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    small = build_toy_encoder(32, seed=0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    upsampled = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small(images), encoder(upsampled))
    check_embedder(small, image_shape=(3, 32, 32), batch_size=2)


def test_pretraining_is_deterministic_by_seed() -> None:
    def trained(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = ToyLayoutEncoder(64, width=8)
        pretrain_layout_encoder(model, steps=3, batch_size=4, scenes=4, seed=seed)
        return [p.detach().clone() for p in model.parameters()]

    first, second, other = trained(1), trained(1), trained(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_pretraining_lowers_the_proxy_loss() -> None:
    torch.manual_seed(0)
    losses = pretrain_layout_encoder(ToyLayoutEncoder(64, width=8), steps=40, batch_size=8, scenes=16, seed=0)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


# --------------------------------------------------------------------------------------------
# The property the demo depends on: layout is encoded, palette is not
# --------------------------------------------------------------------------------------------


def test_a_scene_and_its_ideal_translation_embed_close(
    encoder: ToyLayoutEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = held_out
    with torch.no_grad():
        source, ideal = encoder(images).double(), encoder(paint_labels(labels, PALETTE_B)).double()
    same_layout = (source - ideal).norm(dim=1)  # (32,)
    other_layout = torch.cdist(source, source)[~torch.eye(32, dtype=torch.bool)]  # (32 * 31,)
    assert same_layout.max() < other_layout.median() / 3
    assert same_layout.mean() < other_layout.mean() / 5
    # the ideal translation keeps nearly every transformation vector's direction ...
    assert travel_loss(source, ideal) < 0.05
    # ... while translations that lose the layout (a shuffled batch) turn them around
    assert travel_loss(source, source.roll(1, dims=0)) > 0.8


def test_lane_colour_is_not_encoded(encoder: ToyLayoutEncoder, held_out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Recolouring only the lanes yellow -> white (the change the generator must be free to make) hardly moves E."""
    _, labels = held_out
    yellow = paint_labels(labels, PALETTE_A | {"hood": PALETTE_B["hood"]})
    white = paint_labels(labels, PALETTE_A | {"lane": PALETTE_B["lane"], "hood": PALETTE_B["hood"]})
    assert (yellow != white).any()
    with torch.no_grad():
        a, b = encoder(yellow).double(), encoder(white).double()
    spread = torch.cdist(a, a)[~torch.eye(len(a), dtype=torch.bool)].mean()
    assert (a - b).norm(dim=1).max() < spread / 5


def test_moving_a_car_moves_the_embedding(encoder: ToyLayoutEncoder) -> None:
    """Layout is encoded: a car painted into the sky changes the cells it covers (and not the others)."""
    labels = ToyStreets("A", size=64, length=1, seed=5)[0][1]
    with_car = labels.clone()
    with_car[4:12, 8:24] = CLASSES.index("car")  # in the sky: grid rows 0-1, columns 1-2
    with torch.no_grad():
        before, after = (
            encoder(paint_labels(x[None], PALETTE_B)).view(len(CLASSES), GRID, GRID) for x in (labels, with_car)
        )
    change = (after - before).abs().sum(0)  # (GRID, GRID)
    assert change[:2, 1:3].min() > 0.5
    assert change[4:].max() < 0.1


def test_travel_loss_is_blind_to_changes_common_to_all_images(
    encoder: ToyLayoutEncoder, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Why the demo's flip rate has a floor: the same change made to every image leaves every
    transformation vector E(x_i) - E(x_j) as it was, so stripes or a tree canopy painted across
    the top of *every* translation flip many pixels at no travel cost, while shuffling (losing
    each image's own layout) is expensive."""
    images, labels = held_out
    ideal = paint_labels(labels, PALETTE_B)
    canopy = ideal.clone()
    canopy[:, :, :8] = paint_labels(torch.full((1, 8, 64), CLASSES.index("tree")), PALETTE_B)
    with torch.no_grad():
        source, with_ideal, with_canopy = (encoder(x).double() for x in (images, ideal, canopy))
    assert (canopy != ideal).any()
    assert abs(float(travel_loss(source, with_canopy) - travel_loss(source, with_ideal))) < 0.01
    assert travel_loss(source, with_ideal.roll(1, dims=0)) > 20 * travel_loss(source, with_canopy)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_random_palette_images_paint_one_colour_per_class(seed: int, n: int) -> None:
    labels = ToyStreets("B", size=16, length=n, seed=seed % 1000)
    labels = torch.stack([labels[i][1] for i in range(n)])
    images = random_palette_images(labels, torch.Generator().manual_seed(seed), noise=0.0)
    assert images.shape == (n, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    for image, label in zip(images, labels):
        for c in label.unique():
            pixels = image[:, label == c]
            assert torch.equal(pixels, pixels[:, :1].expand_as(pixels))


def test_scramble_labels_changes_a_copy_within_the_classes() -> None:
    labels = torch.stack([ToyStreets("A", size=32, length=16, seed=4)[i][1] for i in range(16)])
    original = labels.clone()
    scrambled = scramble_labels(labels, torch.Generator().manual_seed(0), fraction=0.5)
    assert torch.equal(labels, original)
    assert scrambled.shape == labels.shape and scrambled.dtype == labels.dtype
    assert scrambled.min() >= 0 and scrambled.max() < len(CLASSES)
    changed = (scrambled != labels).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 16
    assert torch.equal(scramble_labels(labels, torch.Generator().manual_seed(0), fraction=0.0), labels)


def test_cell_class_fractions_are_distributions() -> None:
    labels = torch.stack([ToyStreets("B", size=64, length=2, seed=3)[i][1] for i in range(2)])
    fractions = cell_class_fractions(labels)
    assert fractions.shape == (2, len(CLASSES), GRID, GRID)
    torch.testing.assert_close(fractions.sum(1), torch.ones(2, GRID, GRID))
    assert math.isclose(float(fractions[:, LANE].mean()), float((labels == LANE).float().mean()), rel_tol=1e-5)


def test_bad_inputs_raise(encoder: ToyLayoutEncoder) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        encoder(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="seed"):
        build_toy_encoder(64, seed=-1)
    with pytest.raises(ValueError, match="size"):
        ToyLayoutEncoder(4)


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def test_quick_demo_writes_the_report_the_grid_and_one_trainer_run_per_method(tmp_path) -> None:
    report = run_demo(tmp_path, seed=0, quick=True, progress=False)
    written = json.loads((tmp_path / REPORT_NAME).read_text())
    assert written["runs"] == json.loads(json.dumps(report["runs"]))
    assert [(run["method"], run["weight"]) for run in written["runs"]] == [(m.method, m.weight) for m in QUICK.runs]
    for run in written["runs"]:
        assert {"method", "weight", "lambda_travel", "semantic_flip_rate", "lane_accuracy", "realism"} <= run.keys()
        assert 0 <= run["semantic_flip_rate"] <= 1 and 0 <= run["lane_accuracy"] <= 1 and 0 <= run["realism"] <= 1
        log = (tmp_path / "runs" / Method(run["method"], run["weight"]).name / "train.log").read_text()
        assert "done: 3 steps" in log  # each method really was a run of the trainer's command line
    ideal, unchanged = written["references"]["ideal"], written["references"]["input unchanged"]
    assert (ideal["semantic_flip_rate"], ideal["lane_accuracy"], ideal["realism"]) == (0, 1, 1)
    assert unchanged["semantic_flip_rate"] == 0 and unchanged["lane_accuracy"] == 0 and unchanged["realism"] == 0
    size = 4 * TRAINER_PRESETS["toy-demo"]["size"]  # the grid is upscaled 4x
    with Image.open(tmp_path / GRID_NAME) as grid:  # input | gan | travel | identity-l1 | cycle | ideal
        assert grid.size == (6 * (size + 2) + 2, QUICK.grid_rows * (size + 2) + 2)
    table = format_table(written["runs"], written["references"])
    assert "identity-l1" in table and "(ideal)" in table and "car flips" in table
    ideal_row = next(line for line in table.splitlines() if line.startswith("(ideal)"))
    assert ideal_row.split()[1:5] == ["0.000", "0.000", "1.000", "1.000"]  # flips, car flips, lane, realism
    # a rerun reuses the finished runs: same scores, no new training
    again = run_demo(tmp_path, seed=0, quick=True, progress=False)
    assert [r["realism"] for r in again["runs"]] == [r["realism"] for r in report["runs"]]


def test_each_method_maps_onto_the_trainer_flags_of_its_baseline() -> None:
    assert Method("gan", 0.0).flags() == {"lambda_travel": 0.0}
    assert Method("identity-l1", 3.0).flags() == {"lambda_travel": 0.0, "lambda_identity": 3.0}
    assert Method("cycle", 10.0).flags() == {"lambda_travel": 0.0, "lambda_cycle": 10.0, "lambda_cycle_identity": 0.5}
    assert Method("siamese", 10.0).flags()["encoder_mode"] == "siamese"
    assert Method("random-encoder", 10.0).flags()["encoder"].endswith("toy_encoder.py:random_affinity_encoder")
    assert Method("travel-auto", 2.0).flags() == {"lambda_travel": "auto", "lambda_auto_scale": 2.0}
    for method in METHODS:  # every flag set is one the trainer's command line accepts
        config = TrainConfig(**{**TRAINER_PRESETS["toy-demo"], **Method(method, 1.0).flags(), "data_a": "a"})
        assert isinstance(config, TrainConfig)


def test_select_best_takes_the_most_realistic_run_within_the_flip_limit() -> None:
    runs = [
        {"method": "travel", "weight": 1.0, "semantic_flip_rate": 0.5, "realism": 0.9},
        {"method": "travel", "weight": 10.0, "semantic_flip_rate": 0.2, "realism": 0.6},
        {"method": "travel", "weight": 100.0, "semantic_flip_rate": 0.1, "realism": 0.3},
    ]
    assert select_best(runs, "travel", 0.25)["weight"] == 10.0
    assert select_best(runs, "travel", 0.05)["weight"] == 100.0  # none qualifies: the lowest flip rate
    assert select_best(runs, "cycle", 0.25) is None


def test_demo_rejects_bad_arguments_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="seed"):
        run_demo(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        run_demo(tmp_path, settings=DemoSettings(runs=(Method("pix2pix", 1.0),)))
    with pytest.raises(ValueError, match="preset"):
        run_demo(tmp_path, settings=DemoSettings(preset="nope"))
    assert not (tmp_path / REPORT_NAME).exists() and not (tmp_path / "data").exists()


def test_command_line_runs_the_street_study(tmp_path, monkeypatch) -> None:
    from reference import demo
    from reference.train import main

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append((out, kw)))
    assert main(["--demo", "--quick", "--out", str(tmp_path)]) == 0
    assert calls == [(str(tmp_path), {"seed": 0, "quick": True})]
