"""Every ```python block of README.md and docs/*.md runs as written, with hub ids replaced by tiny local
checkpoints, and every link between those pages and into the repository resolves.

Each block is executed in a fresh namespace (so it must bring its own imports and define every name
it uses). The CycleGAN subclass block runs against a stand-in for the CycleGAN code base's
``models.cycle_gan_model`` and is then trained for a few steps at batch 1.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# (page, block) for every ```python block of every page, in reading order
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), block)
    for page in PAGES
    for block in re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
]
# The front page is also the package index's description, where relative links do not resolve: it links
# into the repository with absolute URLs under these prefixes, which the link test maps back to files.
REPOSITORY_URLS = (
    "https://github.com/travel-loss/travel-loss/blob/main/",
    "https://raw.githubusercontent.com/travel-loss/travel-loss/main/",
)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)\s*\)")
# A quoted 'namespace/name' string in a block is a hub id; each must map to a tiny checkpoint fixture.
HUB_ID = re.compile(r"""(["'])([A-Za-z0-9][\w.-]*/[\w.-]+)\1""")
CHECKPOINT_FIXTURES = {"openai/clip-": "tiny_clip_dir"}


def _with_local_checkpoints(code: str, request: pytest.FixtureRequest) -> str:
    def local(match: re.Match[str]) -> str:
        hub_id = match.group(2)
        for prefix, fixture in CHECKPOINT_FIXTURES.items():
            if hub_id.startswith(prefix):
                return repr(str(request.getfixturevalue(fixture)))
        pytest.fail(
            f"a documentation block uses the hub id {hub_id!r}, which has no tiny local stand-in: add a checkpoint "
            "fixture to tests/conftest.py and its prefix to CHECKPOINT_FIXTURES in tests/test_readme.py"
        )

    return HUB_ID.sub(local, code)


class _CycleGANModel:
    """What the README's subclass uses of the CycleGAN code base's model (batch 1, one generator)."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.device = torch.device("cpu")
        self.loss_names = ["G_A", "cycle_A"]
        self.netG_A = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh())

    def set_input(self, real_A: torch.Tensor) -> None:
        self.real_A = real_A

    def forward(self) -> None:
        self.fake_B = self.netG_A(self.real_A)

    def backward_G(self) -> None:
        self.loss_G_A = (self.fake_B - 1).abs().mean()  # stands for the framework's generator losses
        self.loss_G_A.backward()


@pytest.fixture
def cyclegan_code_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """``models.cycle_gan_model.CycleGANModel`` importable, as inside the CycleGAN repository."""
    package, module = types.ModuleType("models"), types.ModuleType("models.cycle_gan_model")
    module.CycleGANModel = _CycleGANModel  # type: ignore[attr-defined]
    package.cycle_gan_model = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "models", package)
    monkeypatch.setitem(sys.modules, "models.cycle_gan_model", module)


def _run(code: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": name}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_the_pages_have_their_python_blocks() -> None:
    counts = {page.relative_to(ROOT).as_posix(): 0 for page in PAGES}
    for page, _ in BLOCKS:
        counts[page] += 1
    assert sum(counts.values()) >= 7, f"expected at least 7 ```python blocks, found {counts}"
    # the CycleGAN / CUT recipes are files in examples/, run against stand-ins in tests/test_recipes.py
    assert counts["README.md"] >= 1, "the front page keeps the ten-line snippet"


@pytest.mark.usefixtures("cyclegan_code_base")
@pytest.mark.parametrize(
    "index", range(len(BLOCKS)), ids=[f"{page.removesuffix('.md')}-block{i}" for i, (page, _) in enumerate(BLOCKS)]
)
def test_block_runs_as_written(index: int, request: pytest.FixtureRequest) -> None:
    page, code = BLOCKS[index]
    torch.manual_seed(0)
    _run(_with_local_checkpoints(code, request), f"{page} python block {index}")


def test_blocks_that_train_reach_the_generator(request: pytest.FixtureRequest) -> None:
    """The generator-step blocks (the front page's snippet, DDP's) leave a finite gradient on G, none on E."""
    trained = 0
    for index, (page, code) in enumerate(BLOCKS):
        if "loss_g.backward()" not in code and "* travel).backward()" not in code:
            continue
        torch.manual_seed(0)
        namespace = _run(_with_local_checkpoints(code, request), f"{page} python block {index}")
        grads = [p.grad for p in namespace["generator"].parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in namespace["encoder"].model.parameters())
        trained += 1
    assert trained >= 2


def _link_target(page: Path, target: str) -> Path | None:
    """The file a link points to, or None for a link outside the repository (another site, mail)."""
    for prefix in REPOSITORY_URLS:
        if target.startswith(prefix):
            return ROOT / target.removeprefix(prefix).split("#")[0]
    if re.match(r"[a-z][a-z0-9+.-]*:", target):
        return None
    path = target.split("#")[0]
    return page if not path else (page.parent / path).resolve()


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_link_resolves_to_a_file_and_heading_of_the_repository() -> None:
    broken, checked = [], 0
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            path = _link_target(page, target)
            if path is None:
                continue
            checked += 1
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no file {path})")
            elif "#" in target and path.suffix == ".md" and target.split("#")[1] not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {path.name})")
    assert checked >= 20, f"only {checked} links checked: is the link pattern still right?"
    assert not broken, "\n".join(broken)


def test_the_front_page_links_absolutely_for_the_package_index() -> None:
    """README.md is the package's long description (pyproject's readme); relative links break there."""
    targets = LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert not relative, f"README.md: relative links {relative}; use {REPOSITORY_URLS[0]}..."
    assert any(t.startswith(REPOSITORY_URLS[1]) and t.endswith(".png") for t in targets), "the grid is shown"
