"""Packaging metadata: one version, the MIT licence shipped, an sdist whose tests collect.

The metadata checks read pyproject.toml and LICENSE only. The sdist check builds the source
archive in-process with setuptools (about a second, offline); the full ``python -m build`` run,
which also collects the tests inside the extracted sdist, is marked slow.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import travel_loss

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _setuptools_version() -> tuple[int, ...]:
    import setuptools

    return tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])


def test_version_is_written_once_in_the_package():
    assert "version" not in PROJECT, "pyproject.toml: the version must come from travel_loss.__version__"
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "travel_loss.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", travel_loss.__version__), travel_loss.__version__
    assert not (ROOT / "setup.py").exists()
    assert not (ROOT / "setup.cfg").exists() or "version" not in (ROOT / "setup.cfg").read_text()


def test_licence_is_mit_declared_as_an_spdx_expression_and_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} \S", text, flags=re.MULTILINE)
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    # PEP 639: a licence expression excludes licence classifiers; setuptools reads it from version 77.
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    assert any(
        re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
        for r in PYPROJECT["build-system"]["requires"]
    )


def test_metadata_names_urls_status_and_python_versions():
    urls = PROJECT["urls"]
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    classifiers = PROJECT["classifiers"]
    assert len([c for c in classifiers if c.startswith("Development Status :: ")]) == 1
    floor = re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"])
    assert floor, PROJECT["requires-python"]
    listed = sorted(
        int(m[1]) for c in classifiers if (m := re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c))
    )
    assert listed and listed[0] == int(floor[1]), (
        f"the python classifiers {listed} should start at the floor 3.{floor[1]}"
    )
    assert listed == list(range(listed[0], listed[-1] + 1)), f"python classifiers with a gap: {listed}"
    assert "Typing :: Typed" in classifiers and (ROOT / "travel_loss" / "py.typed").is_file()


@pytest.mark.skipif(_setuptools_version() < (77,), reason="the SPDX licence expression needs setuptools >= 77")
def test_sdist_ships_licence_conftest_reference_and_every_test(tmp_path):
    """The sdist's tests collect only if it carries conftest.py and the reference trainer they import."""
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    archive = tmp_path / done.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as sdist:
        prefix = f"travel_loss-{travel_loss.__version__}/"
        members = {name.removeprefix(prefix) for name in sdist.getnames()}
    wanted = {"LICENSE", "README.md", "pyproject.toml", "tests/conftest.py", "travel_loss/py.typed", "dev"}
    for folder in ("travel_loss", "reference", "tests", "benchmarks"):
        wanted |= {path.relative_to(ROOT).as_posix() for path in (ROOT / folder).glob("*.py")}
    wanted |= {path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")}  # tests/test_readme.py
    assert wanted - members == set()
    assert not [name for name in members if name.endswith((".pyc", ".pyo")) or "__pycache__" in name]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the `build` package")
@pytest.mark.skipif(_setuptools_version() < (77,), reason="the SPDX licence expression needs setuptools >= 77")
def test_built_wheel_carries_licence_and_extracted_sdist_collects_every_test(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "travel_loss/py.typed" in names
    assert "License-Expression: MIT" in metadata.splitlines()
    assert f"Version: {travel_loss.__version__}" in metadata.splitlines()

    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    environment["PYTHONPATH"] = str(source)  # the extracted tree, not the checkout or an installed copy
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=source, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert files == {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").glob("test_*.py")}


def _project_imports(path: Path) -> set[str]:
    """Modules of reference/ and travel_loss/ that ``path`` imports anywhere (top level or inside functions)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in ("reference", "travel_loss")}
    return found


def test_no_module_of_the_project_imports_itself_back():
    """The import graph of reference/ and travel_loss/, lazy imports included, has no cycle."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for package in ("reference", "travel_loss")
        for path in (ROOT / package).glob("*.py")
        if path.name != "__init__.py"
    }
    graph = {name: {m for m in _project_imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert graph["reference.train"] >= {"reference.steps", "reference.config"}  # the graph is really read

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for following in graph[node]:
                if following == start:
                    return [*trail, start]
                if following not in trail:
                    stack.append((following, [*trail, following]))
        return None

    cycles = [cycle for name in sorted(graph) if (cycle := cycle_from(name))]
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_the_extras_promise_only_what_they_ship():
    """``reference/`` is not in the wheel, so no extra may be named as if it installed the trainer."""
    extras = PROJECT["optional-dependencies"]
    assert "reference" not in extras and "trainer-deps" in extras
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["travel_loss", "travel_loss.*"]
    assert "pip install -e '.[trainer-deps]'" in (ROOT / "docs" / "development.md").read_text()


def test_the_package_description_is_the_front_page_and_renders():
    """pyproject's readme is README.md as markdown; it parses as CommonMark-style text with its own title."""
    assert PROJECT["readme"] == "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("# travel-loss\n")
    assert text.count("```") % 2 == 0, "an unclosed code fence swallows the rest of the description"
    assert len(text.splitlines()) <= 250, "the front page stays short; details belong in docs/"


def test_the_readme_test_command_is_the_one_the_dev_script_and_ci_run():
    """.ci/run checks README.md's `python -m pytest` line against what `./dev test` runs."""
    (readme_command,) = re.findall(r"^python -m pytest.*$", (ROOT / "README.md").read_text(), flags=re.M)[:1]
    dev = (ROOT / "dev").read_text()
    assert re.search(rf"^\s*{re.escape(readme_command)} \"\$@\"$", dev, flags=re.M), readme_command
    assert (
        f'"{readme_command}"' in (ROOT / ".ci" / "run").read_text()
        and "exec ./dev test" in (ROOT / ".ci/run").read_text()
    )
