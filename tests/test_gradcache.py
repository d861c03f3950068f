"""Gradient caching: chunked back-propagation of the travel loss equals the whole-batch gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from travel_loss import siamese_margin_loss, travel_loss
from travel_loss.gradcache import backward_chunk, embed_in_chunks, travel_loss_and_embedding_grads

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny_networks(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A generator, a discriminator and an embedder without batch statistics or randomness."""
    torch.manual_seed(seed)
    generator = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1), nn.Tanh())
    discriminator = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))
    encoder = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)
    )
    return generator.to(dtype), discriminator.to(dtype), encoder.to(dtype)


def adversarial(logits: torch.Tensor) -> torch.Tensor:
    """Per-image mean of a non-saturating loss: the batch mean of per-sample values."""
    return nn.functional.softplus(-logits).flatten(1).mean(1)


def whole_batch_gradients(networks, x, lam, trainable_encoder=False, **options):
    generator, discriminator, encoder = networks
    fake = generator(x)
    if trainable_encoder:
        emb_src = encoder(x)
    else:
        with torch.no_grad():
            emb_src = encoder(x)
    emb_gen = encoder(fake)
    loss = adversarial(discriminator(fake)).mean() + lam * travel_loss(emb_src, emb_gen, **options)
    if trainable_encoder:
        loss = loss + lam * siamese_margin_loss(emb_src, 1.0)
    trained = [*generator.parameters(), *(encoder.parameters() if trainable_encoder else [])]
    return torch.autograd.grad(loss, trained)


def chunked_gradients(networks, x, lam, chunk, trainable_encoder=False, **options):
    generator, discriminator, encoder = networks
    trained = [*generator.parameters(), *(encoder.parameters() if trainable_encoder else [])]
    for p in trained:
        p.grad = None
    emb_src = embed_in_chunks(encoder, x, chunk)
    emb_gen = embed_in_chunks(lambda xs: encoder(generator(xs)), x, chunk)
    if trainable_encoder:

        def loss_fn(src, gen):
            return travel_loss(src, gen, **options) + siamese_margin_loss(src, 1.0)

        cached = travel_loss_and_embedding_grads(emb_src, emb_gen, loss_fn=loss_fn, src_grad=True)
    else:
        cached = travel_loss_and_embedding_grads(emb_src, emb_gen, **options)
    n = x.shape[0]
    for index, x_c in enumerate(x.split(chunk)):
        rows = slice(index * chunk, index * chunk + x_c.shape[0])
        fake_c = generator(x_c)
        adv_c = adversarial(discriminator(fake_c)).sum() / n
        backward_chunk(encoder(fake_c), lam * cached.grad_gen[rows], adv_c, inputs=trained)
        if trainable_encoder:
            backward_chunk(encoder(x_c), lam * cached.grad_src[rows], inputs=trained)
    return [p.grad for p in trained]


def assert_same_gradients(expected, actual, dtype):
    tolerance = TOLERANCE[dtype]
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance * float(e.abs().max().clamp_min(1e-3)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 8])
def test_chunked_generator_gradient_equals_whole_batch(dtype, chunk):
    torch.manual_seed(1)
    networks = tiny_networks(dtype)
    x = torch.rand(7, 3, 8, 8, dtype=dtype) * 2 - 1
    expected = whole_batch_gradients(networks, x, lam=3.0)
    actual = chunked_gradients(networks, x, lam=3.0, chunk=chunk)
    assert_same_gradients(expected, actual, dtype)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 9),
    chunk=st.integers(1, 11),
    distance=st.sampled_from(["cosine", "squared_euclidean", "travelgan"]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_chunked_gradient_equals_whole_batch_for_any_chunking(n, chunk, distance, reduction, seed):
    networks = tiny_networks(torch.float64, seed)
    x = torch.rand(n, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    options = dict(distance=distance, reduction=reduction)
    expected = whole_batch_gradients(networks, x, 0.7, **options)
    actual = chunked_gradients(networks, x, 0.7, chunk, **options)
    assert_same_gradients(expected, actual, torch.float64)


@pytest.mark.parametrize("chunk", [2, 3])
def test_trainable_encoder_gradients_equal_whole_batch(chunk):
    networks = tiny_networks(torch.float64)
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1
    expected = whole_batch_gradients(networks, x, 2.0, trainable_encoder=True)
    actual = chunked_gradients(networks, x, 2.0, chunk, trainable_encoder=True)
    assert len(actual) > len(list(networks[0].parameters()))  # encoder weights included
    assert_same_gradients(expected, actual, torch.float64)


def test_cached_gradient_is_the_loss_gradient_and_keeps_dtype():
    torch.manual_seed(0)
    src, gen = torch.randn(5, 4), torch.randn(5, 4, requires_grad=True)
    loss, grad_gen, grad_src = travel_loss_and_embedding_grads(src, gen, reduction="sum")
    reference = travel_loss(src, gen, reduction="sum")
    (expected,) = torch.autograd.grad(reference, gen)
    assert grad_src is None and not loss.requires_grad and grad_gen.dtype == torch.float32
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad_gen, expected)
    assert gen.grad is None  # the caller's tensors are left alone


def test_embed_in_chunks_equals_one_call_and_keeps_no_graph():
    layer = nn.Linear(4, 3).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    embedded = embed_in_chunks(layer, x, 3)
    assert not embedded.requires_grad
    torch.testing.assert_close(embedded, layer(x).detach(), rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="chunk_size: expected an int >= 1, got 0"):
        embed_in_chunks(nn.Identity(), x, 0)
    with pytest.raises(TypeError, match="embed: expected a callable"):
        embed_in_chunks("encoder", x, 2)
    with pytest.raises(ValueError, match="emb_src, emb_gen: expected the same shape"):
        travel_loss_and_embedding_grads(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="give either loss_fn or options"):
        travel_loss_and_embedding_grads(x, x, loss_fn=travel_loss, reduction="sum")
    with pytest.raises(ValueError, match="loss_fn: expected it to return a scalar"):
        travel_loss_and_embedding_grads(x, x, loss_fn=lambda s, g: s - g)
    with pytest.raises(ValueError, match="emb_chunk: expected embeddings computed with a graph"):
        backward_chunk(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="emb_chunk, grad_chunk: expected the same shape"):
        backward_chunk(torch.randn(2, 3, requires_grad=True), torch.randn(3, 3))


# ------------------------------------------------------------------------------------------
# Under DDP: this rank's rows of the global-batch gradient, scaled for DDP's averaging.

WORLD_SIZE, ROWS_PER_RANK = 2, 5


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        x = torch.randn(WORLD_SIZE * ROWS_PER_RANK, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        local = x[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
        torch.manual_seed(1)
        model = nn.parallel.DistributedDataParallel(nn.Linear(6, 4).double())
        emb_src = local[:, :4] * 2
        emb_gen = embed_in_chunks(model, local, 2)
        loss, grad_gen, _ = travel_loss_and_embedding_grads(emb_src, emb_gen, global_batch=True)
        chunks = list(zip(local.split(2), grad_gen.split(2)))
        for index, (x_c, grad_c) in enumerate(chunks):
            if index < len(chunks) - 1:
                with model.no_sync():
                    backward_chunk(model(x_c), grad_c)
            else:
                backward_chunk(model(x_c), grad_c)  # the synchronised backward averages over ranks
        result = {"loss": loss, "grads": [p.grad for p in model.parameters()]}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_global_batch_gradients_under_ddp_equal_one_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    x = torch.randn(WORLD_SIZE * ROWS_PER_RANK, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    model = nn.Linear(6, 4).double()
    loss = travel_loss(x[:, :4] * 2, model(x))
    loss.backward()
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=0)
        for got, parameter in zip(result["grads"], model.parameters()):
            torch.testing.assert_close(got, parameter.grad, rtol=1e-10, atol=1e-12)
