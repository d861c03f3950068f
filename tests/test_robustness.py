"""Nothing lost, nothing silent: damaged checkpoints, outputs that exist or cannot be written,
folders owned by one run, and the library's input checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reference import evaluate
from reference import translate as translate_tool
from reference.checkpoint import (
    DamagedCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from reference.models import ResnetGenerator
from reference.outputs import (
    RunFolderBusyError,
    RunFolderLock,
    check_output_file,
    check_writable_folder,
)
from travel_loss import travel_loss

GENERATOR_KWARGS = {"in_channels": 3, "out_channels": 3, "width": 4, "n_blocks": 1}


def _one_error_line(text: str, *fragments: str) -> str:
    """The stderr of a tool that failed on a user mistake: exactly one line, no traceback, naming ``fragments``."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()  # a new file: the step_*.pt hard links keep the old data
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    else:
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "weights": torch.full((4,), float(step))}, folder, step, keep=2)
    return folder


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "random bytes"])
def test_a_damaged_checkpoint_names_the_file_and_the_step_files_to_resume_from(run_folder: Path, how: str) -> None:
    latest = run_folder / "latest.pt"
    _damage(latest, how)
    with pytest.raises(DamagedCheckpointError) as error:
        load_checkpoint(latest, advice="resume from one with --resume-from FILE")
    message = str(error.value)
    assert f"checkpoint {latest} is damaged" in message
    assert "step_000002.pt" in message and "step_000003.pt" in message and "--resume-from FILE" in message
    assert "weights_only=False" not in message and "\n" not in message
    assert load_checkpoint(run_folder / "step_000003.pt")["step"] == 3  # what it offers does load


def test_damaged_step_files_are_not_offered(run_folder: Path) -> None:
    _damage(run_folder / "step_000003.pt", "truncated")
    _damage(run_folder / "latest.pt", "zero bytes")
    with pytest.raises(DamagedCheckpointError) as error:
        load_checkpoint(run_folder / "latest.pt")
    assert "step_000002.pt" in str(error.value) and "step_000003.pt" not in str(error.value)
    for path in run_folder.glob("step_*.pt"):
        _damage(path, "random bytes")
    with pytest.raises(DamagedCheckpointError, match="no intact step_"):
        load_checkpoint(run_folder / "latest.pt")


def test_a_file_that_is_not_a_checkpoint_dict_is_reported_as_such(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "latest.pt")
    with pytest.raises(DamagedCheckpointError, match="holds a Tensor, not a checkpoint dict"):
        load_checkpoint(tmp_path / "latest.pt")


# ---------------------------------------------------------------------------------------------
# translate.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "ckpt" / "latest.pt"
    state = {"generator": ResnetGenerator(**GENERATOR_KWARGS).state_dict(), "generator_kwargs": GENERATOR_KWARGS}
    save_checkpoint(state, path.parent, 5, keep=1)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _translate(capsys: pytest.CaptureFixture, *arguments: str) -> tuple[int, str]:
    try:
        code = translate_tool.main([*arguments, "--no-progress"])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "random bytes"])
def test_translate_with_a_damaged_checkpoint_says_so_in_one_line(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture, how: str
) -> None:
    _damage(checkpoint, how)
    code, err = _translate(
        capsys, "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(tmp_path / "o")
    )
    assert code == 2
    _one_error_line(err, str(checkpoint), "is damaged", "step_000005.pt")


def test_translate_refuses_to_overwrite_unless_told(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "b.png").write_bytes(b"the user's own file")
    arguments = ["--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(output)]
    code, err = _translate(capsys, *arguments)
    assert code == 2
    _one_error_line(err, str(output), "b.png", "--overwrite")
    assert (output / "b.png").read_bytes() == b"the user's own file" and not (output / "a.png").exists()
    code, err = _translate(capsys, *arguments, "--overwrite")
    assert code == 0 and Image.open(output / "b.png").size == (8, 8)


def test_translate_reports_a_checkpoint_of_another_architecture_in_one_line(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = load_checkpoint(checkpoint)
    state["generator_kwargs"] = {**GENERATOR_KWARGS, "width": 8}
    torch.save(state, checkpoint)
    code, err = _translate(
        capsys, "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(tmp_path / "o")
    )
    assert code == 2
    _one_error_line(err, str(checkpoint), "do not fit")


def test_translate_output_that_is_a_file(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("x")
    code, err = _translate(
        capsys, "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(tmp_path / "file")
    )
    assert code == 2
    _one_error_line(err, str(tmp_path / "file"))


# ---------------------------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("metrics were computed before the arguments were checked")

    monkeypatch.setattr(evaluate, "evaluate_folders", fail)


def test_evaluate_out_checked_before_computing(
    tmp_path: Path, inputs: Path, capsys: pytest.CaptureFixture, no_computing: None
) -> None:
    base = ["--translations", str(inputs), "--target", str(inputs)]
    (tmp_path / "a folder").mkdir()
    assert evaluate.main([*base, "--out", str(tmp_path / "a folder")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "found a folder", str(tmp_path / "a folder"))
    (tmp_path / "old.json").write_text("{}")
    assert evaluate.main([*base, "--out", str(tmp_path / "old.json")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "already exists", "--overwrite")
    assert (tmp_path / "old.json").read_text() == "{}"
    (tmp_path / "plain").write_text("x")
    assert evaluate.main([*base, "--out", str(tmp_path / "plain" / "m.json")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "found a file", str(tmp_path / "plain"))


def test_evaluate_missing_folders_name_their_flag(
    tmp_path: Path, inputs: Path, capsys: pytest.CaptureFixture, no_computing: None
) -> None:
    out = ["--out", str(tmp_path / "m.json")]
    assert evaluate.main(["--translations", str(tmp_path / "nope"), "--target", str(inputs), *out]) == 2
    _one_error_line(capsys.readouterr().err, "--translations", "found nothing", "nope")
    assert (
        evaluate.main(["--translations", str(inputs), "--target", str(inputs), "--sources", str(tmp_path / "x"), *out])
        == 2
    )
    _one_error_line(capsys.readouterr().err, "--sources")


# ---------------------------------------------------------------------------------------------
# Output checks and the run-folder lock
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:  # root ignores permissions: use a folder the kernel refuses to anyone
        (folder / "probe").unlink()
        sysfs = Path("/sys/kernel")
        try:
            (sysfs / "probe").touch()
        except OSError:
            yield sysfs
        else:
            pytest.skip("no folder that refuses writes is available here")
    finally:
        folder.chmod(0o755)


def test_unwritable_and_file_outputs_are_named(read_only_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(
        PermissionError, match=f"--out: expected a writable folder, found {read_only_folder} not writable"
    ):
        check_writable_folder(read_only_folder, "--out")
    with pytest.raises(PermissionError, match="would be created"):
        check_writable_folder(read_only_folder / "new" / "run", "--out")
    with pytest.raises(PermissionError, match="--out"):
        check_output_file(read_only_folder / "metrics.json", "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out: expected a folder, found a file"):
        check_writable_folder(tmp_path / "file", "--out")
    check_writable_folder(tmp_path / "new" / "deeper", "--out")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_second_lock_on_the_same_folder_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    with RunFolderLock(tmp_path / "run"):
        with pytest.raises(
            RunFolderBusyError, match=rf"--out {tmp_path / 'run'} is in use by another run \(pid {os.getpid()}\)"
        ):
            RunFolderLock(tmp_path / "run").acquire()
    with RunFolderLock(tmp_path / "run"):  # released on exit
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
            from reference.outputs import RunFolderLock
            RunFolderLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusyError, match=f"pid {holder.pid}"):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunFolderLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------------------------------
# The library's input checks
# ---------------------------------------------------------------------------------------------


def test_zero_dimensional_embeddings_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"emb_src: expected embeddings of dimension D >= 1, got shape \(3, 0\)"):
        travel_loss(torch.zeros(3, 0), torch.zeros(3, 0))


def test_a_list_of_lists_says_what_came() -> None:
    rows = [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(TypeError, match="got a list whose item 0 is a list; convert nested lists"):
        travel_loss(rows, rows)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("preprocessor_config.json", b"{not json", "preprocessor_config.json is damaged: not a JSON"),
        ("preprocessor_config.json", b"[1, 2]", "preprocessor_config.json is damaged: expected a JSON object"),
        ("model.safetensors", b"garbage" * 10, "model.safetensors is damaged and cannot be loaded"),
    ],
)
def test_a_damaged_encoder_file_is_named(tmp_path, tiny_clip_dir, file, content, message):
    import shutil

    from travel_loss import FrozenCLIPEncoder, FrozenEncoder

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / file).write_bytes(content)
    for encoder_class in (FrozenCLIPEncoder, FrozenEncoder):
        with pytest.raises(ValueError, match=message) as caught:
            encoder_class(str(folder))
        assert str(folder / file) in str(caught.value)
