"""The flip audit of a folder of translations: which ones most likely lost their content?

``python reference/evaluate.py --translations T --sources S --audit K --encoder E --out REPORT.json``
runs :func:`audit_folders` and writes, beside ``REPORT.json``:

- ``audit.csv`` (:func:`write_audit_csv`): one row per translation, most suspicious first;
- ``audit.png`` (:func:`save_audit_figure`): the K most and the K least suspicious pairs.

Scores are :func:`travel_loss.flip_scores` of the embeddings of each source and its translation
(paired by file stem, as ``reference/translate.py`` names its outputs), higher = more suspicious.
Audit with a frozen encoder the generator was not trained against: a generator can game its
training encoder and then looks innocent to it exactly where it flipped.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "AUDIT_CSV",
    "AUDIT_FIGURE",
    "AuditResult",
    "save_audit_figure",
    "score_lines",
    "write_audit_csv",
]

AUDIT_CSV = "audit.csv"
AUDIT_FIGURE = "audit.png"
CSV_COLUMNS = ("rank", "file", "source", "score", "percentile", "robust_z", "row_mean", "local")


@dataclass(frozen=True)
class AuditResult:
    """Per translation, in the order of the (sorted) file stems: its path, its source's path, the
    chosen score and both methods' scores; and the travel consistency of the whole set."""

    files: list[Path]
    sources: list[Path]
    scores: Tensor  # (N,), the chosen method
    by_method: dict[str, Tensor]  # "row_mean", "local": (N,) each
    method: str
    neighbours: int
    travel_consistency: float

    def ranks(self) -> Tensor:
        """(N,) ranks, 1 = most suspicious; ties keep file order."""
        order = torch.argsort(-self.scores, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return ranks

    def summary(self, count: int) -> dict[str, Any]:
        """The JSON report's ``audit`` entry: the distribution of the scores and the ``count`` most and
        least suspicious translations."""
        scores = self.scores.double()
        order = torch.argsort(-scores, stable=True).tolist()

        def entry(index: int, rank: int) -> dict[str, Any]:
            return {"rank": rank, "file": str(self.files[index]), "source": str(self.sources[index]),
                    "score": float(scores[index])}  # fmt: skip

        count = min(count, len(order))
        return {
            "count": len(order),
            "method": self.method,
            "neighbours": self.neighbours if self.method == "local" else None,
            "scores": {
                "mean": float(scores.mean()),
                "median": float(scores.median()),
                "p90": float(scores.quantile(0.9)),
                "max": float(scores.max()),
                "min": float(scores.min()),
            },
            "travel_consistency": self.travel_consistency,
            "most_suspicious": [entry(i, r) for r, i in enumerate(order[:count], start=1)],
            "least_suspicious": [entry(i, len(order) - k) for k, i in enumerate(reversed(order[-count:]))],
        }


def write_audit_csv(result: AuditResult, path: str | os.PathLike[str]) -> Path:
    """One row per translation, most suspicious first: ``rank`` (1 = most suspicious), ``file`` and
    ``source`` (paths), ``score`` (the chosen method), ``percentile`` (the share of translations
    scoring lower), ``robust_z`` ((score - median) / (1.4826 MAD): how far out it lies; about 3 and
    above stands apart from the bulk), and both methods' scores."""
    scores = result.scores.double()
    n = len(scores)
    median = scores.median()
    spread = 1.4826 * (scores - median).abs().median()
    ranks = result.ranks()
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for index in torch.argsort(ranks).tolist():
            below = int((scores < scores[index]).sum())
            z = float((scores[index] - median) / spread) if spread > 0 else 0.0
            writer.writerow([
                int(ranks[index]), result.files[index], result.sources[index], f"{float(scores[index]):.6f}",
                f"{below / max(n - 1, 1):.4f}", f"{z:.3f}",
                f"{float(result.by_method['row_mean'][index]):.6f}", f"{float(result.by_method['local'][index]):.6f}",
            ])  # fmt: skip
    return path


THUMB = 96  # pixels per image in the figure
_LINE = 13  # text line height


def save_audit_figure(
    result: AuditResult, count: int, path: str | os.PathLike[str], *, size: int = THUMB
) -> Path:  # fmt: skip
    """A PNG of the ``count`` most suspicious pairs (left block) and the ``count`` least suspicious
    (right block), one pair per row: source | translation, with the rank, the score and the file
    name written under each; a title and column headings name everything."""
    from PIL import Image, ImageDraw, ImageFont

    from reference.data import load_image

    order = torch.argsort(-result.scores, stable=True).tolist()
    count = min(count, len(order))
    blocks = [("most suspicious (rank 1 = top)", order[:count]), ("least suspicious", list(reversed(order[-count:])))]
    ranks = result.ranks()
    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=13)
    pad, caption = 6, 2 * _LINE
    pair_width = 2 * size + pad
    block_width = pair_width + 2 * pad
    header = 4 * _LINE + pad  # two title lines, block titles, column headings
    height = header + count * (size + caption + pad) + pad
    figure = Image.new("RGB", (2 * block_width + pad, height), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((pad, 2), f"Flip audit of {len(order)} translations", fill="black", font=title_font)
    draw.text((pad, _LINE + 4), f"score: {result.method}, higher = more likely flipped", fill="black", font=font)
    for column, (title, indices) in enumerate(blocks):
        left = pad + column * block_width
        draw.text((left, 2 * _LINE + 4), title, fill="darkred" if column == 0 else "darkgreen", font=font)
        draw.text((left, 3 * _LINE + 4), "source", fill="black", font=font)
        draw.text((left + size + pad, 3 * _LINE + 4), "translation", fill="black", font=font)
        for row, index in enumerate(indices):
            top = header + row * (size + caption + pad)
            for offset, image_path in ((0, result.sources[index]), (size + pad, result.files[index])):
                figure.paste(_thumbnail(load_image(image_path), size), (left + offset, top))
            label = f"#{int(ranks[index])}  score {float(result.scores[index]):.3f}"
            draw.text((left, top + size + 1), label, fill="black", font=font)
            draw.text((left, top + size + _LINE), _shortened(result.files[index].name, 30), fill="dimgray", font=font)
    figure.save(path)
    return Path(path)


def _thumbnail(image: Tensor, size: int) -> Any:
    """(3, H, W) in [-1, 1] -> a size x size PIL image (nearest when enlarging: small images stay sharp)."""
    from PIL import Image

    mode = "nearest" if max(image.shape[-2:]) < size else "area"
    resized = F.interpolate(image[None].float(), size=(size, size), mode=mode)[0]
    pixels = ((resized.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def _shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width // 2 - 1] + "..." + text[-(width // 2 - 2) :]


def score_lines(result: AuditResult, count: int) -> Sequence[str]:
    """The printed lines: one per translation among the ``count`` most suspicious."""
    order = torch.argsort(-result.scores, stable=True).tolist()[: min(count, len(result.files))]
    width = len(str(len(result.files)))
    return [
        f"rank {rank:>{width}}  score {float(result.scores[i]):.4f}  {result.files[i].name} <- {result.sources[i].name}"
        for rank, i in enumerate(order, start=1)
    ]
