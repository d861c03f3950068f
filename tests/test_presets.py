"""reference.presets: the lambda conventions preserve the objective's gradient; presets build and check."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import presets
from reference.losses import generator_adversarial_loss, notebook_travel_loss
from reference.presets import (
    PRESETS,
    PresetNotRunnableError,
    check_preset_runnable,
    mean_to_paper_lambda,
    notebook_lambda,
    paper_to_mean_lambda,
    patches_per_image,
    preset_command,
    preset_config,
)
from reference.steps import travel_term
from reference.train import StepOptions, TrainConfig, build_parser, check_config
from travel_loss import travel_loss


def _objectives(lambda_paper: float, config: dict, *, batch: int, side: int, seed: int = 0):
    """Gradients at a shared parameter of (a) the paper's summed objective, written out, and
    (b) the trainer's objective with the preset's options; plus the factor N * P between them."""
    torch.manual_seed(seed)
    theta = torch.randn(batch, 6, requires_grad=True)
    fake = torch.tanh(theta)  # stands for G(x); the logits and embeddings below depend on it
    logits = (fake @ torch.randn(6, side * side)).view(batch, 1, side, side)
    emb_src, emb_gen = torch.randn(batch, 5), fake @ torch.randn(6, 5) + 0.1 * torch.randn(batch, 5)

    if config.get("travel_objective", "paper") == "notebook":
        paper_travel = notebook_travel_loss(emb_src, emb_gen)
    else:
        paper_travel = travel_loss(emb_src, emb_gen, reduction="sum")  # equation 2 with its sum over i != j
    paper = F.softplus(-logits).sum() + lambda_paper * paper_travel  # BCE against "real", summed
    (grad_paper,) = torch.autograd.grad(paper, theta, retain_graph=True)

    options = StepOptions.from_config(TrainConfig(**config), "cpu")
    ours = generator_adversarial_loss(logits, options.gan_loss) + options.lambda_travel * travel_term(
        emb_src, emb_gen, options
    )
    (grad_ours,) = torch.autograd.grad(ours, theta)
    return grad_paper, grad_ours, batch * side * side


@pytest.mark.parametrize("convention", ["mean", "notebook"])
@pytest.mark.parametrize("lambda_paper", [0.0003, 0.01, 3.0])
def test_preset_objective_is_the_papers_summed_objective_up_to_a_constant(convention, lambda_paper):
    # the paper's batch of 128 and the 30 x 30 PatchGAN map of 256 px images
    config = preset_config("gta2cityscapes-lambda0.001-20k", data="/data", convention=convention)
    config["lambda_travel"] = (paper_to_mean_lambda if convention == "mean" else notebook_lambda)(lambda_paper)
    grad_paper, grad_ours, factor = _objectives(lambda_paper, config, batch=128, side=30)
    torch.testing.assert_close(grad_paper, factor * grad_ours, rtol=1e-4, atol=1e-6 * grad_paper.abs().max().item())


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(2, 12), side=st.integers(1, 6), lambda_paper=st.floats(1e-4, 10.0), seed=st.integers(0, 1000))
def test_mean_convention_preserves_the_gradient_direction_for_any_batch_and_map(batch, side, lambda_paper, seed):
    lambda_mean = paper_to_mean_lambda(lambda_paper, batch_size=batch, patches=side * side)
    config = {"data": "/data", "lambda_travel": lambda_mean}
    grad_paper, grad_ours, factor = _objectives(lambda_paper, config, batch=batch, side=side, seed=seed)
    torch.testing.assert_close(grad_paper, factor * grad_ours, rtol=1e-4, atol=1e-6 * grad_paper.abs().max().item())


def test_a_wrong_mapping_would_be_caught():
    """The check above has teeth: the naive 'same number in both conventions' breaks it."""
    config = {"data": "/data", "lambda_travel": 0.01}
    grad_paper, grad_ours, factor = _objectives(0.01, config, batch=8, side=3)
    assert not torch.allclose(grad_paper, factor * grad_ours, rtol=1e-3)


def test_conversion_values_and_round_trip():
    assert patches_per_image(256) == 900 and patches_per_image(64) == 36
    assert paper_to_mean_lambda(0.001) == pytest.approx(0.001 * 127 / 900)
    assert notebook_lambda(0.001) == pytest.approx(0.001 / (128 * 900))
    for value in (0.0, 0.0003, 0.01, 5.0):
        assert mean_to_paper_lambda(paper_to_mean_lambda(value, batch_size=16), batch_size=16) == pytest.approx(value)
    with pytest.raises(ValueError, match="batch_size"):
        paper_to_mean_lambda(0.001, batch_size=1)
    with pytest.raises(ValueError, match="patches"):
        paper_to_mean_lambda(0.001, patches=0)
    with pytest.raises(ValueError, match="lambda"):
        paper_to_mean_lambda(-1.0)
    with pytest.raises(ValueError, match="size"):
        patches_per_image(8)


def test_table1_presets_carry_the_papers_lambdas_and_update_counts():
    table1 = {(p.lambda_paper, p.steps) for p in PRESETS.values() if p.description.startswith("Table 1")}
    assert table1 == {
        (0.0003, 40_000),
        (0.001, 40_000),
        (0.001, 20_000),
        (0.003, 17_000),
        (0.01, 17_000),
        (0.01, 40_000),
    }
    config = preset_config("gta2cityscapes-lambda0.003-17k", data="/data")
    assert (config["batch_size"], config["size"], config["encoder"]) == (128, 256, "openai/clip-vit-large-patch14")
    assert (config["crop"], config["features"], config["lr"], config["lr_d"], config["beta1"]) == (
        "center",
        "pooled",
        2e-4,
        4e-4,
        0.5,
    )
    assert config["lambda_travel"] == pytest.approx(0.003 * 127 / 900)
    assert preset_config("gta2cityscapes-random-clip")["encoder_mode"] == "random-clip"
    baseline = preset_config("gta2cityscapes-travelgan", convention="notebook")
    assert (baseline["encoder_mode"], baseline["lambda_travel"], baseline.get("travel_objective", "paper")) == (
        "siamese",
        10.0,
        "paper",
    )


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("convention", ["mean", "notebook"])
def test_every_preset_is_a_valid_train_config_and_its_command_line_parses_back(name, convention):
    config = preset_config(name, data="/data/root", convention=convention)
    check_config(TrainConfig(**config))
    words = preset_command(config).split()[2:]
    parsed = vars(build_parser().parse_args(words))
    for key, value in config.items():
        expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert parsed[key] == expected, key


def test_world_size_splits_the_global_batch_and_overrides_apply():
    config = preset_config("monet2photo-cliptravelgan", data="/kaggle", world_size=4, steps=100, amp="off")
    assert config["batch_size"] == 32
    assert (config["steps"], config["amp"]) == (100, "off")
    assert config["data_a"].endswith("monet_jpg") and config["data_b"].endswith("photo_jpg")
    assert config["lambda_travel"] == pytest.approx(paper_to_mean_lambda(0.001, batch_size=128))  # the global batch
    with pytest.raises(ValueError, match="world_size"):
        preset_config("monet2photo-cliptravelgan", world_size=3)
    with pytest.raises(ValueError, match="convention"):
        preset_config("monet2photo-cliptravelgan", convention="sum")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("cyclegan")
    with pytest.raises(TypeError):
        TrainConfig(**preset_config("monet2photo-cliptravelgan", not_a_field=1))


def _fake_dataset(root, folders):
    for folder in folders:
        (root / folder).mkdir(parents=True)
        (root / folder / "0.jpg").write_bytes(b"\xff\xd8")
    return root


def test_check_preset_runnable_lists_everything_missing(tmp_path):
    with pytest.raises(PresetNotRunnableError) as error:
        check_preset_runnable("gta2cityscapes-lambda0.001-20k", data=tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "data: the root" in message and "CycleGAN layout" in message
    assert "encoder:" in message and "hf download openai/clip-vit-large-patch14" in message
    if not torch.cuda.is_available():
        assert "GPU: no CUDA device" in message
    (tmp_path / "monet" / "monet_jpg").mkdir(parents=True)
    with pytest.raises(
        PresetNotRunnableError, match=r"(?s)no .*image in .*monet_jpg.*missing folder .*photo_jpg.*Painter Myself"
    ):
        check_preset_runnable("monet2photo-travelgan", data=tmp_path / "monet", require_gpu=False)


def test_check_preset_runnable_passes_with_local_data_and_weights(tmp_path, tiny_clip_dir):
    root = _fake_dataset(tmp_path / "gta", ["trainA", "trainB"])
    config = check_preset_runnable(
        "gta2cityscapes-lambda0.01-40k", data=root, require_gpu=False, encoder=str(tiny_clip_dir), out=tmp_path / "run"
    )
    assert config["data_a"] == str(root / "trainA") and config["encoder"] == str(tiny_clip_dir)
    # the ablation and the baseline need no weights at all
    assert (
        check_preset_runnable("gta2cityscapes-random-clip", data=root, require_gpu=False, cache_dir=tmp_path)[
            "encoder_mode"
        ]
        == "random-clip"
    )
    assert (
        check_preset_runnable("gta2cityscapes-travelgan", data=root, require_gpu=False, cache_dir=tmp_path)[
            "encoder_mode"
        ]
        == "siamese"
    )


def test_command_line_lists_checks_and_prints_the_training_command(tmp_path, tiny_clip_dir, capsys):
    assert presets.main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS) and "0.0001411" in listing
    root = _fake_dataset(tmp_path / "kaggle", ["monet_jpg", "photo_jpg"])
    code = presets.main(
        [
            "monet2photo-cliptravelgan",
            "--data",
            str(root),
            "--encoder",
            str(tiny_clip_dir),
            "--no-gpu-check",
            "--world-size",
            "2",
        ]
    )
    assert code == 0
    command = capsys.readouterr().out.strip()
    assert command.startswith("torchrun --nproc_per_node 2 reference/train.py") and "--batch-size 64" in command
    assert presets.main(["monet2photo-cliptravelgan", "--data", str(tmp_path / "none"), "--no-gpu-check"]) == 2
    assert "cannot run here" in capsys.readouterr().err


def test_preset_fields_are_train_config_fields():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for preset in PRESETS.values():
        assert set(preset.base) | set(preset.fields) <= fields


def test_train_py_runs_every_preset_by_name_with_its_data_layout(tmp_path, monkeypatch):
    """One registry: reference/train.py --preset takes the paper's experiments and digits-demo;
    --data ROOT becomes the preset's data set folders under ROOT."""
    from reference import train as train_module

    seen = []
    monkeypatch.setattr(train_module, "train", lambda config, **kw: seen.append(config) or {"rank": 1})
    root = tmp_path / "kaggle"
    assert train_module.main(["--preset", "monet2photo-cliptravelgan", "--data", str(root), "--steps", "7"]) == 0
    assert train_module.main(["--preset", "digits-demo", "--data", str(root)]) == 0
    monet, digits = seen
    expected = preset_config("monet2photo-cliptravelgan", data=root, steps=7)
    for name, value in expected.items():
        assert getattr(monet, name) == value, name
    assert (monet.data, monet.data_a, monet.data_b) == (None, str(root / "monet_jpg"), str(root / "photo_jpg"))
    assert (digits.data, digits.data_a, digits.size, digits.batch_size) == (str(root), None, 16, 32)
    assert preset_config("digits-demo", world_size=2)["batch_size"] == 16  # the preset's own global batch
    with pytest.raises(ValueError, match="^world_size: expected an int >= 1 that divides the batch of 32"):
        preset_config("digits-demo", world_size=3)


def test_presets_command_line_checks_a_recipe_without_a_data_set(tmp_path, capsys):
    root = _fake_dataset(tmp_path / "root", ["trainA", "trainB"])
    assert presets.main(["digits-demo", "--data", str(root)]) == 0  # no GPU and no CLIP weights needed
    command = capsys.readouterr().out.strip()
    assert "--data " + str(root) in command and "stroke_embedder" in command and "--size 16" in command
    assert presets.main(["digits-demo", "--data", str(tmp_path / "none")]) == 2
    assert "expected a root holding trainA/ and trainB/" in capsys.readouterr().err
