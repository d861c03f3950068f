"""The studies: measured comparisons run through the public trainer, ``reference/train.py --demo NAME``.

Each study trains every method with ``reference/train.py``'s own command line
(:mod:`reference.studies.runner`), scores the translations and writes a report, a table and
figures into ``--out``. Imports run from the studies to the trainer, never back: the trainer
knows only :data:`STUDIES` and :func:`run_study`.

- ``digits`` (the default of ``--demo``): real handwritten digits, two styles and a class-prior
  mismatch (:mod:`reference.studies.digits`); ``digits-full`` adds the ablations and sweeps.
- ``lambda-transfer``: the travel method's lambda rules (fixed weights, the gradient balance, the
  default) on digit variants in other styles, sizes, skews and embedders
  (:mod:`reference.studies.lambda_transfer`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STUDY", "STUDIES", "run_study"]

# study name -> (module, entry function, keyword arguments)
STUDIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "digits": ("reference.studies.digits", "run_digit_demo", {}),
    "digits-full": ("reference.studies.digits", "run_digit_demo", {"full": True}),
    "lambda-transfer": ("reference.studies.lambda_transfer", "run_lambda_transfer", {}),
}
DEFAULT_STUDY = "digits"


def run_study(name: str, out: str | Path, *, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run the study ``name`` (a key of :data:`STUDIES`) into ``out``; returns its report."""
    if name not in STUDIES:
        raise ValueError(f"--demo: expected one of {sorted(STUDIES)}, got {name!r}")
    module, function, options = STUDIES[name]
    return getattr(importlib.import_module(module), function)(out, seed=seed, quick=quick, **options)
