"""The trainer under user mistakes and bad data: one line and exit status 2 before any work, an owned
--out, decode failures skipped and counted, damaged checkpoints named, metrics never truncated."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference.checkpoint import DamagedCheckpointError, load_checkpoint
from reference.config import TrainConfig
from reference.data import TooManyUnreadableImagesError
from reference.outputs import RunFolderBusyError, RunFolderLock
from reference.runtime import RunInputError
from reference.train import main, train

TINY = [
    "--size", "16", "--batch-size", "2", "--steps", "2", "--g-width", "4", "--g-blocks", "0", "--d-width", "4",
    "--d-layers", "1", "--encoder-mode", "siamese", "--siamese-width", "4", "--siamese-dim", "4",
    "--log-every", "1", "--sample-every", "1000", "--num-workers", "0",
]  # fmt: skip


def tiny(out: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = dict(
        size=16, batch_size=2, steps=2, g_width=4, g_blocks=0, d_width=4, d_layers=1, encoder_mode="siamese",
        siamese_width=4, siamese_dim=4, log_every=1, sample_every=1000, num_workers=0, out=str(out),
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)  # type: ignore[arg-type]


def corrupt_png_idat(data: bytes) -> bytes:
    """The PNG with its compressed pixel data scrambled under correct CRCs (passes ``verify()``)."""
    out, position = bytearray(data[:8]), 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            body = bytes(b ^ 0x5A for b in body)
        out += struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        position += 12 + length
    return bytes(out)


def image_root(root: Path, count: int = 4, corrupt: int = 0) -> Path:
    """root/trainA and root/trainB with ``count`` 16 px PNGs each; the first ``corrupt`` of trainA fail to decode."""
    rng = np.random.default_rng(0)
    for side in "AB":
        (root / f"train{side}").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            path = root / f"train{side}" / f"{index}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
            if side == "A" and index < corrupt:
                path.write_bytes(corrupt_png_idat(path.read_bytes()))
    return root


def run_main(capsys: pytest.CaptureFixture, *arguments: str) -> tuple[int, str]:
    try:
        code = main([*TINY, *arguments])
    except SystemExit as exit_info:
        code = exit_info.code  # type: ignore[assignment]
    return code, capsys.readouterr().err


def one_line(err: str, *fragments: str) -> None:
    progress_bar = ("step/s", "s/step")  # tqdm's rate, fast or slow
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    lines = [line for line in lines if not any(rate in line for rate in progress_bar)]
    lines = [line for line in lines if not line.startswith("  ")]  # the source line under a warning
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------------
# User mistakes: one line, exit status 2, before any work


def test_data_folder_mistakes_are_one_line_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, err = run_main(capsys, "--data", str(tmp_path / "missing"), "--out", str(out))
    assert code == 2
    one_line(err, "--data", "found nothing", "missing")
    (tmp_path / "half" / "trainA").mkdir(parents=True)
    code, err = run_main(capsys, "--data", str(tmp_path / "half"), "--out", str(out))
    assert code == 2
    one_line(err, "--data", "trainB/", "trainA/")
    (tmp_path / "empty").mkdir()
    image_root(tmp_path / "ok")
    code, err = run_main(
        capsys, "--data-a", str(tmp_path / "empty"), "--data-b", str(tmp_path / "ok" / "trainB"), "--out", str(out)
    )
    assert code == 2
    one_line(err, "--data-a", "expected image files", "found none", "empty")
    assert "dir_a" not in err
    code, err = run_main(
        capsys, "--data-a", str(tmp_path / "ok" / "trainA"), "--data-b", str(tmp_path / "nope"), "--out", str(out)
    )
    assert code == 2
    one_line(err, "--data-b", "nope")
    assert not out.exists()  # nothing was started


def test_out_that_is_a_file_or_read_only(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_folders: Path) -> None:
    (tmp_path / "file").write_text("mine")
    code, err = run_main(capsys, "--data", str(tiny_folders), "--out", str(tmp_path / "file"))
    assert code == 2
    one_line(err, "--out", "found a file", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK) and Path("/sys/kernel").is_dir():  # root: use a folder refused to anyone
            read_only = Path("/sys/kernel")
        code, err = run_main(capsys, "--data", str(tiny_folders), "--out", str(read_only / "run"))
        assert code == 2
        one_line(err, "--out", "not writable")
    finally:
        (tmp_path / "read-only").chmod(0o755)


def test_size_below_the_clip_input_is_refused_before_training(
    tmp_path: Path, tiny_clip_dir: Path, tiny_folders: Path
) -> None:
    config = tiny(tmp_path / "run", data=str(tiny_folders), encoder_mode="clip", encoder=str(tiny_clip_dir), size=16)
    with pytest.raises(RunInputError, match=r"--size: expected at least 32 .* got 16"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    train(
        tiny(
            tmp_path / "resized",
            data=str(tiny_folders),
            encoder_mode="clip",
            encoder=str(tiny_clip_dir),
            size=16,
            crop="resize",
            steps=1,
        ),
        progress=False,
    )


def test_a_batch_larger_than_the_data_set_warns_before_training(tmp_path: Path) -> None:
    root = image_root(tmp_path / "data", count=3)
    with pytest.warns(
        UserWarning,
        match=r"--batch-size: 4 x 1 process\(es\) = 4 images a step, but domain A .*data.trainA. holds only 3",
    ):
        train(tiny(tmp_path / "run", data=str(root), batch_size=4, steps=1), progress=False)


# ---------------------------------------------------------------------------------------------
# One run per --out; metrics never truncated


def test_a_second_run_on_the_same_out_stops_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_folders: Path
) -> None:
    out = tmp_path / "run"
    with RunFolderLock(out):  # another live run holds the folder
        code, err = run_main(capsys, "--data", str(tiny_folders), "--out", str(out))
        with pytest.raises(RunFolderBusyError):
            train(tiny(out, data=str(tiny_folders)), progress=False)
    assert code == 2
    one_line(err, f"--out {out} is in use by another run (pid {os.getpid()})")
    assert not (out / "metrics.jsonl").exists()
    train(tiny(out, data=str(tiny_folders), steps=1), progress=False)  # free again once the holder is gone


def test_metrics_are_appended_never_truncated(tmp_path: Path, tiny_folders: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "from": "an earlier run without latest.pt"}\n')
    train(tiny(out, data=str(tiny_folders), steps=2), progress=False)
    train(tiny(out, data=str(tiny_folders), steps=3, resume=True), progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 7, "from": "an earlier run without latest.pt"}
    assert [line["step"] for line in lines[1:]] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Files that fail to decode during training


def test_decode_failures_are_skipped_counted_and_logged(tmp_path: Path) -> None:
    root = image_root(tmp_path / "data", count=4, corrupt=1)
    with pytest.warns(UserWarning, match=r"skipping cannot decode image file .*trainA.0\.png"):
        summary = train(tiny(tmp_path / "run", data=str(root), steps=3, max_unreadable_fraction=0.5), progress=False)
    assert summary["step"] == 3 and summary["unreadable_images"] == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["unreadable_images"] == 1


def test_too_many_decode_failures_stop_after_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = image_root(tmp_path / "data", count=4, corrupt=2)
    out = tmp_path / "run"
    with (
        pytest.warns(UserWarning),
        pytest.raises(TooManyUnreadableImagesError, match=r"stopped at step 1: 2 of 8 image files"),
    ):
        train(tiny(out, data=str(root), steps=5, max_unreadable_fraction=0.2), progress=False)
    assert load_checkpoint(out / "latest.pt")["step"] == 1
    code, err = run_main(
        capsys, "--data", str(root), "--out", str(out), "--resume", "--max-unreadable-fraction", "0.2", "--steps", "5"
    )
    assert code == 1
    one_line(err, "2 of 8 image files failed to decode", "--max-unreadable-fraction 0.2", "--resume")


# ---------------------------------------------------------------------------------------------
# Damaged or mismatched checkpoints on --resume


def test_a_damaged_latest_names_the_step_files_and_resume_from_takes_one(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_folders: Path
) -> None:
    out = tmp_path / "run"
    train(tiny(out, data=str(tiny_folders), steps=2, checkpoint_every=1, keep_checkpoints=2), progress=False)
    (out / "latest.pt").unlink()
    (out / "latest.pt").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError):
        train(tiny(out, data=str(tiny_folders), steps=3, resume=True), progress=False)
    code, err = run_main(capsys, "--data", str(tiny_folders), "--out", str(out), "--resume", "--steps", "3")
    assert code == 2
    one_line(
        err, f"checkpoint {out / 'latest.pt'} is damaged", "step_000001.pt", "step_000002.pt", "--resume-from FILE"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming from a step file changes no setting of the run
        summary = train(
            tiny(out, data=str(tiny_folders), steps=3, resume_from=str(out / "step_000002.pt")), progress=False
        )
    assert summary["step"] == 3 and load_checkpoint(out / "latest.pt")["step"] == 3


def test_resume_with_another_architecture_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_folders: Path
) -> None:
    out = tmp_path / "run"
    train(tiny(out, data=str(tiny_folders), steps=1), progress=False)
    code, err = run_main(capsys, "--data", str(tiny_folders), "--out", str(out), "--resume", "--g-width", "8")
    assert code == 2
    one_line(err, f"--resume: {out / 'latest.pt'} does not fit this run", "g_width")
    code, err = run_main(
        capsys, "--data", str(tiny_folders), "--out", str(out), "--resume-from", str(tmp_path / "nope.pt")
    )
    assert code == 2
    one_line(err, "--resume-from", "nope.pt")


def test_an_immediate_resume_after_kill_9_of_a_run_with_dataloader_workers(tmp_path: Path) -> None:
    """The run lock belongs to the trainer's process only: the DataLoader workers it forked, still alive for a
    moment after ``kill -9``, do not keep the folder locked, so ``--resume`` right away continues the run."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    for domain in ("a", "b"):
        (tmp_path / domain).mkdir()
        for index in range(8):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / domain / f"{index}.png")
    out = tmp_path / "run"
    flags = [*TINY, "--data-a", str(tmp_path / "a"), "--data-b", str(tmp_path / "b"), "--out", str(out)]
    flags[flags.index("--num-workers") + 1] = "2"
    script = [sys.executable, str(Path(__file__).resolve().parent.parent / "reference" / "train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [*script, *flags, "--steps", "100000", "--checkpoint-every", "1"], stdout=log, stderr=log, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not (out / "latest.pt").exists() or first.poll() is not None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the run saved no checkpoint in time"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    reached = int(load_checkpoint(out / "latest.pt")["step"])
    again = subprocess.run(
        [*script, *flags, "--steps", str(reached + 2), "--resume"], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "in use by another run" not in again.stderr
    assert int(load_checkpoint(out / "latest.pt")["step"]) == reached + 2


def test_a_lock_is_not_held_by_the_processes_its_holder_forked(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sys, time
            sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
            from reference.outputs import RunFolderLock
            RunFolderLock({str(tmp_path)!r}).acquire()
            child = os.fork()
            if child == 0:
                time.sleep(30)  # a DataLoader worker that outlives its parent for a while
                os._exit(0)
            print(child, flush=True)
            time.sleep(60)
        """)],
        stdout=__import__("subprocess").PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunFolderBusyError, match=f"pid {holder.pid}"):
            RunFolderLock(tmp_path).acquire()
        holder.kill()
        holder.wait()
        RunFolderLock(tmp_path).acquire().release()  # the forked child is still alive
        os.kill(child, 0)
    finally:
        for pid in (child,):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_a_resume_with_nothing_left_to_do_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    for domain in ("a", "b"):
        (tmp_path / domain).mkdir()
        for index in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / domain / f"{index}.png")
    argv = [*TINY, "--data-a", str(tmp_path / "a"), "--data-b", str(tmp_path / "b"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already at step 2 of 2" in out and "images/s" not in out


@pytest.mark.parametrize("encoder", ["tinyclp", "./no/such/folder", "a/b/c"])
def test_a_mistyped_encoder_folder_is_one_line_and_exit_2_before_any_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_folders: Path, encoder: str
) -> None:
    import time

    argv = [*TINY, "--data", str(tiny_folders), "--encoder-mode", "clip", "--encoder", encoder, "--out", str(tmp_path)]
    started = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reference/train.py: error: --encoder:") and repr(encoder) in err[0]
    assert time.perf_counter() - started < 10  # no network retries
    assert not (tmp_path / "latest.pt").exists()


def test_an_unloadable_encoder_folder_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_folders: Path
) -> None:
    folder = tmp_path / "not_clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    argv = [*TINY, "--data", str(tiny_folders), "--encoder-mode", "clip", "--encoder", str(folder)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--encoder: cannot load a CLIP checkpoint" in err[0]


MISTAKES = [  # (extra arguments, the start of the one line after "reference/train.py: error: ")
    (["--size", "0"], "--size: expected"),
    (["--batch-size", "0"], "--batch-size: expected"),
    (["--steps", "0"], "--steps: expected"),
    (["--lr", "-1"], "--lr: expected"),
    (["--lambda-travel", "-1"], "--lambda-travel: expected"),
    (["--lambda-identity", "nan"], "--lambda-identity: expected"),
    (["--lambda-nce", "1", "--nce-patches", "0"], "--nce-patches: expected"),
    (["--travel-views", "2", "--travel-view-transforms", "wobble=1"], "--travel-view-transforms: expected"),
    (["--g-ema", "1.5"], "--g-ema: expected"),
    (["--beta1", "2"], "--beta1: expected"),
    (["--micro-batch", "-1"], "--micro-batch: expected"),
    (["--data-b", "NONE"], "--data-a, --data-b: give both folders"),
    (["--data-a", "MISSING"], "--data-a: expected a folder of images"),
    (["--encoder-mode", "clip", "--encoder", "tinyclp"], "--encoder: 'tinyclp' is neither a folder"),
    (["--encoder-mode", "module", "--encoder", "no_such_file.py:make"], "--encoder:"),
    (["--resume-from", "MISSING"], "--resume-from: expected a checkpoint file"),
    (["--out", "FILE"], "--out: expected a folder"),
    # numeric bounds: learning rates, betas and decays, counts, weights
    (["--lr", "1e20"], "--lr: expected a number in (0, 1], got 1e+20"),
    (["--lr", "1e38"], "--lr: expected a number in (0, 1]"),
    (["--lr", "inf"], "--lr: expected a number in (0, 1], got inf"),
    (["--lr", "0"], "--lr: expected a number in (0, 1]"),
    (["--lr-d", "nan"], "--lr-d: expected None (twice lr) or a number in (0, 1], got nan"),
    (["--lr-d", "2"], "--lr-d: expected None (twice lr) or a number in (0, 1]"),
    (["--beta2", "1"], "--beta2: expected a number in [0, 1), got 1.0"),
    (["--beta1", "-0.1"], "--beta1: expected a number in [0, 1)"),
    (["--lambda-auto-momentum", "nan"], "--lambda-auto-momentum: expected a number in [0, 1)"),
    (["--g-ema", "-1"], "--g-ema: expected a number in [0, 1)"),
    (["--lambda-auto-scale", "inf"], "--lambda-auto-scale: expected a finite number > 0"),
    (["--lambda-travel", "inf"], "--lambda-travel: expected a finite number >= 0, 'auto' or 'balance'"),
    (["--lambda-auto-gap", "1"], "--lambda-auto-gap: expected a number in (0, 1)"),
    (["--lambda-auto-initial", "0"], "--lambda-auto-initial: expected a number in [1e-4, 1e4]"),
    (["--lambda-cycle", "-1"], "--lambda-cycle: expected a finite number >= 0"),
    (["--lambda-cycle-identity", "inf"], "--lambda-cycle-identity: expected a finite number >= 0"),
    (["--lambda-nce", "nan"], "--lambda-nce: expected a finite number >= 0"),
    (["--r1-gamma", "-0.5"], "--r1-gamma: expected a finite number >= 0"),
    (["--nce-temperature", "0"], "--nce-temperature: expected a finite number > 0"),
    (["--siamese-margin", "inf"], "--siamese-margin: expected a finite number > 0"),
    (["--max-unreadable-fraction", "nan"], "--max-unreadable-fraction: expected a number in [0, 1]"),
    (["--steps", "-5"], "--steps: expected an int >= 1"),
    (["--decay-steps", "-1"], "--decay-steps: expected an int >= 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints: expected an int >= 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every: expected an int >= 1"),
    (["--travel-queue", "-2"], "--travel-queue: expected an int >= 0"),
    (["--seed", "-1"], "--seed: expected an int >= 0"),
    (["--seed", str(2**64)], "--seed: expected an int in [0, 2**64)"),
]


@pytest.mark.parametrize(("extra", "start"), MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_every_mistake_is_one_line_naming_the_flag_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_folders: Path, extra: list[str], start: str
) -> None:
    (tmp_path / "FILE").write_text("not a folder")
    data = ["--data-a", str(tiny_folders / "trainA"), "--data-b", str(tiny_folders / "trainB")]
    if "NONE" in extra:
        data, extra = ["--data-a", str(tiny_folders / "trainA")], []
    extra = [str(tmp_path / a) if a in ("MISSING", "FILE") else a for a in extra]
    argv = [*TINY, *data, "--out", str(tmp_path / "run"), *extra]
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("reference/train.py: error: " + start), err[0]
    assert not (tmp_path / "run" / "run.lock").exists() or "--out" in start  # nothing left in a new --out


def test_an_uncached_hub_id_offline_is_one_line_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_folders: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from reference import runtime

    argv = [*TINY, "--data", str(tiny_folders), "--encoder-mode", "clip", "--encoder", "someone/not-cached"]
    started = time.perf_counter()
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2  # the test session sets HF_HUB_OFFLINE=1
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(runtime, "_hub_reachable", lambda timeout=3.0: False)  # never the real network in tests
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert "huggingface.co cannot be reached" in capsys.readouterr().err
    assert time.perf_counter() - started < 10


# ---------------------------------------------------------------------------------------------
# Baselines need no encoder


NO_ENCODER = "no encoder: --lambda-travel is 0 and no other term needs one, so travel consistency is not logged"


@pytest.mark.parametrize(
    "baseline",
    [["--lambda-cycle", "10"], ["--lambda-nce", "1", "--nce-patches", "4", "--nce-dim", "4", "--micro-batch", "1"]],
    ids=["cycle", "nce-micro-batched"],
)
def test_a_baseline_at_lambda_travel_0_loads_no_encoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_folders: Path,
    baseline: list[str],
) -> None:  # fmt: skip
    from reference import train as train_module

    def no_encoder_expected(config: TrainConfig) -> None:
        raise AssertionError(f"an encoder was built: {config.encoder_name}")

    monkeypatch.setattr(train_module, "build_encoder", no_encoder_expected)
    without_siamese = TINY[: TINY.index("--encoder-mode")] + TINY[TINY.index("--siamese-dim") + 2 :]
    out = tmp_path / "run"
    argv = [*without_siamese, "--data", str(tiny_folders), "--lambda-travel", "0", *baseline, "--out", str(out)]
    assert main(argv) == 0  # the default encoder (CLIP ViT-L/14) is not in this offline cache: not even looked up
    assert capsys.readouterr().out.count(NO_ENCODER) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not any("loss_travel" in r for r in records)
    assert all(np.isfinite(r["loss_g"]) for r in records)
    checkpoint = load_checkpoint(out / "latest.pt")
    assert checkpoint["config"]["encoder"] is None and "siamese" not in checkpoint


def test_a_named_encoder_at_lambda_travel_0_logs_travel_consistency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_folders: Path, tiny_clip_dir: Path
) -> None:
    without_siamese = TINY[: TINY.index("--encoder-mode")] + TINY[TINY.index("--siamese-dim") + 2 :]
    out = tmp_path / "run"
    argv = [*without_siamese, "--data", str(tiny_folders), "--lambda-travel", "0", "--encoder", str(tiny_clip_dir)]
    assert main([*argv, "--crop", "resize", "--out", str(out)]) == 0
    assert NO_ENCODER not in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_travel"] > 0 for r in records)


def test_the_digit_studys_gan_only_row_builds_its_embedder() -> None:
    """The digit study logs travel consistency for its GAN-only row (lambda 0): it names its
    embedder, so the trainer still builds it."""
    from reference.config import uses_encoder
    from reference.presets import preset_config
    from reference.studies.digits import CORE, QUICK, _trainer_run
    from reference.train import build_parser

    gan = next(method for method in CORE if method.name == "gan")
    parser = build_parser()
    parser.set_defaults(**preset_config("digits-demo"))
    args = vars(parser.parse_args(_trainer_run(gan, QUICK, Path("data"), Path("out"), seed=0).argv))
    for key in ("demo", "quick", "preset"):
        args.pop(key)
    config = TrainConfig(**args)
    assert config.lambda_travel == 0.0 and config.encoder is not None and uses_encoder(config)
    assert not uses_encoder(TrainConfig(lambda_travel=0.0, lambda_cycle=10.0))


@pytest.mark.parametrize(
    ("script", "flag", "value"),
    [("translate", "--batch-size", "0"), ("translate", "--size", "-3"), ("translate", "--batch-size", "two"),
     ("evaluate", "--size", "0"), ("evaluate", "--batch-size", "-1")],
)  # fmt: skip
def test_translate_and_evaluate_bound_their_numeric_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], script: str, flag: str, value: str
) -> None:
    from reference import evaluate, translate

    if script == "translate":
        argv = ["--checkpoint", "c.pt", "--input", "in", "--output", "out"]
        entry = translate.main
    else:
        argv = ["--translations", "t", "--target", "b", "--out", str(tmp_path / "r.json")]
        entry = evaluate.main
    with pytest.raises(SystemExit) as exit_info:
        entry([*argv, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"reference/{script}.py: error: argument {flag}: expected an integer >= 1, got {value!r}"
