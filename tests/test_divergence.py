"""A run that diverges stops and keeps what it had: NaN or infinite losses, weights or optimizer
moments stop the run at the next check (a logging step or a checkpoint), with one line naming the
step window and the terms, exit status 1, no checkpoint written, the last finite checkpoint and
its step files untouched, and ``--resume`` continuing from it bit for bit.

Faults are injected in process, through the ``main`` that the command line and the studies'
runner call: :func:`poison_adversarial_loss` monkeypatches ``reference.steps`` so that G's
adversarial loss is NaN at one chosen step (what a diverging run's loss looks like); the NaN then
flows into the gradients and the weights as it would in a real divergence.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_fault_injection import assert_equal

from reference.checkpoint import finite_parts, load_checkpoint, step_checkpoints
from reference.config import TrainConfig
from reference.logs import Divergence, NonFiniteWatch, TrainingDivergedError, divergence_message
from reference.runtime import Runtime
from reference.train import main

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
ARGUMENTS = [  # checks: logging at steps 3, 6, 9, 10; checkpoints (and their checks) at 2, 4, 6, 8, 10
    "--size", "16", "--batch-size", "2", "--g-width", "4", "--g-blocks", "0", "--d-width", "4", "--d-layers", "1",
    "--encoder-mode", "siamese", "--siamese-width", "4", "--siamese-dim", "4", "--lambda-travel", "1",
    "--augment", "color,translation", "--log-every", "3", "--sample-every", "1000", "--num-workers", "0",
    "--checkpoint-every", "2", "--keep-checkpoints", "2", "--steps", str(STEPS),
]  # fmt: skip
COMPARED = ("generator", "discriminator", "siamese", "optimizers", "schedulers", "grad_scalers", "rng", "step", "data")


def poison_adversarial_loss(monkeypatch: pytest.MonkeyPatch, step: int, rank: int | None = None) -> None:
    """G's adversarial loss is NaN at training step ``step`` (on ``rank`` only, when given) of every
    run in this process. The step is read from G's learning-rate schedule, which counts the steps
    taken (and is restored by a resume)."""
    from reference import steps
    from reference import train as train_module

    original_step, original_loss = train_module.TrainingRun.step, steps.generator_adversarial_loss
    poisoned = {"now": False}

    def step_with_fault(run: Any, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        this_step = run.schedulers["generator"].last_epoch + 1
        poisoned["now"] = this_step == step and (rank is None or run.runtime.rank == rank)
        try:
            return original_step(run, real_a, real_b)
        finally:
            poisoned["now"] = False

    def adversarial(logits: torch.Tensor, kind: str) -> torch.Tensor:
        loss = original_loss(logits, kind)
        return loss * float("nan") if poisoned["now"] else loss

    monkeypatch.setattr(train_module.TrainingRun, "step", step_with_fault)
    monkeypatch.setattr(steps, "generator_adversarial_loss", adversarial)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "step/s" not in line]
    return code, err


def tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


def assert_all_finite(path: Path) -> None:
    floats = [t for t in tensors(load_checkpoint(path)) if t.is_floating_point()]
    assert floats and all(bool(torch.isfinite(t).all()) for t in floats), path


@pytest.fixture(scope="module")
def uninterrupted(tiny_folders: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The final checkpoints of runs nobody disturbed: whole batch and micro-batched."""
    torch.set_num_threads(1)
    finals = {}
    for name, extra in (("whole", []), ("micro", ["--micro-batch", "1"])):
        out = tmp_path_factory.mktemp("uninterrupted") / name
        assert main([*ARGUMENTS, *extra, "--data", str(tiny_folders), "--out", str(out)]) == 0
        finals[name] = load_checkpoint(out / "latest.pt")
    return finals


@pytest.mark.parametrize("batching", ["whole", "micro"])
def test_a_nan_loss_stops_the_run_keeps_the_last_checkpoint_and_resume_is_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_folders: Path,
    uninterrupted: dict[str, dict[str, Any]], batching: str,
) -> None:  # fmt: skip
    out = tmp_path / "run"
    argv = [*ARGUMENTS, *(["--micro-batch", "1"] if batching == "micro" else []), "--data", str(tiny_folders)]
    argv += ["--out", str(out)]
    with monkeypatch.context() as patch:
        poison_adversarial_loss(patch, step=5)  # after the checkpoint at 4; found at the logging step 6
        code, err = run_main(capsys, *argv)
    assert code == 1
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("reference/train.py: error: training diverged between step 4 and step 6: "), line
    assert "the adversarial" in line and "loss_adv" in line and "became NaN or infinite" in line
    assert f"{out / 'latest.pt'} still holds step 4 (--resume restarts from it)" in line
    assert "try a lower --lr (now 0.0002)" in line and "bf16" not in line  # fp16 advice only for fp16 runs
    # nothing written after the checkpoint at step 4: the last finite one and its history stay
    assert load_checkpoint(out / "latest.pt")["step"] == 4
    assert [p.name for p in step_checkpoints(out)] == ["step_000002.pt", "step_000004.pt"]
    for path in (out / "latest.pt", *step_checkpoints(out)):
        assert_all_finite(path)
    assert not list(out.glob(".*.tmp-*"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3]

    assert run_main(capsys, *argv, "--resume")[0] == 0  # no fault now: the run continues from step 4
    final = load_checkpoint(out / "latest.pt")
    for key in COMPARED:
        assert_equal(final[key], uninterrupted[batching][key], key)


def test_divergence_before_the_first_checkpoint_leaves_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_folders: Path
) -> None:
    out = tmp_path / "run"
    poison_adversarial_loss(monkeypatch, step=1)
    code, err = run_main(capsys, *ARGUMENTS, "--data", str(tiny_folders), "--out", str(out))
    assert code == 1 and len(err) == 1, err
    assert "training diverged between step 0 and step 2: " in err[0]  # found at the checkpoint check of step 2
    assert "no checkpoint was written (there is none to resume: a new run starts from step 0)" in err[0]
    assert not (out / "latest.pt").exists() and not step_checkpoints(out)


def test_non_finite_optimizer_moments_with_finite_losses_are_caught_before_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_folders: Path
) -> None:
    from reference import train as train_module

    original_step = train_module.TrainingRun.step

    def step_then_break_the_moments(run: Any, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = original_step(run, real_a, real_b)
        if run.schedulers["generator"].last_epoch == 4:  # after D's update at step 4, before its checkpoint
            moments = next(iter(run.optimizers["discriminator"].state.values()))
            moments["exp_avg_sq"].view(-1)[0] = float("inf")
        return terms

    monkeypatch.setattr(train_module.TrainingRun, "step", step_then_break_the_moments)
    out = tmp_path / "run"
    code, err = run_main(capsys, *ARGUMENTS, "--data", str(tiny_folders), "--out", str(out))
    assert code == 1 and len(err) == 1, err
    assert "between step 2 and step 4: NaN or infinite numbers in the discriminator optimizer;" in err[0]
    assert "became NaN" not in err[0]  # the losses of steps 3 and 4 were finite
    assert load_checkpoint(out / "latest.pt")["step"] == 2
    assert [p.name for p in step_checkpoints(out)] == ["step_000002.pt"]


def test_finite_parts_names_the_module_or_optimizer_that_holds_a_non_finite_number() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert finite_parts({"generator": model}, {"generator": optimizer}) == {
        "generator": True,
        "generator optimizer": True,
    }
    optimizer.state[model.bias]["exp_avg"][1] = float("nan")
    assert finite_parts({"generator": model}, {"generator": optimizer})["generator optimizer"] is False
    with torch.no_grad():
        model.weight[0, 0] = float("-inf")
    assert finite_parts({"generator": model}, {})["generator"] is False


def test_the_watch_flags_each_term_and_forgets_after_a_check() -> None:
    watch = NonFiniteWatch(Runtime(torch.device("cpu")))
    for value in (1.0, float("inf"), 2.0):
        watch.add({"loss_d": torch.tensor(0.5), "loss_adv": torch.tensor(value), "lambda": 3.0})
    watch.add({"loss_d": torch.tensor(0.5), "loss_adv": torch.tensor(1.0), "lambda": float("nan")})
    assert watch.check() == ["lambda", "loss_adv"]
    watch.add({"loss_d": torch.tensor(0.5), "loss_adv": torch.tensor(1.0), "lambda": 3.0})
    assert watch.check() == []
    assert watch.check({"generator": True, "discriminator optimizer": False}) == ["discriminator optimizer"]


def test_steps_an_fp16_gradient_scaler_skipped_are_not_divergence() -> None:
    """The scaler halves its scale and skips the update when it finds inf or NaN gradients (an
    overflowing fp16 step): that step's non-finite loss is not counted; any other step's is."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    watch = NonFiniteWatch(Runtime(torch.device("cpu")), [scaler])

    def step(factor: float) -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.ones(1, 2)).sum() * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    weights = model.weight.detach().clone()
    watch.add({"loss_g": step(float("inf"))})  # skipped: the weights stay, the scale halves
    assert torch.equal(model.weight, weights) and scaler.get_scale() == 2.0**9
    assert watch.check() == []
    finite = step(1.0)  # an update, scale unchanged
    watch.add({"loss_g": finite * float("nan")})
    assert watch.check() == ["loss_g"]


def test_the_message_names_each_term_and_the_weights_to_lower(tmp_path: Path) -> None:
    config = TrainConfig(data="d", out=str(tmp_path), lambda_cycle=10.0, amp="fp16", lr=1e-3)
    keys = ("loss_adv", "loss_cycle", "loss_d", "loss_g", "loss_nce")
    line = divergence_message(config, Divergence(30, 40, keys), (tmp_path / "latest.pt", 30))
    assert line.startswith(
        "training diverged between step 30 and step 40: the adversarial, cycle, NCE and discriminator losses "
        "became NaN or infinite (loss_adv, loss_cycle, loss_d, loss_g, loss_nce); no checkpoint was written, "
    )
    assert "--resume restarts from it" in line and "\n" not in line
    assert line.endswith(
        "try a lower --lr (now 0.001) or --lr-d (now 0.002) or --lambda-cycle (now 10), or --amp bf16 rather than fp16"
    )
    only_total = divergence_message(config, Divergence(0, 5, ("loss_g",)), None)
    assert "the generator total loss became NaN" in only_total
    resumed_from = divergence_message(config, Divergence(0, 5, ("loss_travel",)), (tmp_path / "step_000020.pt", 20))
    assert f"--resume-from {tmp_path / 'step_000020.pt'} restarts from it" in resumed_from
    assert "the travel loss became" in resumed_from and "--lambda-travel (now auto)" in resumed_from
    state_only = divergence_message(config, Divergence(2, 4, (), ("discriminator optimizer",)), None)
    assert ": NaN or infinite numbers in the discriminator optimizer; no checkpoint" in state_only
    assert "became" not in state_only and "or the weight of a term (--lambda-*)" in state_only
    unnamed = divergence_message(config, Divergence(2, 4, ("loss_g", "loss_new", "loss_adv", "r1_a")), None)
    assert "the adversarial, discriminator and loss_new losses became NaN or infinite (loss_g, loss_new" in unnamed


# ---------------------------------------------------------------------------------------------
# DDP: a NaN on one rank stops every rank at the same check; none hangs


WORLD_SIZE = 2


def _ddp_worker(rank: int, init_file: str, out: str, data: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    outcome: dict[str, Any] = {"rank": rank, "error": None}
    try:
        from reference import train as train_module

        with pytest.MonkeyPatch.context() as patch:
            poison_adversarial_loss(patch, step=3, rank=1)  # rank 1 only; rank 0's own losses stay finite
            config = TrainConfig(
                data=data, size=16, batch_size=2, steps=6, g_width=4, g_blocks=0, d_width=4, d_layers=1,
                encoder_mode="siamese", siamese_width=4, siamese_dim=4, lambda_travel=1.0, log_every=1,
                sample_every=1000, checkpoint_every=2, keep_checkpoints=2, num_workers=0, out=out,
            )  # fmt: skip
            try:
                train_module.train(config, progress=False)
            except TrainingDivergedError as error:
                outcome["error"], outcome["error_rank"] = str(error), error.rank
    finally:
        torch.save(outcome, Path(out).parent / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_under_ddp_a_nan_on_one_rank_stops_every_rank(tmp_path: Path, tiny_folders: Path) -> None:
    out = tmp_path / "run"
    arguments = (str(tmp_path / "init"), str(out), str(tiny_folders))
    context = mp.start_processes(_ddp_worker, args=arguments, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "a rank hung"
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, 9)
    outcomes = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] is not None and outcome["error_rank"] == rank, outcome
        # found at the logging step 3 on both ranks (the flags are combined across ranks)
        assert outcome["error"].startswith("training diverged between step 2 and step 3: the adversarial"), outcome
    assert load_checkpoint(out / "latest.pt")["step"] == 2
    assert [p.name for p in step_checkpoints(out)] == ["step_000002.pt"]
    assert_all_finite(out / "latest.pt")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_every_run_checks_before_it_saves(tmp_path: Path, tiny_folders: Path) -> None:
    """An uninterrupted run's checks pass: the same checkpoints as without them (no false alarm on
    a healthy run), every one finite."""
    config = TrainConfig(
        data=str(tiny_folders), size=16, batch_size=2, steps=4, g_width=4, g_blocks=0, d_width=4, d_layers=1,
        encoder_mode="siamese", siamese_width=4, siamese_dim=4, log_every=3, sample_every=1000, checkpoint_every=1,
        keep_checkpoints=4, num_workers=0, out=str(tmp_path / "run"),
    )  # fmt: skip
    from reference.train import train

    assert train(config, progress=False)["step"] == 4
    kept = step_checkpoints(tmp_path / "run")
    assert [load_checkpoint(p)["step"] for p in kept] == [1, 2, 3, 4]
    for path in kept:
        assert_all_finite(path)
    assert math.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss_g"])
