"""reference.evaluate: distances against closed forms and loops, consistency, folders, I/O."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Subset, TensorDataset

from reference import evaluate
from reference.data import ImageFolder
from reference.evaluate import (
    embed_images,
    evaluate_folders,
    format_table,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_metrics,
    kernel_distance,
    mmd_squared_unbiased,
    travel_consistency,
)

# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _trace_sqrt_product_by_eigh(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr((S_a S_b)^{1/2}) = sum of sqrt of the eigenvalues of S_a^{1/2} S_b S_a^{1/2} (symmetric PSD)."""
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)).sum())


@settings(max_examples=30, deadline=None)
@given(
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form(dim, seed):
    rng = np.random.default_rng(seed)
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    var_a, var_b = rng.uniform(0.01, 4, size=dim), rng.uniform(0.01, 4, size=dim)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = frechet_distance_from_statistics(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("count, dim", [(200, 5), (40, 8), (10, 30)])  # the last: fewer samples than dimensions
def test_frechet_distance_agrees_with_an_eigendecomposition_oracle(count, dim):
    rng = np.random.default_rng(count + dim)
    a = rng.normal(size=(count, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(count + 3, dim)) * 2 + 1
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.trace(sigma_a)
        + np.trace(sigma_b)
        - 2 * _trace_sqrt_product_by_eigh(sigma_a, sigma_b)
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shift=st.lists(st.floats(-5, 5), min_size=4, max_size=4))
def test_frechet_distance_properties(seed, shift):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4))
    y = rng.normal(size=(60, 4)) + rng.normal(size=4)
    c = np.array(shift)
    scale = np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6 * scale)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-6, abs=1e-9)
    assert frechet_distance(x + c, x) == pytest.approx(float(c @ c), rel=1e-6, abs=1e-6 * scale)
    assert frechet_distance(x, y) >= 0


def test_frechet_distance_accepts_tensors_and_matches_arrays():
    torch.manual_seed(0)
    a, b = torch.randn(30, 3), torch.randn(25, 3) + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(a.numpy(), b.numpy()), rel=1e-12)


def test_frechet_distance_rejects_indefinite_covariances_with_a_clear_message():
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance_from_statistics(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


def test_frechet_distance_guard_handles_identical_constant_features():
    constant = np.ones((5, 3))
    assert frechet_distance(constant, constant + 1) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (np.zeros((1, 3)), np.zeros((4, 3)), ValueError, "feats_a.*N >= 2"),
        (np.zeros((4, 3)), np.zeros((4, 2)), ValueError, "feature dimension"),
        (np.zeros(4), np.zeros((4, 2)), ValueError, "feats_a"),
        (np.full((4, 3), np.nan), np.zeros((4, 3)), ValueError, "finite"),
        ([[1.0, 2.0]], np.zeros((4, 2)), TypeError, "feats_a"),
    ],
)
def test_frechet_distance_rejects_bad_features(a, b, error, match):
    with pytest.raises(error, match=match):
        frechet_distance(a, b)


# ---------------------------------------------------------------------------------------------
# KID


def _mmd_by_loops(a: np.ndarray, b: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    dim = a.shape[1]

    def kernel(x, y):
        return (float(np.dot(x, y)) / dim + coef) ** degree

    m, n = len(a), len(b)
    within_a = sum(kernel(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_b = sum(kernel(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(kernel(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_a + within_b - 2 * cross


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), dim=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_unbiased_mmd_matches_a_loop(m, n, dim, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(m, dim)), rng.normal(size=(n, dim)) + 0.5
    assert mmd_squared_unbiased(a, b) == pytest.approx(_mmd_by_loops(a, b), rel=1e-9, abs=1e-12)


def test_kernel_distance_over_full_subsets_is_the_full_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 1
    mean, std = kernel_distance(a, b, subsets=5, subset_size=50)
    assert mean == pytest.approx(_mmd_by_loops(a, b), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is a permutation of all rows


def test_kernel_distance_separates_distributions():
    rng = np.random.default_rng(2)
    same_mean, _ = kernel_distance(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), subsets=20, subset_size=100)
    shifted_mean, _ = kernel_distance(
        rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1, subsets=20, subset_size=100
    )
    assert abs(same_mean) < 0.1 and shifted_mean > 2.0  # shift 1 in 8 dims: MMD^2 about 8


def test_kernel_distance_rejects_bad_subsets():
    with pytest.raises(ValueError, match="subsets"):
        kernel_distance(np.zeros((4, 2)), np.ones((4, 2)), subsets=0)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_distance(np.zeros((4, 2)), np.ones((4, 2)), subset_size=1)


# ---------------------------------------------------------------------------------------------
# Embedding and travel consistency


class LinearEmbedder(nn.Module):
    """A fixed random linear map of the flattened image: (N, 3, H, W) -> (N, D)."""

    def __init__(self, size: int = 8, dim: int = 6, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * size * size, dim, generator=generator))

    def forward(self, images):
        return images.flatten(1) @ self.weight


class PairEmbedder(LinearEmbedder):
    def forward(self, images):
        embedding = super().forward(images)
        return embedding, embedding[:, :2] * 3


def _cosine_mean_by_loops(src: torch.Tensor, gen: torch.Tensor) -> float:
    values = []
    for i in range(len(src)):
        for j in range(len(src)):
            if i != j:
                values.append(float(nn.functional.cosine_similarity(src[i] - src[j], gen[i] - gen[j], dim=0)))
    return float(np.mean(values))


def test_embed_images_is_independent_of_batch_size_and_accepts_datasets(tiny_folders):
    encoder = LinearEmbedder(size=16)
    dataset = Subset(ImageFolder(tiny_folders / "trainA", size=16), range(7))
    images = torch.stack([dataset[i] for i in range(7)])
    one_batch = embed_images(encoder, images, batch_size=64)
    small_batches = embed_images(encoder, dataset, batch_size=3)
    assert one_batch.shape == (7, 6)
    # float32 sums of 768 products, blocked differently per batch size, on embeddings up to about 30
    torch.testing.assert_close(small_batches, one_batch, rtol=1e-5, atol=1e-4)
    pairs = embed_images(encoder, TensorDataset(images, torch.arange(7)), batch_size=3)  # (image, label) items
    torch.testing.assert_close(pairs, small_batches)
    pair = embed_images(PairEmbedder(size=16), images, batch_size=2)
    assert isinstance(pair, tuple) and [p.shape for p in pair] == [(7, 6), (7, 2)]


def test_embed_images_rejects_bad_inputs():
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(LinearEmbedder(), torch.zeros(2, 3, 8, 8), batch_size=0)
    with pytest.raises(TypeError, match="images"):
        embed_images(LinearEmbedder(), [torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="images"):
        embed_images(LinearEmbedder(), torch.zeros(3, 8, 8))


def test_travel_consistency_matches_the_per_pair_cosine_mean():
    torch.manual_seed(0)
    encoder = LinearEmbedder()
    sources = torch.rand(9, 3, 8, 8) * 2 - 1
    translations = torch.tanh(sources * 2 + torch.randn_like(sources))
    expected = _cosine_mean_by_loops(encoder(sources), encoder(translations))
    assert travel_consistency(encoder, sources, translations, batch_size=4) == pytest.approx(expected, abs=1e-5)


def test_travel_consistency_of_affine_and_reversing_maps():
    torch.manual_seed(1)
    encoder = LinearEmbedder()
    sources = torch.rand(6, 3, 8, 8)
    # E is linear, so x -> 2x + c keeps every transformation vector's direction and x -> -x reverses it
    assert travel_consistency(encoder, sources, 2 * sources + 0.3) == pytest.approx(1.0, abs=1e-6)
    assert travel_consistency(encoder, sources, -sources) == pytest.approx(-1.0, abs=1e-6)
    ensemble = travel_consistency(PairEmbedder(), sources, 2 * sources + 0.3)
    assert ensemble == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one translation per source"):
        travel_consistency(encoder, sources, sources[:4])


# ---------------------------------------------------------------------------------------------
# Folders of images


def test_translate_images_restores_training_mode():
    generator = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5))
    generator.train()
    evaluate.translate_images(generator, torch.zeros(2, 3, 8, 8))
    assert generator.training


def _copy_images(source_folder: Path, folder: Path, count: int) -> Path:
    """The first ``count`` images of ``source_folder`` (a ``tiny_folders`` domain) copied into a new ``folder``."""
    folder.mkdir()
    for path in sorted(source_folder.glob("*.png"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def _write_translations(source_folder, output_folder, translator):
    from PIL import Image

    output_folder.mkdir()
    sources = ImageFolder(source_folder, size=32)
    for index, path in enumerate(sources.paths):
        with torch.no_grad():
            image = translator(sources[index][None])[0]
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(output_folder / f"{path.stem}.png")


def test_folders_round_trip_through_the_command_line(tmp_path, tiny_folders, capsys):
    sources = _copy_images(tiny_folders / "trainA", tmp_path / "testA", 5)
    _write_translations(sources, tmp_path / "fakeB", lambda images: images.flip(1))
    (tmp_path / "fakeB" / "002.png").unlink()  # a missing translation is fine
    out = tmp_path / "metrics.json"
    code = evaluate.main(
        [
            "--translations", str(tmp_path / "fakeB"),
            "--target", str(tiny_folders / "trainB"),
            "--sources", str(sources),
            "--size", "32",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["metrics"] == {}  # no encoder and no Inception weights: nothing to compute, and it says so
    assert result["details"] == {"count_translations": 4, "count_target": 32}
    assert result["inputs"]["sources"] == str(sources)
    printed = capsys.readouterr().out
    assert "no encoder given" in printed and "cannot work offline" in printed


def test_evaluate_folders_with_an_encoder_and_orphan_translations(tmp_path, tiny_folders):
    sources = _copy_images(tiny_folders / "trainA", tmp_path / "testA", 4)
    targets = _copy_images(tiny_folders / "trainB", tmp_path / "testB", 4)
    _write_translations(sources, tmp_path / "fakeB", nn.Identity())
    result = evaluate_folders(tmp_path / "fakeB", targets, sources=sources, encoder=LinearEmbedder(size=32), size=32)
    assert result["metrics"]["travel_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["encoder_frechet_distance"] > 0
    (tmp_path / "fakeB" / "extra.png").write_bytes((tmp_path / "fakeB" / "000.png").read_bytes())
    with pytest.raises(ValueError, match="no source of the same name"):
        evaluate_folders(tmp_path / "fakeB", targets, sources=sources, size=32)


def test_command_line_reports_missing_arguments_and_files(tmp_path, tiny_folders, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--translations", str(tmp_path)])
    assert "--out" in capsys.readouterr().err
    assert evaluate.main(["--translations", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.strip() == (
        "reference/evaluate.py: error: --target: required unless --audit is given "
        "(a folder of real target-domain images)"
    )
    images = tiny_folders / "trainA"
    code = evaluate.main(
        ["--translations", str(images), "--target", str(images), "--inception-weights",
         str(tmp_path / "missing.pth"), "--out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert code == 2
    assert "missing.pth" in capsys.readouterr().err


def test_command_line_with_a_clip_checkpoint_on_disk(tmp_path, tiny_clip_dir, tiny_folders, capsys):
    sources = _copy_images(tiny_folders / "trainA", tmp_path / "testA", 4)
    targets = _copy_images(tiny_folders / "trainB", tmp_path / "testB", 4)
    _write_translations(sources, tmp_path / "fakeB", lambda images: images.flip(1))  # RGB -> BGR
    out = tmp_path / "metrics.json"
    arguments = ["--translations", str(tmp_path / "fakeB"), "--target", str(targets),
                 "--sources", str(sources), "--size", "32", "--batch-size", "3",
                 "--out", str(out)]  # fmt: skip
    assert evaluate.main([*arguments, "--encoder", str(tiny_clip_dir)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert -1.0 <= metrics["travel_consistency"] <= 1.0
    assert metrics["encoder_frechet_distance"] > 0
    assert evaluate.main([*arguments, "--overwrite", "--encoder", str(tmp_path / "no-such-checkpoint")]) == 2
    assert "no-such-checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Inception metrics through torch-fidelity


def test_inception_metrics_explain_the_offline_problem(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cannot work offline.*--inception-weights"):
        inception_metrics(tmp_path, tmp_path, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_metrics(tmp_path, tmp_path, tmp_path / "nope.pth")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(ImportError, match="torch-fidelity is not installed.*torchvision"):
        inception_metrics(tmp_path, tmp_path, weights)


def test_inception_metrics_pass_the_local_weights_to_torch_fidelity(tmp_path, tiny_folders, monkeypatch):
    _copy_images(tiny_folders / "trainA", tmp_path / "fake", 3)
    _copy_images(tiny_folders / "trainB", tmp_path / "real", 5)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    calls = []

    def calculate_metrics(**kwargs):
        calls.append(kwargs)
        return {
            "frechet_inception_distance": 12.5,
            "kernel_inception_distance_mean": 0.01,
            "kernel_inception_distance_std": 0.002,
        }

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    result = inception_metrics(tmp_path / "fake", tmp_path / "real", weights, kid_subset_size=1000)
    assert result == {"inception_fid": 12.5, "inception_kid_mean": 0.01, "inception_kid_std": 0.002}
    (kwargs,) = calls
    assert kwargs["feature_extractor_weights_path"] == str(weights)
    assert kwargs["fid"] and kwargs["kid"]
    assert kwargs["kid_subset_size"] == 3  # no more than the smaller folder


# ---------------------------------------------------------------------------------------------
# Reporting


def test_format_table_text_and_markdown():
    rows = [{"name": "a", "x": 0.123456, "y": None}, {"name": "bb", "x": float("nan"), "y": 3}]
    text = format_table(rows, ["name", "x", "y"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "x", "y"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["a", "0.1235", "-"] and lines[3].split() == ["bb", "nan", "3"]
    markdown = format_table(rows, ["name", "x"], markdown=True).splitlines()
    assert markdown[0] == "| name | x |" and markdown[2] == "| a | 0.1235 |"


def test_format_table_right_aligns_the_named_columns_without_trailing_spaces():
    rows = [{"name": "a", "n": "7"}, {"name": "long name", "n": "123"}, {"name": "c", "n": ""}]
    assert format_table(rows, ["name", "n"], right=["n"]).splitlines() == [
        "name         n",
        "---------  ---",
        "a            7",
        "long name  123",
        "c",
    ]
    assert format_table(rows, ["name", "n"], right=["n"], markdown=True).splitlines()[1] == "|---|---:|"


# ---------------------------------------------------------------------------------------------
# The flip audit


POOL_FACTORY = """
from torch import nn

def pooled(image_size):
    return nn.AvgPool2d(4)  # (N, 3, S/4, S/4), flattened by the loader
"""


@pytest.fixture
def swapped_translations(tmp_path, tiny_folders):
    """8 sources and their 'translations': the sources themselves, except that 001 and 005 swapped images."""
    sources = _copy_images(tiny_folders / "trainA", tmp_path / "testA", 8)
    translations = _copy_images(sources, tmp_path / "fakeB", 8)
    first, second = translations / "001.png", translations / "005.png"
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    factory = tmp_path / "pooled.py"
    factory.write_text(POOL_FACTORY)
    arguments = ["--translations", str(translations), "--sources", str(sources), "--size", "32",
                 "--encoder-mode", "module", "--encoder", f"{factory}:pooled"]  # fmt: skip
    return arguments, sources, translations


def test_audit_ranks_the_swapped_pair_first_and_writes_csv_figure_and_report(tmp_path, swapped_translations, capsys):
    import csv

    from PIL import Image

    arguments, _, _ = swapped_translations
    out = tmp_path / "report" / "audit.json"
    assert evaluate.main([*arguments, "--audit", "2", "--out", str(out)]) == 0  # no --target: an audit alone
    printed = capsys.readouterr().out.splitlines()
    rows = list(csv.DictReader((out.parent / "audit.csv").open()))
    assert [int(row["rank"]) for row in rows] == list(range(1, 9))
    assert {Path(row["file"]).name for row in rows[:2]} == {"001.png", "005.png"}
    assert all(Path(row["file"]).stem == Path(row["source"]).stem for row in rows)
    assert max(float(row["score"]) for row in rows[2:]) < float(rows[1]["score"])
    assert float(rows[1]["percentile"]) == pytest.approx(6 / 7, abs=1e-4)  # the swapped two tie
    assert float(rows[-1]["percentile"]) == 0 and float(rows[0]["row_mean"]) == float(rows[0]["score"])
    report = json.loads(out.read_text())
    audit = report["audit"]
    assert audit["count"] == 8 and audit["method"] == "row_mean"
    assert {entry["rank"] for entry in audit["most_suspicious"]} == {1, 2}
    assert {entry["rank"] for entry in audit["least_suspicious"]} == {7, 8}
    assert {Path(entry["file"]).name for entry in audit["most_suspicious"]} == {"001.png", "005.png"}
    assert report["metrics"] == {} and report["inputs"]["target"] is None
    assert [line.split()[:2] for line in printed if line.startswith("rank")] == [["rank", "1"], ["rank", "2"]]
    figure = Image.open(out.parent / "audit.png").convert("L")
    thumb, pad, line = 96, 6, 13
    assert figure.size == (2 * (2 * thumb + 3 * pad) + pad, 4 * line + pad + 2 * (thumb + 2 * line + pad) + pad)
    header = torch.from_numpy(np.array(figure.crop((0, 0, figure.width, 4 * line))))
    half = figure.width // 2
    assert (header[:, :half] < 128).any() and (header[2 * line :, half:] < 128).any(), "a block without a heading"


def test_audit_refuses_missing_flags_and_existing_files_in_one_line(tmp_path, swapped_translations, capsys):
    arguments, sources, _ = swapped_translations
    out = ["--out", str(tmp_path / "r.json")]
    without_sources = [a for a in arguments if a not in ("--sources", str(sources))]
    assert evaluate.main([*without_sources, "--audit", "2", *out]) == 2
    assert capsys.readouterr().err.startswith("reference/evaluate.py: error: --sources: --audit pairs each")
    without_encoder = arguments[:6]
    assert evaluate.main([*without_encoder, "--audit", "2", *out]) == 2
    assert capsys.readouterr().err.startswith("reference/evaluate.py: error: --encoder: --audit needs a frozen encoder")
    with pytest.raises(SystemExit):
        evaluate.main([*arguments, "--audit", "0", *out])
    assert "--audit" in capsys.readouterr().err
    (tmp_path / "audit.csv").write_text("an earlier audit")
    assert evaluate.main([*arguments, "--audit", "2", *out]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("reference/evaluate.py: error: --out:") and "--overwrite" in err and len(err.splitlines()) == 1
    )
    assert evaluate.main([*arguments, "--audit", "2", "--overwrite", *out]) == 0
