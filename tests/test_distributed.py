"""The global-batch travel loss over 2 CPU processes (gloo) equals one process on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from travel_loss import travel_loss
from travel_loss.distributed import all_gather_with_grad

WORLD_SIZE = 2
ROWS_PER_RANK = 4
INPUT_DIM, EMBED_DIM = 6, 5


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    n = WORLD_SIZE * ROWS_PER_RANK
    return torch.randn(n, INPUT_DIM, generator=generator), torch.randn(n, EMBED_DIM, generator=generator)


def toy_generator() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(INPUT_DIM, EMBED_DIM).double()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs, emb_src = global_batch()
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)

        # 1. The loss and the gradient sent to this rank's embeddings.
        local_gen = (inputs[rows, :EMBED_DIM] * 3).double().requires_grad_()
        loss = travel_loss(all_gather_with_grad(emb_src[rows].double()), all_gather_with_grad(local_gen))
        loss.backward()

        # 2. A DDP-wrapped "generator": its parameter gradients after DDP's averaging.
        model = torch.nn.parallel.DistributedDataParallel(toy_generator())
        emb_gen = all_gather_with_grad(model(inputs[rows].double()))
        ddp_loss = travel_loss(all_gather_with_grad(emb_src[rows].double()), emb_gen)
        ddp_loss.backward()
        torch.save(
            {
                "loss": loss.detach(),
                "embedding_grad": local_gen.grad,
                "ddp_loss": ddp_loss.detach(),
                "param_grads": [p.grad for p in model.parameters()],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # DDP's reducer holds the process group: release it, and let both ranks finish their
        # collectives, before the group is destroyed (otherwise gloo can abort at exit).
        del model, emb_gen, ddp_loss
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_global_batch_loss_and_gradients_match_a_single_process(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    inputs, emb_src = global_batch()
    gen = (inputs[:, :EMBED_DIM] * 3).double().requires_grad_()
    single_loss = travel_loss(emb_src.double(), gen)
    single_loss.backward()
    model = toy_generator()
    single_ddp_loss = travel_loss(emb_src.double(), model(inputs.double()))
    single_ddp_loss.backward()

    for rank, result in enumerate(results):
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        # Pairs span ranks: the loss is the whole batch's, not the mean of per-rank losses.
        torch.testing.assert_close(result["loss"], single_loss.detach())
        torch.testing.assert_close(result["ddp_loss"], single_ddp_loss.detach())
        # Each rank receives world_size x its rows' gradient; DDP's averaging divides it out.
        torch.testing.assert_close(result["embedding_grad"], WORLD_SIZE * gen.grad[rows])
        for got, expected in zip(result["param_grads"], model.parameters()):
            torch.testing.assert_close(got, expected.grad)
    halves = zip(emb_src.double().split(ROWS_PER_RANK), gen.detach().split(ROWS_PER_RANK))
    per_rank_mean = sum(float(travel_loss(s, g).detach()) for s, g in halves) / WORLD_SIZE
    assert abs(per_rank_mean - float(single_loss.detach())) > 1e-3  # the test can tell the two apart


def test_gather_is_the_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        all_gather_with_grad([1.0])
