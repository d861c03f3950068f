"""The reference trainer under DDP on 2 CPU processes (gloo): global-batch travel loss, rank-0 I/O, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reference.checkpoint import load_checkpoint
from reference.train import TrainConfig

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
PER_RANK_BATCH = 2


def ddp_config(out: Path, encoder: Path, data: Path, **overrides) -> TrainConfig:
    options = dict(
        data=str(data), size=32, batch_size=PER_RANK_BATCH, steps=3, encoder=str(encoder),
        encoder_mode="clip", g_width=8, g_blocks=1, d_width=8, d_layers=2, lambda_travel=5.0, out=str(out),
        log_every=1, sample_every=1000, checkpoint_every=2, num_workers=0,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


def record_first_generator_gradients(train_module, store: list) -> None:
    """Wrap the trainer's backward-and-update so that the first call (step 1's generator update)
    keeps a copy of the gradients it applied (after DDP's averaging)."""
    from reference import steps as steps_module

    original = steps_module._backward_and_step

    def recording(loss, optimizers, inputs, scaler):
        original(loss, optimizers, inputs, scaler)
        if not store:
            store.append([p.grad.detach().clone() for p in inputs])

    steps_module._backward_and_step = recording


def _worker(rank: int, init_file: str, tmp: str, encoder: str, data: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        from reference import steps as steps_module
        from reference import train as train_module

        saves = []
        original_save = train_module.save_checkpoint
        train_module.save_checkpoint = lambda *a, **k: saves.append(1) or original_save(*a, **k)
        tmp_path = Path(tmp)
        config = ddp_config(tmp_path / "ddp", Path(encoder), Path(data))

        original_step = steps_module._backward_and_step
        global_gradients: list = []
        record_first_generator_gradients(train_module, global_gradients)
        train_module.train(config, progress=False)
        train_module.train(dataclasses.replace(config, out=str(tmp_path / "halves"), steps=2), progress=False)
        train_module.train(dataclasses.replace(config, out=str(tmp_path / "halves"), resume=True), progress=False)

        # The same first step in micro-batches of one image (gradient caching, no_sync until the last).
        micro_gradients: list = []
        original_optimizer_step = steps_module._optimizer_step

        def recording_optimizer_step(optimizers, scaler):  # one call per run: steps=1, only G's update uses it
            parameters = [p for o in optimizers for group in o.param_groups for p in group["params"]]
            micro_gradients.append([p.grad.detach().clone() for p in parameters])
            original_optimizer_step(optimizers, scaler)

        steps_module._optimizer_step = recording_optimizer_step
        micro = dataclasses.replace(config, out=str(tmp_path / f"micro{rank}"), steps=1, micro_batch=1)
        train_module.train(micro, progress=False)
        # ... and with the adaptive lambda, against the whole-batch step with it
        train_module.train(dataclasses.replace(micro, out=str(tmp_path / f"mauto{rank}"), lambda_travel="balance"),
                           progress=False)  # fmt: skip
        steps_module._optimizer_step = original_optimizer_step
        auto_gradients: list = []
        steps_module._backward_and_step = original_step
        record_first_generator_gradients(train_module, auto_gradients)
        whole_auto = dataclasses.replace(
            micro, out=str(tmp_path / f"auto{rank}"), lambda_travel="balance", micro_batch=0
        )
        train_module.train(whole_auto, progress=False)

        # The same run with a per-rank travel loss (no gather): pairs never span ranks.
        local_gradients: list = []
        steps_module._backward_and_step = original_step
        record_first_generator_gradients(train_module, local_gradients)
        steps_module.all_gather_with_grad = lambda x: x
        train_module.train(dataclasses.replace(config, out=str(tmp_path / f"local{rank}"), steps=1), progress=False)

        torch.save(
            {
                "saves": len(saves),
                "global": global_gradients[0],
                "local": local_gradients[0],
                "micro": micro_gradients[0],
                "micro_auto": micro_gradients[1],
                "auto": auto_gradients[0],
            },
            tmp_path / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_training_uses_the_global_batch_and_resumes_exactly(tmp_path, tiny_clip_dir, tiny_folders):
    arguments = (str(tmp_path / "init"), str(tmp_path), str(tiny_clip_dir), str(tiny_folders))
    mp.spawn(_worker, args=arguments, nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    # Rank 0 alone writes checkpoints, metrics and samples.
    assert ranks[0]["saves"] > 0 and ranks[1]["saves"] == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert not (tmp_path / "local1").exists()

    # One process on the concatenated batch (2 x 2 images) gets the gradient DDP applied.
    from reference import steps as steps_module
    from reference import train as train_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single_gradients: list = []
    original = steps_module._backward_and_step
    try:
        record_first_generator_gradients(train_module, single_gradients)
        single = ddp_config(
            tmp_path / "single", tiny_clip_dir, tiny_folders, batch_size=WORLD_SIZE * PER_RANK_BATCH, steps=1
        )
        train_module.train(single, progress=False)
    finally:
        steps_module._backward_and_step = original
        torch.set_num_threads(threads)

    def relative_error(gradients: list[torch.Tensor]) -> float:
        # float32 kernels sum a batch of 4 and two batches of 2 in different orders: compare norms
        difference = sum(float((g - e).double().square().sum()) for g, e in zip(gradients, single_gradients[0]))
        return (difference / sum(float(e.double().square().sum()) for e in single_gradients[0])) ** 0.5

    for rank in ranks:
        # float32 round-off alone (1 vs 2 threads) moves this gradient by ~1e-5 relative
        assert relative_error(rank["global"]) < 1e-4
        assert relative_error(rank["micro"]) < 1e-4  # --micro-batch 1 under DDP: the global-batch gradient
        auto_error = sum(float((g - e).double().square().sum()) for g, e in zip(rank["micro_auto"], rank["auto"]))
        auto_norm = sum(float(e.double().square().sum()) for e in rank["auto"])
        assert (auto_error / auto_norm) ** 0.5 < 1e-4  # adaptive lambda: the same update in micro-batches
        assert relative_error(rank["auto"]) > 1e-2  # lambda 'auto' is not 5: the comparison can fail
        # A per-rank travel loss would give another gradient: the test can tell them apart.
        assert relative_error(rank["local"]) > 1e-2

    # Resume under DDP continues bit for bit, with every rank's own random state.
    full = load_checkpoint(tmp_path / "ddp" / "latest.pt")
    halves = load_checkpoint(tmp_path / "halves" / "latest.pt")
    assert full["step"] == halves["step"] == 3 and full["data"]["world_size"] == WORLD_SIZE
    for key in ("generator", "discriminator"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, halves[key][name]), f"{key}.{name}"
    for a, b in zip(full["rng"], halves["rng"]):
        assert torch.equal(a["torch"], b["torch"])
    assert not torch.equal(full["rng"][0]["torch"], full["rng"][1]["torch"])  # per-rank seeds


def test_torchrun_runs_the_script_on_two_cpu_processes(tmp_path, tiny_folders):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(REPO / "reference" / "train.py"), "--data", str(tiny_folders), "--num-workers", "0", "--size", "16",
        "--d-layers", "1", "--batch-size", "2", "--g-width", "4", "--g-blocks", "0", "--d-width", "4",
        "--encoder-mode", "siamese", "--siamese-width", "4", "--siamese-dim", "4", "--steps", "2", "--log-every", "1",
        "--lambda-travel", "1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = load_checkpoint(out / "latest.pt")
    assert checkpoint["step"] == 2 and checkpoint["data"] == {"position": 2 * 2 * WORLD_SIZE, "world_size": WORLD_SIZE}
    assert len(checkpoint["rng"]) == WORLD_SIZE and checkpoint["siamese"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert result.stdout.count("done: 2 steps") == 1  # one rank reports


def test_torchrun_with_a_users_module_encoder(tmp_path, tiny_folders):
    """--encoder-mode module under DDP: every rank builds and checks the embedder; the run finishes."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(REPO / "reference" / "train.py"), "--data", str(tiny_folders), "--num-workers", "0", "--size", "16",
        "--d-layers", "1", "--batch-size", "2", "--g-width", "4", "--g-blocks", "0", "--d-width", "4",
        "--encoder-mode", "module", "--encoder", f"{REPO / 'reference' / 'studies' / 'digit_data.py'}:random_embedder",
        "--lambda-travel", "3",
        "--steps", "2", "--log-every", "1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss_travel"] > 0 for r in records)
    assert load_checkpoint(out / "latest.pt")["data"]["world_size"] == WORLD_SIZE
