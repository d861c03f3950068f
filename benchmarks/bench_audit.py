"""Cost of the flip audit, ``travel_loss.flip_scores``, at N = 10,000, against encoding and a baseline.

Three figures, CPU time (user + sys of this process, all threads: wall time on a shared machine is
unreliable) and wall time:

1. ``flip_scores`` for N (default 10,000) random (N, D) embedding pairs, both methods, in row
   blocks of ``--chunk`` rows: memory about ten (chunk, N) float64 blocks, never N x N.
2. The straightforward baseline at ``--baseline-n`` (default 4,000: its N x N float64 matrices
   need about 10 * 8 * N^2 bytes, 1.3 GB there, 8 GB at 10,000): the row mean of
   ``travel_loss(..., reduction="none")``, against ``flip_scores`` at the same N (the ratio).
3. What the audit costs beside encoding: a randomly initialised ViT-B/16 (transformers
   ``CLIPVisionModel``, 224 px, no download) embeds ``--encode-images`` images; its CPU time per
   image times 2N (sources and translations) is the encoding time the scoring is compared with.

    python benchmarks/bench_audit.py
    python benchmarks/bench_audit.py --n 2000 --baseline-n 1000 --encode-images 4   # quick
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch

from travel_loss import flip_scores, travel_loss


def measured(work: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def embeddings(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(n, dim, generator=generator)
    return src, src + 0.5 * torch.randn(n, dim, generator=generator)


def full_matrix_row_mean(src: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """The baseline: the whole (N, N) travel distance matrix, then its row means."""
    return travel_loss(src, gen, reduction="none").sum(1) / (src.shape[0] - 1)


def encoding_seconds_per_image(count: int) -> tuple[float, float]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)).eval()
    images = torch.randn(count, 3, 224, 224)
    with torch.no_grad():
        model(pixel_values=images[:1])  # warm-up
        cpu, wall = measured(lambda: model(pixel_values=images))
    return cpu / count, wall / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--baseline-n", type=int, default=4_000)
    parser.add_argument("--encode-images", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU seconds (wall seconds)")

    src, gen = embeddings(args.n, args.d)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timings = {}
    for method in ("row_mean", "local"):
        timings[method] = measured(lambda m=method: flip_scores(src, gen, method=m, chunk_size=args.chunk))  # type: ignore[misc]
        print(f"flip_scores {method:8s} N={args.n} D={args.d} chunk={args.chunk}: "
              f"{timings[method][0]:.2f} s ({timings[method][1]:.2f} s)")  # fmt: skip
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    print(f"  peak resident growth {grown:.2f} GiB (an N x N float64 matrix alone: {8 * args.n**2 / 2**30:.2f} GiB)")

    small_src, small_gen = src[: args.baseline_n], gen[: args.baseline_n]
    chunked = measured(lambda: flip_scores(small_src, small_gen, chunk_size=args.chunk))
    baseline = measured(lambda: full_matrix_row_mean(small_src, small_gen))
    agree = torch.allclose(flip_scores(small_src, small_gen), full_matrix_row_mean(small_src, small_gen), atol=1e-5)
    print(f"baseline (full N x N matrix, row means) N={args.baseline_n}: {baseline[0]:.2f} s ({baseline[1]:.2f} s); "
          f"flip_scores row_mean {chunked[0]:.2f} s ({chunked[1]:.2f} s): baseline / chunked = "
          f"{baseline[0] / chunked[0]:.2f} CPU, {baseline[1] / chunked[1]:.2f} wall; same scores: {agree}")  # fmt: skip

    per_image_cpu, per_image_wall = encoding_seconds_per_image(args.encode_images)
    encode_cpu, encode_wall = 2 * args.n * per_image_cpu, 2 * args.n * per_image_wall
    cpu_ratio, wall_ratio = timings["row_mean"][0] / encode_cpu, timings["row_mean"][1] / encode_wall
    print(f"encoding 2 x {args.n} images with ViT-B/16 at 224 px (from {args.encode_images} measured): "
          f"{encode_cpu:.0f} s ({encode_wall:.0f} s); scoring row_mean / encoding = "
          f"{cpu_ratio:.4f} CPU, {wall_ratio:.4f} wall")  # fmt: skip


if __name__ == "__main__":
    main()
