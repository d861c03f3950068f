"""The reference trainer: steps, resume, checkpoints under kill/SIGTERM, options, losses."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import train as train_module
from reference.checkpoint import load_checkpoint, save_atomic, save_checkpoint, step_checkpoints
from reference.losses import (
    GAN_LOSSES,
    diff_augment,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    notebook_travel_loss,
)
from reference.models import PatchDiscriminator, ResnetGenerator
from reference.stream import StreamBatches
from reference.train import (
    SetupError,
    TrainConfig,
    build_encoder,
    build_parser,
    check_config,
    main,
    save_image_grid,
    train,
)
from travel_loss import travel_loss

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(out: Path, encoder: Path | None = None, data: Path | str | None = "unused", **overrides) -> TrainConfig:
    """32 px images of ``data`` (the ``tiny_folders`` fixture; a placeholder where only the config is
    checked), an 8-wide generator with one block, a two-layer PatchGAN."""
    options = dict(
        data=None if data is None else str(data), size=32, batch_size=4, steps=2,
        encoder=str(encoder) if encoder is not None else "unused",
        encoder_mode="clip" if encoder is not None else "siamese",
        siamese_width=4, siamese_dim=8, g_width=8, g_blocks=1, d_width=8, d_layers=2, out=str(out),
        log_every=1, sample_every=1000, checkpoint_every=1000, num_workers=0,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


def fresh_networks(config: TrainConfig) -> tuple[ResnetGenerator, PatchDiscriminator]:
    """The trainer's initial G and D: seeded by config.seed, G built first."""
    torch.manual_seed(config.seed)
    generator = ResnetGenerator(3, 3, width=config.g_width, n_blocks=config.g_blocks)
    discriminator = PatchDiscriminator(3, width=config.d_width, n_layers=config.d_layers)
    return generator, discriminator


def assert_states_equal(a: dict, b: dict, path: str = "") -> None:
    """Bitwise equality of two nested checkpoint structures."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{index}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"


TRAINED_STATE_KEYS = (
    "generator",
    "discriminator",
    "siamese",
    "optimizers",
    "schedulers",
    "grad_scalers",
    "adaptive_lambda",
    "rng",
    "data",
    "step",
)


# ---------------------------------------------------------------------------------------------
# training steps


def test_steps_change_generator_and_discriminator_but_not_encoder(tmp_path, tiny_clip_dir, tiny_folders, monkeypatch):
    built = []

    def spy(config):
        encoder = build_encoder(config)
        built.append(encoder)
        return encoder

    monkeypatch.setattr(train_module, "build_encoder", spy)
    config = tiny_config(tmp_path / "run", tiny_clip_dir, data=tiny_folders, lambda_travel=1.0)
    summary = train(config, progress=False)
    assert summary["step"] == 2 and summary["images_per_second"] > 0 and summary["interrupted"] is None

    checkpoint = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert checkpoint["step"] == 2
    assert checkpoint["generator_kwargs"] == dict(in_channels=3, out_channels=3, width=8, n_blocks=1)
    assert checkpoint["config"] == dataclasses.asdict(config)
    generator, discriminator = fresh_networks(config)
    for name, network in (("generator", generator), ("discriminator", discriminator)):
        for key, before in network.state_dict().items():
            if before.dim() > 1:  # every conv weight moved (biases before instance norm get no gradient)
                assert not torch.equal(before, checkpoint[name][key]), f"{name}.{key} did not change"

    (encoder,) = built
    reference = build_encoder(config)
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())
    for (key, trained), (_, original) in zip(encoder.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(trained, original), f"encoder weight {key} changed"

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss_travel"] > 0 and math.isfinite(r["loss_g"]) for r in records)
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()

    # The travel term reaches the generator: without it, G ends elsewhere.
    train(dataclasses.replace(config, out=str(tmp_path / "zero"), lambda_travel=0.0), progress=False)
    without = load_checkpoint(tmp_path / "zero" / "latest.pt")["generator"]
    assert any(not torch.equal(without[k], checkpoint["generator"][k]) for k in without)

    # An existing run is never overwritten silently.
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(config, progress=False)


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_clip_dir, tiny_folders):
    # Augmentation and flips draw random numbers; both must continue exactly.
    config = tiny_config(
        tmp_path / "full",
        tiny_clip_dir,
        data=tiny_folders,
        steps=4,
        augment="color,translation,cutout",
        lambda_travel=2.0,
    )
    train(config, progress=False)
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), steps=2), progress=False)
    summary = train(dataclasses.replace(config, out=str(tmp_path / "halves"), resume=True), progress=False)
    assert summary["step"] == 4

    full = load_checkpoint(tmp_path / "full" / "latest.pt")
    halves = load_checkpoint(tmp_path / "halves" / "latest.pt")
    for key in TRAINED_STATE_KEYS:
        if key in full:
            assert_states_equal(full[key], halves[key], key)
    lines = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    expected = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(lines, expected):
        assert {k: v for k, v in got.items() if k != "images_per_second"} == {
            k: v for k, v in want.items() if k != "images_per_second"
        }


def test_resume_from_a_kept_checkpoint_with_siamese_auto_lambda_and_decay(tmp_path, tiny_folders):
    config = tiny_config(
        tmp_path / "full",
        data=tiny_folders,
        steps=4,
        lambda_travel="auto",
        gan_loss="hinge",
        decay_steps=3,
        checkpoint_every=2,
        keep_checkpoints=2,
    )
    train(config, progress=False)
    assert [p.name for p in step_checkpoints(tmp_path / "full")] == ["step_000002.pt", "step_000004.pt"]
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "step_000002.pt", tmp_path / "resumed" / "latest.pt")
    train(dataclasses.replace(config, out=str(tmp_path / "resumed"), resume=True), progress=False)

    full = load_checkpoint(tmp_path / "full" / "latest.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "latest.pt")
    assert full["adaptive_lambda"]["count"] == 4 and full["siamese"]
    for key in TRAINED_STATE_KEYS:
        assert_states_equal(full[key], resumed[key], key)
    assert full["schedulers"]["generator"]["_last_lr"][0] == pytest.approx(0.0)  # decayed to zero at the end


# ---------------------------------------------------------------------------------------------
# checkpoints under kill and SIGTERM (real processes)


def _launch(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """Start ``python reference/train.py`` from the output's parent folder (the script must work from anywhere)."""
    command = [
        sys.executable, str(REPO / "reference" / "train.py"), "--data", str(data), "--size", "16",
        "--d-layers", "1", "--batch-size", "2", "--g-width", "4", "--g-blocks", "0", "--d-width", "4",
        "--encoder-mode", "siamese", "--siamese-width", "4", "--siamese-dim", "4", "--steps", "100000",
        "--log-every", "1", "--sample-every", "100000", "--num-workers", "0", "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(out.parent / f"{out.name}.log", "w")  # a file, not a pipe: a full pipe would block the trainer
    return subprocess.Popen(command, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _output(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def _wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early with {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("trainer made no progress in time")
        time.sleep(0.05)


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_checkpoint_survives_sigkill_during_training(tmp_path, tiny_folders):
    out = tmp_path / "killed"
    process = _launch(tiny_folders, out, "--checkpoint-every", "1")
    try:
        _wait_for(lambda: len(_logged_steps(out)) >= 4, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoint = load_checkpoint(out / "latest.pt")  # weights_only=True; never a torn file
    assert checkpoint["step"] >= 3
    assert set(TRAINED_STATE_KEYS) - {"siamese"} <= set(checkpoint) and checkpoint["siamese"]
    assert all(torch.isfinite(t).all() for t in checkpoint["generator"].values())


def test_sigterm_saves_a_checkpoint_at_that_step_and_exits_cleanly(tmp_path, tiny_folders):
    out = tmp_path / "terminated"
    process = _launch(tiny_folders, out, "--checkpoint-every", "100000")
    try:
        _wait_for(lambda: len(_logged_steps(out)) >= 2, process)
        assert not (out / "latest.pt").exists()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = _output(out)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output
    checkpoint = load_checkpoint(out / "latest.pt")
    assert checkpoint["step"] == _logged_steps(out)[-1] < 100000

    # ... and the run continues from there.
    config = TrainConfig(**{**checkpoint["config"], "steps": checkpoint["step"] + 1, "resume": True})
    assert train(config, progress=False)["step"] == checkpoint["step"] + 1


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = save_atomic({"a": torch.ones(2)}, tmp_path / "latest.pt")

    def broken(obj, file):
        Path(file).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomic({"a": torch.zeros(2)}, path, save=broken)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # no temporary file left

    for step in (1, 2, 3):
        save_checkpoint({"step": step}, tmp_path, step, keep=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_000002.pt", "step_000003.pt"]
    assert load_checkpoint(tmp_path / "step_000002.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 3


# ---------------------------------------------------------------------------------------------
# options and errors


def test_fp16_on_cpu_is_a_clear_error(tmp_path, capsys, tiny_folders):
    with pytest.raises(ValueError, match="amp: .*float16 autocast needs CUDA"):
        train(tiny_config(tmp_path / "x", data=tiny_folders, amp="fp16", device="cpu"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
            train(tiny_config(tmp_path / "x", data=tiny_folders, amp="fp16", device="auto"), progress=False)
    with pytest.raises(SystemExit):
        main(["--data", str(tiny_folders), "--amp", "fp16", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert "float16 autocast needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")
def test_xla_without_torch_xla_is_one_clear_message(tmp_path, capsys, tiny_folders):
    with pytest.raises(SetupError, match="--device xla needs torch_xla, which is not installed"):
        train(tiny_config(tmp_path / "x", data=tiny_folders, device="xla"), progress=False)
    assert main(["--data", str(tiny_folders), "--device", "xla", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("needs torch_xla") == 1 and "Traceback" not in err


def test_bf16_autocast_and_compile_run_without_recompiling(tmp_path, tiny_clip_dir, tiny_folders):
    config = tiny_config(
        tmp_path / "c",
        tiny_clip_dir,
        data=tiny_folders,
        steps=3,
        amp="bf16",
        compile=True,
        compile_backend="eager",
        channels_last=True,
    )
    summary = train(config, progress=False)
    graphs = summary["compiled_graphs"]
    assert graphs["after_first_step"] > 0 and graphs["end"] == graphs["after_first_step"]
    assert all(math.isfinite(v) for v in summary["metrics"].values())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(data=None), "data"),
        (dict(data_a="x"), "data"),
        (dict(size=30), "size"),
        (dict(size=16, d_layers=3), "size"),
        (dict(lambda_travel=-1.0), "lambda_travel"),
        (dict(lambda_travel="big"), "lambda_travel"),
        (dict(gan_loss="wgan"), "gan_loss"),
        (dict(augment="colour"), "augment"),
        (dict(batch_size=1), "batch_size"),
        (dict(encoder_mode="vit"), "encoder_mode"),
        (dict(travel_objective="notebook", travel_reduction="sum"), "travel_objective"),
        (dict(decay_steps=5, steps=2), "decay_steps"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_config_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        check_config(tiny_config(tmp_path, **overrides))


def test_command_line_maps_onto_the_config():
    args = vars(build_parser().parse_args([
        "--data-a", "a", "--data-b", "b", "--lambda-travel", "auto", "--augment", "--no-flip", "--g-blocks", "3",
        "--lr-d", "1e-3", "--travel-objective", "notebook", "--encoder-mode", "random-clip", "--keep-checkpoints", "2",
    ]))  # fmt: skip
    args.pop("demo"), args.pop("quick"), args.pop("preset")
    config = TrainConfig(**args)
    assert (config.data_a, config.data_b, config.lambda_travel, config.augment) == (
        "a",
        "b",
        "auto",
        "color,translation,cutout",
    )
    assert (config.flip, config.g_blocks, config.lr_d, config.discriminator_lr) == (False, 3, 1e-3, 1e-3)
    assert (config.travel_objective, config.encoder_mode, config.keep_checkpoints) == ("notebook", "random-clip", 2)
    assert TrainConfig().discriminator_lr == 2 * TrainConfig().lr == 4e-4
    assert build_parser().parse_args(["--lambda-travel", "0.003"]).lambda_travel == 0.003
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lambda-travel", "lots"])


def test_random_clip_has_the_checkpoints_shape_but_not_its_weights(tmp_path, tiny_clip_dir):
    pretrained = build_encoder(tiny_config(tmp_path, tiny_clip_dir))
    random_clip = build_encoder(tiny_config(tmp_path, tiny_clip_dir, encoder_mode="random-clip"))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = pretrained(images), random_clip(images)
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert not any(p.requires_grad for p in random_clip.model.parameters())
    siamese = build_encoder(tiny_config(tmp_path))
    assert siamese(images).shape == (3, 8) and all(p.requires_grad for p in siamese.parameters())


def test_stream_batches_split_the_global_batch_and_resume_anywhere():
    def take(sampler, count):
        iterator = iter(sampler)
        return [next(iterator) for _ in range(count)]

    single = take(StreamBatches(10, 4, seed=3, domain=0, flip=True), 6)
    ranks = [take(StreamBatches(10, 2, seed=3, domain=0, rank=r, world_size=2, flip=True), 6) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == single  # rank r holds slice r of each global batch
    positions = [index for batch in single for index, _ in batch]
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:20]) == list(range(10))  # epochs
    assert any(flip for batch in single for _, flip in batch) and not all(flip for batch in single for _, flip in batch)
    assert take(StreamBatches(10, 4, seed=3, domain=0, flip=True, start=8), 4) == single[2:]
    assert take(StreamBatches(10, 4, seed=3, domain=1), 1) != take(StreamBatches(10, 4, seed=3, domain=0), 1)


def test_log_interval_writes_the_mean_of_each_interval(tmp_path, tiny_folders):
    from reference.data import ImageFolder
    from reference.logs import LogInterval
    from reference.runtime import Runtime

    config = tiny_config(tmp_path, data=tiny_folders, steps=5, max_unreadable_fraction=0.5)
    images = ImageFolder(tiny_folders / "trainA", size=32)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    metrics = LogInterval(
        config, Runtime(torch.device("cpu")), {"generator": optimizer}, [images], start_step=1, progress=False
    )
    assert metrics.record == {} and metrics.images_per_step == 4 and metrics.image_files == len(images)
    for value in (1.0, 3.0):  # steps 2 and 3: tensors, summed without a host sync
        metrics.add({"loss_g": torch.tensor(value), "loss_d": torch.tensor(2 * value), "loss_travel": 0.5})
    record = metrics.close_interval(3)
    assert {k: record[k] for k in ("step", "loss_g", "loss_d", "loss_travel", "lr", "unreadable_images")} == {
        "step": 3, "loss_g": 2.0, "loss_d": 4.0, "loss_travel": 0.5, "lr": 0.25, "unreadable_images": 0
    }  # fmt: skip
    assert record["images_per_second"] > 0 and metrics.record is record and metrics.too_many_unreadable is None
    metrics.add({"loss_g": torch.tensor(5.0), "loss_d": torch.tensor(0.0), "loss_travel": 0.5})
    assert metrics.close_interval(4)["loss_g"] == 5.0  # a new interval: one step, not three
    metrics.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 4] and lines[0] == record
    images.unreadable[:] = True  # every file failed to decode: the next log step says stop
    metrics.add({"loss_g": torch.tensor(1.0), "loss_d": torch.tensor(1.0), "loss_travel": 0.5})
    metrics.close_interval(5)
    assert metrics.too_many_unreadable is not None
    assert metrics.too_many_unreadable.startswith(f"stopped at step 5: {len(images)} of {len(images)} image files")


def test_image_grid_puts_input_and_translation_side_by_side(tmp_path):
    import numpy as np
    from PIL import Image

    inputs, outputs = -torch.ones(2, 3, 4, 6), torch.ones(2, 3, 4, 6)
    inputs[1, 0] = 1  # second row's input is red
    path = save_image_grid([inputs, outputs], tmp_path / "grid.png", padding=1)
    grid = torch.from_numpy(np.array(Image.open(path)))
    assert grid.shape == (2 * 5 + 1, 2 * 7 + 1, 3)
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[1, 8].tolist() == [255, 255, 255]
    assert grid[6, 1].tolist() == [255, 0, 0]


def test_samples_are_labelled_and_small_images_enlarged(tmp_path):
    """write_samples: input | translation columns under a header naming them and the title; 16 px images
    enlarged 4x (nearest) so that the labels fit, large ones kept at their size."""
    import numpy as np
    from PIL import Image

    from reference.logs import GRID_HEADER_LINES, GRID_LINE_PX, SAMPLE_MIN_PX, write_samples

    identity = torch.nn.Conv2d(3, 3, 1)  # a generator that returns its input exactly
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        identity.bias.zero_()
    header = GRID_HEADER_LINES * GRID_LINE_PX + 2
    for size, shown in ((16, 64), (80, 80)):
        inputs = torch.rand(3, 3, size, size) * 2 - 1
        path = tmp_path / f"step_{size}.png"
        write_samples(identity, inputs, path, contextlib.nullcontext, False, "step 7 of 9")
        grey = torch.from_numpy(np.array(Image.open(path).convert("L")))
        assert tuple(grey.shape) == (header + 3 * (shown + 2) + 2, 2 * (shown + 2) + 2)
        assert shown >= SAMPLE_MIN_PX
        assert (grey[:GRID_LINE_PX] < 128).any(), "no title"
        labels = grey[GRID_LINE_PX:header]
        assert all((labels[:, 2 + k * (shown + 2) : (k + 1) * (shown + 2)] < 128).any() for k in range(2))
        first = torch.from_numpy(np.array(Image.open(path).convert("RGB")))[
            header + 2 : header + 2 + shown, 2 : 2 + shown
        ]
        expected = F.interpolate(inputs[:1], size=shown, mode="nearest")[0].permute(1, 2, 0)
        assert torch.equal(first, ((expected + 1) * 127.5).round().to(torch.uint8))


# ---------------------------------------------------------------------------------------------
# losses


def notebook_loop(s: torch.Tensor, g: torch.Tensor) -> float:
    """The notebook's objective, written out: per shift k and dimension d, a cosine across the batch."""
    n, dims = s.shape
    total = 0.0
    for k in range(1, n):
        for d in range(dims):
            v = [float(s[i, d] - s[(i + k) % n, d]) for i in range(n)]
            z = [float(g[i, d] - g[(i + k) % n, d]) for i in range(n)]
            norm_v, norm_z = max(math.sqrt(sum(x * x for x in v)), 1e-6), max(math.sqrt(sum(x * x for x in z)), 1e-6)
            total += 1 - sum(a * b for a, b in zip(v, z)) / (norm_v * norm_z)
    return total


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.integers(0, 2**16), st.booleans())
def test_notebook_objective_equals_a_loop(n, dims, seed, duplicate_row):
    generator = torch.Generator().manual_seed(seed)
    s, g = (
        torch.randn(n, dims, generator=generator, dtype=torch.float64),
        torch.randn(n, dims, generator=generator, dtype=torch.float64),
    )
    if duplicate_row:
        s[-1], g[-1] = s[0], g[0]
    g.requires_grad_(True)
    loss = notebook_travel_loss(s, g)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(notebook_loop(s, g.detach()), rel=1e-5, abs=1e-5)
    loss.backward()
    assert torch.isfinite(g.grad).all()


def test_notebook_objective_is_not_the_papers():
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(6, 4, generator=generator)
    scaled = s * torch.tensor([1.0, 10.0, 0.1, 3.0])  # the paper's loss sees this change of directions
    # per-dimension cosine ignores it: 0 up to (N - 1) D = 20 float32 terms 1 - cos of ~1e-7 each
    assert notebook_travel_loss(s, scaled).item() == pytest.approx(0.0, abs=1e-4)
    assert travel_loss(s, scaled).item() > 0.05
    with pytest.raises(ValueError, match="emb_src, emb_gen"):
        notebook_travel_loss(s, s[:3])


@pytest.mark.parametrize("kind", GAN_LOSSES)
def test_adversarial_losses_point_the_right_way(kind):
    # Below the "real" target (1 for lsgan and hinge) G pushes fake logits up ...
    logits = torch.linspace(-3, 1, 9, requires_grad=True)
    generator_adversarial_loss(logits, kind).backward()
    assert (logits.grad <= 0).all() and (logits.grad < 0).any()

    # ... and D pushes real logits up and (above the fake target, 0 for lsgan) fake logits down.
    real = torch.linspace(-3, 1, 9, requires_grad=True)
    fake = torch.linspace(0, 3, 7, requires_grad=True)
    discriminator_adversarial_loss(real, fake, kind).backward()
    assert (real.grad <= 0).all() and (real.grad < 0).any()
    assert (fake.grad >= 0).all() and (fake.grad > 0).any()

    right = discriminator_adversarial_loss(torch.full((4,), 2.0), torch.full((4,), -2.0), kind)
    fooled = discriminator_adversarial_loss(torch.full((4,), -2.0), torch.full((4,), 2.0), kind)
    assert right < fooled
    with pytest.raises(ValueError, match="gan_loss"):
        generator_adversarial_loss(logits, "wgan")


def test_adversarial_losses_match_their_definitions():
    generator = torch.Generator().manual_seed(0)
    real, fake = (torch.randn(2, 1, 5, 5, generator=generator) for _ in range(2))
    ones, zeros = torch.ones_like(real), torch.zeros_like(fake)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(generator_adversarial_loss(fake, "bce"), bce(fake, ones))
    torch.testing.assert_close(discriminator_adversarial_loss(real, fake, "bce"), bce(real, ones) + bce(fake, zeros))
    torch.testing.assert_close(
        discriminator_adversarial_loss(real, fake, "lsgan"), F.mse_loss(real, ones) + F.mse_loss(fake, zeros)
    )
    assert discriminator_adversarial_loss(torch.ones(3), torch.zeros(3), "lsgan") == 0
    assert discriminator_adversarial_loss(torch.full((3,), 1.5), torch.full((3,), -1.0), "hinge") == 0
    torch.testing.assert_close(generator_adversarial_loss(fake, "hinge"), -fake.mean())
    # Non-saturating: a confident D (logit -10 on a fake) still gives G a full-size gradient.
    confident = torch.full((1,), -10.0, requires_grad=True)
    generator_adversarial_loss(confident, "bce").backward()
    assert confident.grad.item() == pytest.approx(-1.0, abs=1e-4)  # exactly -sigmoid(10) = -0.99995


def test_diff_augment_is_random_differentiable_and_policy_checked():
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.equal(diff_augment(images, ""), images)
    seeded = [diff_augment(images, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1]) and seeded[0].shape == images.shape
    assert not torch.equal(seeded[0], diff_augment(images, generator=torch.Generator().manual_seed(6)))
    seeded[0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    ones = torch.ones(64, 3, 16, 16)
    cut = diff_augment(ones, "cutout", torch.Generator().manual_seed(0))
    zero_fraction = (cut == 0).float().mean().item()
    assert 0.1 < zero_fraction <= 0.25 + 1e-6  # one square of half the side, clipped at the border
    shifted = diff_augment(ones, "translation", torch.Generator().manual_seed(0))
    assert set(shifted.unique().tolist()) <= {0.0, 1.0} and (shifted == 0).any()
    with pytest.raises(ValueError, match="unknown augmentation"):
        diff_augment(images, "color,blur")


def test_every_flag_has_help_text_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default value
    parser = train_module.build_parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings != ["-h", "--help"] and not a.help]
    assert missing == []
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.default is not None and action.option_strings and action.option_strings[0] not in ("-h",):
            assert f"(default: {action.default})" in text or f"(default: {action.default!s})" in text, action.dest
