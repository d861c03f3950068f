"""The lambda sweep on toy streets, on CPU: how much does the travel loss preserve semantics, at what cost.

Trains one generator per setting with :func:`reference.train.train` on toy streets and scores
each on held-out A scenes with :func:`reference.evaluate.evaluate_toy_streets`:

- lambda_travel in ``--lambdas`` (0 and small / medium / large values) with the training
  encoder ``--encoder-mode`` (default ``toy``, the demo's frozen encoder that needs no weights);
- ``auto``: the gradient-balanced lambda of :mod:`reference.adaptive_lambda`;
- the TraVeLGAN baseline (a trainable Siamese embedder, TraVeLGAN's objective and weight 10);
- the random-encoder ablation: a small CLIP vision transformer with random weights
  (``encoder_mode="random-clip"``; its config is written to ``OUT/random_clip/``).

The judge for the Fréchet distance and the travel consistency is a fixed 8 x 8 average pool of
the pixels (192 numbers per image), an embedder no run trains with, so no model is graded by
its own teacher. Runs live in ``OUT/runs/NAME`` and resume from their ``latest.pt``, so an
interrupted sweep continues where it stopped. Output: ``OUT/sweep.json``, ``OUT/sweep.md`` (a
markdown table) and ``OUT/sweep.png`` (flip rate, lane accuracy and realism against lambda)::

    python reference/sweep.py --out runs/sweep                       # the README's table
    python reference/sweep.py --out /tmp/smoke --steps 20 --eval-count 32 --lambdas 0 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from reference.evaluate import evaluate_toy_streets, format_table, plot_lambda_sweep  # noqa: E402

__all__ = ["PooledPixels", "SWEEP_COLUMNS", "run_sweep", "sweep_settings"]

# A small ViT for the random-encoder ablation at toy sizes (a random ViT-L/14 needs 224 px inputs).
RANDOM_CLIP_CONFIG = dict(
    image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, projection_dim=64
)

SWEEP_COLUMNS = (
    "name", "lambda_travel", "lambda_final", "semantic_flip_rate", "lane_accuracy", "realism", "palette_distance",
    "input_distance", "judge_frechet_distance", "judge_travel_consistency", "seconds",
)  # fmt: skip


class PooledPixels(nn.Module):
    """The judge: (N, 3, H, W) -> (N, 3 * side * side), the image average-pooled to side x side."""

    def __init__(self, side: int = 8) -> None:
        super().__init__()
        self.side = side

    def forward(self, images: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(images, self.side).flatten(1)

    def extra_repr(self) -> str:
        return f"side={self.side}"


def sweep_settings(
    lambdas: Sequence[float], *, encoder_mode: str = "toy", auto: bool = True, baselines: bool = True
) -> list[dict[str, Any]]:
    """One dict per run: ``name`` plus the TrainConfig fields that set the run apart."""
    runs: list[dict[str, Any]] = []
    for lam in lambdas:
        if not lam >= 0 or not math.isfinite(lam):
            raise ValueError(f"lambdas: expected finite numbers >= 0, got {lam!r}")
        runs.append({"name": f"lambda {lam:g}", "lambda_travel": float(lam), "encoder_mode": encoder_mode})
    if auto:
        runs.append({"name": "lambda auto", "lambda_travel": "auto", "encoder_mode": encoder_mode})
    if baselines:
        runs.append(
            {"name": "TraVeLGAN (Siamese)", "lambda_travel": 10.0, "encoder_mode": "siamese", "travel_distance": "travelgan"}
        )
        runs.append({"name": "random CLIP (ablation)", "lambda_travel": 1.0, "encoder_mode": "random-clip"})
    return runs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name.lower()).strip("_")


def _write_random_clip_config(folder: Path) -> Path:
    from transformers import CLIPVisionConfig

    folder.mkdir(parents=True, exist_ok=True)
    CLIPVisionConfig(**RANDOM_CLIP_CONFIG).save_pretrained(folder)
    return folder


def _final_lambda(checkpoint_path: Path) -> float | None:
    """Where an adaptive lambda ended: the bias-corrected average stored in the checkpoint."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True).get("adaptive_lambda")
    if not state or not state.get("count"):
        return None
    return state["average"] / (1.0 - state["momentum"] ** state["count"])


def run_sweep(
    out: str | Path,
    *,
    lambdas: Sequence[float] = (0.0, 0.1, 1.0, 10.0),
    steps: int = 600,
    size: int = 64,
    batch_size: int = 8,
    encoder_mode: str = "toy",
    auto: bool = True,
    baselines: bool = True,
    eval_count: int = 256,
    seed: int = 0,
    train_options: dict[str, Any] | None = None,
    judge: nn.Module | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and score every run of :func:`sweep_settings`; write sweep.json, sweep.md, sweep.png under ``out``.

    ``train_options`` are extra TrainConfig fields for every run (e.g. ``{"g_width": 16}``);
    ``judge`` is the embedder of the Fréchet distance and the travel consistency (default
    :class:`PooledPixels` with an 8 x 8 pool). Returns the rows (one dict per run).
    """
    from reference.train import TrainConfig, train
    from reference.translate import load_generator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared = dict(
        toy_streets=True, size=size, batch_size=batch_size, steps=steps, seed=seed, g_width=32, g_blocks=4, d_width=32,
        log_every=max(1, min(50, steps)), sample_every=steps, checkpoint_every=steps, resume=True, device="cpu",
    )  # fmt: skip
    shared.update(train_options or {})
    judge = PooledPixels(8) if judge is None else judge
    rows: list[dict[str, Any]] = []
    for run in sweep_settings(lambdas, encoder_mode=encoder_mode, auto=auto, baselines=baselines):
        name = run.pop("name")
        fields = {**shared, **run, "out": str(out / "runs" / _slug(name))}
        if fields["encoder_mode"] == "random-clip":
            fields["encoder"] = str(_write_random_clip_config(out / "random_clip"))
        if progress:
            print(f"== {name}", flush=True)
        started = time.perf_counter()
        summary = train(TrainConfig(**fields), progress=progress)
        seconds = time.perf_counter() - started
        checkpoint = Path(summary["checkpoint"])
        generator = load_generator(checkpoint)
        scores = evaluate_toy_streets(generator, count=eval_count, size=size, encoder=judge)
        row = {
            "name": name,
            "lambda_travel": run["lambda_travel"],
            "encoder_mode": run["encoder_mode"],
            "steps": summary["step"],
            "lambda_final": _final_lambda(checkpoint) if run["lambda_travel"] == "auto" else None,
            "seconds": seconds,
            "judge_frechet_distance": scores.pop("encoder_frechet_distance"),
            "judge_kernel_distance": scores.pop("encoder_kernel_distance"),
            "judge_travel_consistency": scores.pop("travel_consistency"),
            **{k: v for k, v in scores.items() if not k.startswith("encoder_")},
        }
        rows.append(row)
        _write_tables(out, rows, shared, judge)  # after every run: a partial sweep is readable
    _write_tables(out, rows, shared, judge)
    _write_plot(out, rows, progress=progress)
    if progress:
        print(format_table(rows, SWEEP_COLUMNS))
        print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return rows


def _write_tables(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], judge: nn.Module) -> None:
    payload = {"settings": settings, "judge": repr(judge), "rows": rows}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "sweep.md").write_text(format_table(rows, SWEEP_COLUMNS, markdown=True) + "\n")


def _write_plot(out: Path, rows: list[dict[str, Any]], *, progress: bool) -> None:
    try:
        plot_lambda_sweep(rows, out / "sweep.png")
    except ImportError as error:
        if progress:
            print(f"note: no plot: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reference/sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, sweep.json, sweep.md and sweep.png")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder-mode", default="toy", help="training encoder of the lambda runs (TrainConfig.encoder_mode)")
    parser.add_argument("--no-auto", action="store_true", help="skip the adaptive-lambda run")
    parser.add_argument("--no-baselines", action="store_true", help="skip the Siamese baseline and the random-encoder ablation")
    parser.add_argument("--eval-count", type=int, default=256, help="held-out A scenes to score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_sweep(
        args.out, lambdas=args.lambdas, steps=args.steps, size=args.size, batch_size=args.batch_size,
        encoder_mode=args.encoder_mode, auto=not args.no_auto, baselines=not args.no_baselines,
        eval_count=args.eval_count, seed=args.seed,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
