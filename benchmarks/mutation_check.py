"""Mutation check: does the test suite notice deliberate bugs in the loss and the test kit?

Each mutant is one textual change to ``travel_loss/loss.py`` or ``travel_loss/testing.py``. For
each, the package and the tests are copied to a temporary folder, the change is applied there
(the working tree is never touched), and the test file that covers the changed module runs with
``CI=true`` (derandomized hypothesis: the same examples on every run, as in CI). A mutant is
*killed* when that test file fails, *survived* when it passes. The score is killed / total.

The unmutated copy runs first and must pass; a replacement that no longer matches the source
exactly once is an error, not a survivor, so the list cannot silently go stale.

    python benchmarks/mutation_check.py               # all mutants, CI=true
    python benchmarks/mutation_check.py --local       # hypothesis randomized, as in a local run
    python benchmarks/mutation_check.py --only clamp,centring  # mutants whose name contains either
    python benchmarks/mutation_check.py --why         # run every test, name those that kill
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_OF = {"travel_loss/loss.py": ["tests/test_loss.py"], "travel_loss/testing.py": ["tests/test_testing.py"]}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str


LOSS, KIT = "travel_loss/loss.py", "travel_loss/testing.py"

MUTANTS = [
    # -- loss.py: the five of the issue that opened this check
    Mutant(
        "no batch centring",
        LOSS,
        "    s = _centred(src.to(compute_dtype))\n    g = _centred(gen.to(compute_dtype))\n",
        "    s = src.to(compute_dtype)\n    g = gen.to(compute_dtype)\n",
    ),
    Mutant("zero-length threshold x 1e6", LOSS, "_ZERO_LENGTH_RTOL_IN_EPS = 1e4", "_ZERO_LENGTH_RTOL_IN_EPS = 1e10"),
    Mutant("zero-length threshold / 1e6", LOSS, "_ZERO_LENGTH_RTOL_IN_EPS = 1e4", "_ZERO_LENGTH_RTOL_IN_EPS = 1e-2"),
    Mutant("cosine clamp removed", LOSS, "(dot / denominator).clamp(-1.0, 1.0)", "(dot / denominator)"),
    # -- loss.py: further single faults
    Mutant(
        "zero-length cosine 1 instead of 0",
        LOSS,
        "torch.where(zero_length, torch.zeros_like(cosine), cosine)",
        "torch.where(zero_length, torch.ones_like(cosine), cosine)",
    ),
    Mutant(
        "zero length needs both vectors",
        LOSS,
        "_zero_length_threshold(gram_s)) | (",
        "_zero_length_threshold(gram_s)) & (",
    ),
    Mutant("cross Gram assumed symmetric", LOSS, "- cross - cross.mT", "- 2 * cross"),
    Mutant(
        "no safe denominator for zero-length pairs",
        LOSS,
        "torch.sqrt(torch.where(zero_length, ones, squared_v))",
        "torch.sqrt(squared_v)",
    ),
    Mutant("squared norms not clamped at 0", LOSS, "- 2 * gram).clamp_min(0)", "- 2 * gram)"),
    Mutant(
        "squared_euclidean not divided by D",
        LOSS,
        "pairwise_squared_norms(w @ w.mT) / s.shape[1]",
        "pairwise_squared_norms(w @ w.mT)",
    ),
    Mutant("diagonal not zeroed", LOSS, "    return _zero_diagonal(result)\n", "    return result\n"),
    Mutant("mean over N^2 instead of N(N-1)", LOSS, "return total / (n * (n - 1))", "return total / (n * n)"),
    Mutant(
        "Gram matrices in float32",
        LOSS,
        'return torch.float32 if device.type in ("mps", "xla") else torch.float64',
        "return torch.float32",
    ),
    Mutant(
        "float64 input gives float32",
        LOSS,
        "return torch.float64 if input_dtype == torch.float64 else torch.float32",
        "return torch.float32",
    ),
    Mutant(
        "encoders summed instead of averaged", LOSS, "torch.stack(losses).mean(dim=0)", "torch.stack(losses).sum(dim=0)"
    ),
    Mutant(
        "check_finite ignored",
        LOSS,
        "    if check_finite:\n        _check_all_finite((name_src, src), (name_gen, gen))",
        "    if False:\n        _check_all_finite((name_src, src), (name_gen, gen))",
    ),
    Mutant("margin hinge not clamped", LOSS, "hinge = torch.relu(margin - squared)", "hinge = margin - squared"),
    # -- testing.py: check_embedder checks and the strategies
    Mutant(
        "check_embedder: no 'image 0 alone' check",
        KIT,
        "            _check_same(\n                alone, first[:1], atol, rtol,",
        "            (lambda *args, **kwargs: None)(\n                alone, first[:1], atol, rtol,",
    ),
    Mutant(
        "check_embedder: no 'image 0 in another batch' check",
        KIT,
        "            _check_same(\n                in_other_batch[-1:], first[:1], atol, rtol,",
        "            (lambda *args, **kwargs: None)(\n                in_other_batch[-1:], first[:1], atol, rtol,",
    ),
    Mutant(
        "check_embedder: no determinism check",
        KIT,
        "            _check_same(\n                first, second, atol, rtol,",
        "            (lambda *args, **kwargs: None)(\n                first, second, atol, rtol,",
    ),
    Mutant("check_embedder: no in-place check", KIT, "    if not torch.equal(images, original):", "    if False:"),
    Mutant("check_embedder: no zero-gradient check", KIT, "    if zero_images:", "    if False:"),
    Mutant("check_embedder: no parameter-gradient check", KIT, "    if with_gradient:", "    if False:"),
    Mutant("check_embedder: buffers not restored", KIT, "                buffer.copy_(saved)", "                pass"),
    Mutant("check_embedder: float32 default rtol 0", KIT, "    torch.float32: 1e-3,", "    torch.float32: 0.0,"),
    Mutant("strategies: no duplicate rows", KIT, "        if duplicates and n > 1:", "        if False:"),
    Mutant("strategies: no offset", KIT, "        if max_offset > 0:", "        if False:"),
]


def copy_tree(destination: Path) -> None:
    for name in ("travel_loss", "tests"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", destination / "pyproject.toml")


def environment_for(tree: Path, ci: bool) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    environment.pop("CI", None)
    if ci:
        environment["CI"] = "true"
    return environment


def check_imports_from(tree: Path) -> None:
    """The copy, not an installed travel_loss, must be what the tests import."""
    command = [sys.executable, "-c", "import travel_loss; print(travel_loss.__file__)"]
    environment = environment_for(tree, False)
    imported = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True, check=False)
    if not imported.stdout.strip().startswith(str(tree)):
        raise SystemExit(f"travel_loss is imported from {imported.stdout.strip() or imported.stderr}, not {tree}")


def run_tests(tree: Path, test_files: list[str], ci: bool, why: bool = False) -> tuple[bool, float, list[str]]:
    """Whether the test files pass in ``tree``, the seconds they took, and the failed tests (all of
    them with ``why``, else the first)."""
    environment = environment_for(tree, ci)
    stop_early = [] if why else ["-x"]
    command = [sys.executable, "-m", "pytest", "-q", "-rf", *stop_early, "-p", "no:cacheprovider", *test_files]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True, check=False)
    failed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    return result.returncode == 0, time.perf_counter() - start, failed


def apply(mutant: Mutant, tree: Path) -> None:
    source_path = tree / mutant.path
    source = source_path.read_text()
    count = source.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name!r}: the text to replace occurs {count} times in {mutant.path}")
    source_path.write_text(source.replace(mutant.old, mutant.new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true", help="randomized hypothesis (no CI=true)")
    parser.add_argument("--only", default="", help="comma-separated texts: run the mutants whose name contains one")
    parser.add_argument("--why", action="store_true", help="run all tests of each mutant and name the failures")
    args = parser.parse_args()
    ci = not args.local
    wanted = [text.strip().lower() for text in args.only.split(",")]
    mutants = [m for m in MUTANTS if any(text in m.name.lower() for text in wanted)]

    with tempfile.TemporaryDirectory(prefix="mutation_check_") as temporary:
        pristine = Path(temporary) / "pristine"
        copy_tree(pristine)
        check_imports_from(pristine)
        for path, test_files in TESTS_OF.items():
            passed, seconds, _ = run_tests(pristine, test_files, ci)
            if not passed:
                raise SystemExit(f"the unmutated {', '.join(test_files)} fail: fix them before the mutation check")
            print(f"unmutated {path}: {', '.join(test_files)} pass ({seconds:.0f} s)", flush=True)
        killed = []
        for index, mutant in enumerate(mutants):
            tree = Path(temporary) / f"mutant_{index}"
            copy_tree(tree)
            apply(mutant, tree)
            passed, seconds, failures = run_tests(tree, TESTS_OF[mutant.path], ci, args.why)
            killed.append(not passed)
            verdict = "SURVIVED" if passed else "killed  "
            print(f"{verdict} {mutant.path:24} {mutant.name} ({seconds:.0f} s)", flush=True)
            if args.why:
                print("".join(f"    {failure}\n" for failure in failures), end="", flush=True)
            shutil.rmtree(tree)
    mode = "CI=true (derandomized)" if ci else "local (randomized)"
    print(f"score {sum(killed)}/{len(killed)} mutants killed, {mode}")
    if not all(killed):
        sys.exit(1)


if __name__ == "__main__":
    main()
