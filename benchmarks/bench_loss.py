"""Forward + backward cost of ``travel_loss`` against the straightforward materialising formula.

The baseline builds the (N, N, D) tensors of all pairwise differences ``v_ij = s_i - s_j`` and
``z_ij = g_i - g_j`` and takes ``1 - cosine_similarity(v_ij, z_ij)`` over the last axis, which is
what a direct transcription of equation (2) does. ``travel_loss`` needs three N x N Gram matrices
instead: O(N^2 D) flops but O(N^2) memory.

Each measurement runs in its own child process so that its peak memory is its own: on CPU the
peak resident-set growth over the inputs (``ru_maxrss`` minus the resident size before the
first call), on CUDA ``torch.cuda.max_memory_allocated``. Time is the best of at least ``--repeats``
forward+backward calls (and at least 0.5 s of them) after one warm-up call; the best, not the
median, because other work on a shared machine only ever adds time. The baseline is skipped where its difference
tensors alone would exceed ``--max-gib``.

    python benchmarks/bench_loss.py                      # N in {32,128,512,2048}, D in {768,1024}
    python benchmarks/bench_loss.py --n 128 --d 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from travel_loss import travel_loss


def materialising_travel_loss(emb_src: torch.Tensor, emb_gen: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs i != j of 1 - cos(s_i - s_j, g_i - g_j), from (N, N, D) differences."""
    n = emb_src.shape[0]
    v = emb_src[:, None, :] - emb_src[None, :, :]
    z = emb_gen[:, None, :] - emb_gen[None, :, :]
    distances = 1 - F.cosine_similarity(v, z, dim=-1, eps=1e-8)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=emb_src.device)
    return distances[off_diagonal].mean()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _measure(method: str, n: int, d: int, device: str, repeats: int) -> dict:
    """Runs in the child process: time and peak memory of one method at one size."""
    torch.manual_seed(0)
    loss_fn = travel_loss if method == "gram" else materialising_travel_loss
    emb_src = torch.randn(n, d, device=device)
    emb_gen = torch.randn(n, d, device=device, requires_grad=True)

    def step() -> None:
        emb_gen.grad = None
        loss_fn(emb_src, emb_gen).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    # A tiny call first loads the kernels' code pages, so that the resident-set growth measured
    # below is the memory this size needs, not the libraries.
    loss_fn(emb_src[:4], emb_gen[:4]).backward()
    emb_gen.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _resident_bytes()
    step()
    times = []
    while len(times) < repeats or (sum(times) < 0.5 and len(times) < 100):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": min(times), "peak_bytes": max(peak, 0)}


def _run_child(method: str, n: int, d: int, device: str, repeats: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--n",
        str(n),
        "--d",
        str(d),
        "--device",
        device,
        "--repeats",
        str(repeats),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--d", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--max-gib",
        type=float,
        default=4.0,
        help="skip the baseline where its two (N, N, D) float32 tensors exceed this",
    )
    parser.add_argument("--child", choices=["gram", "materialising"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_measure(args.child, args.n[0], args.d[0], args.device, args.repeats)))
        return

    print(
        f"travel_loss forward+backward, float32, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; best of >= {args.repeats}"
    )
    header = (
        f"{'N':>5} {'D':>5} | {'Gram ms':>9} {'Gram peak':>10} | "
        f"{'materialising ms':>16} {'peak':>10} | {'speed-up':>8} {'memory':>7}"
    )
    print(header)
    print("-" * len(header))
    for d in args.d:
        for n in args.n:
            gram = _run_child("gram", n, d, args.device, args.repeats)
            needed_gib = 2 * n * n * d * 4 / 2**30
            if needed_gib > args.max_gib:
                base_text = f"{'skipped (' + format(needed_gib, '.0f') + ' GiB)':>16} {'':>10} | {'':>8} {'':>7}"
            else:
                base = _run_child("materialising", n, d, args.device, max(1, min(args.repeats, 3)))
                speedup = base["seconds"] / gram["seconds"]
                memory_ratio = base["peak_bytes"] / max(gram["peak_bytes"], 1)
                base_text = (
                    f"{base['seconds'] * 1e3:16.2f} {_format_bytes(base['peak_bytes']):>10} | "
                    f"{speedup:7.0f}x {memory_ratio:6.0f}x"
                )
            print(
                f"{n:5d} {d:5d} | {gram['seconds'] * 1e3:9.3f} {_format_bytes(gram['peak_bytes']):>10} | {base_text}",
                flush=True,
            )


if __name__ == "__main__":
    main()
