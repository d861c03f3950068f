"""Every ```python block of README.md runs as written, with hub ids replaced by tiny local checkpoints.

Each block is executed in a fresh namespace (so it must bring its own imports and define every name
it uses). The CycleGAN subclass block runs against a stand-in for the CycleGAN code base's
``models.cycle_gan_model`` and is then trained for a few steps at batch 1.
"""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
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
            f"README.md uses the hub id {hub_id!r}, which has no tiny local stand-in: add a checkpoint fixture to "
            "tests/conftest.py and its prefix to CHECKPOINT_FIXTURES in tests/test_readme.py"
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


def test_readme_has_its_python_blocks() -> None:
    assert len(BLOCKS) >= 5, f"expected at least 5 ```python blocks in README.md, found {len(BLOCKS)}"


@pytest.mark.usefixtures("cyclegan_code_base")
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_as_written(index: int, request: pytest.FixtureRequest) -> None:
    torch.manual_seed(0)
    _run(_with_local_checkpoints(BLOCKS[index], request), f"README.md python block {index}")


def test_readme_blocks_that_train_reach_the_generator(request: pytest.FixtureRequest) -> None:
    """The two generator-step blocks leave a finite gradient on G and none on the encoder."""
    for index, code in enumerate(BLOCKS):
        if "loss_g.backward()" not in code:
            continue
        torch.manual_seed(0)
        namespace = _run(_with_local_checkpoints(code, request), f"README.md python block {index}")
        grads = [p.grad for p in namespace["generator"].parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in namespace["encoder"].model.parameters())


@pytest.mark.usefixtures("cyclegan_code_base")
def test_readme_cyclegan_subclass_trains_at_batch_one(request: pytest.FixtureRequest) -> None:
    (code,) = [block for block in BLOCKS if "class TravelCycleGANModel" in block]
    model = _run(_with_local_checkpoints(code, request), "README.md CycleGAN block")["TravelCycleGANModel"](opt=None)
    assert "travel" in model.loss_names and model.travel_queue.size == 63
    assert math.isclose(model.lambda_travel, 0.001 * 63 / 900)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        model.set_input(torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1)
        model.forward()
        model.netG_A.zero_grad()
        model.backward_G()  # travel backward with retain_graph, then the framework's, on one graph
        travel = float(model.loss_travel.detach())
        assert travel == 0.0 if step == 0 else 0.0 < travel <= 2.0  # one image: no pair before the queue fills
        assert all(torch.isfinite(p.grad).all() for p in model.netG_A.parameters())
    assert len(model.travel_queue) == 3
