"""The CycleGAN and CUT model files in examples/, run against stand-ins of the two frameworks.

The stand-ins reproduce what the recipes depend on in junyanz/pytorch-CycleGAN-and-pix2pix and
taesungp/contrastive-unpaired-translation: ``modify_commandline_options`` on an argparse parser,
``BaseModel.setup`` loading ``{epoch}_net_{name}.pth`` on ``--continue_train``, CycleGAN's
``backward_G`` that backwards its own losses, CUT's ``data_dependent_initialize`` that runs
``compute_G_loss`` on the first batch (which train.py then trains on), and CUT's ``forward`` that
translates ``cat(real_A, real_B)`` under ``--nce_idt`` and mirrors it under
``--flip_equivariance``. They are injected as ``models.cycle_gan_model`` / ``models.cut_model``,
the modules the recipe files import.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from travel_loss import GradientBalancedLambda
from travel_loss.lambdas import last_layer_weight

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIZE = 32  # image side: the tiny CLIP's own resolution


# ------------------------------------------------------------------------------------------------
# stand-ins of the frameworks


class BaseModel:
    """Both frameworks' BaseModel: networks named in model_names are saved and loaded by epoch."""

    def __init__(self, opt):
        self.opt = opt
        self.isTrain = opt.isTrain
        self.device = torch.device("cpu")
        self.save_dir = os.path.join(opt.checkpoints_dir, opt.name)
        self.loss_names: list[str] = []
        self.model_names: list[str] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    @staticmethod
    def modify_commandline_options(parser, is_train):
        return parser

    def setup(self, opt):
        if not self.isTrain or opt.continue_train:
            self.load_networks(opt.epoch)

    def save_networks(self, epoch):
        for name in self.model_names:
            torch.save(getattr(self, "net" + name).state_dict(), os.path.join(self.save_dir, f"{epoch}_net_{name}.pth"))

    def load_networks(self, epoch):
        for name in self.model_names:
            path = os.path.join(self.save_dir, f"{epoch}_net_{name}.pth")
            getattr(self, "net" + name).load_state_dict(torch.load(path, weights_only=True))

    def set_requires_grad(self, nets, requires_grad=False):
        for net in nets if isinstance(nets, list) else [nets]:
            for parameter in net.parameters():
                parameter.requires_grad = requires_grad

    def set_input(self, data):
        self.real_A, self.real_B = data["A"], data["B"]


def generator() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())


def discriminator() -> nn.Module:
    return nn.Conv2d(3, 1, 4, stride=4)


def gan_loss(prediction, target_is_real):
    return ((prediction - float(target_is_real)) ** 2).mean()


class CycleGANModel(BaseModel):
    @staticmethod
    def modify_commandline_options(parser, is_train=True):
        if is_train:
            parser.add_argument("--lambda_A", type=float, default=10.0)
        return parser

    def __init__(self, opt):
        super().__init__(opt)
        self.loss_names = ["G_A", "cycle_A"]
        self.model_names = ["G_A", "G_B", "D_A", "D_B"] if self.isTrain else ["G_A", "G_B"]
        self.netG_A, self.netG_B = generator(), generator()
        if self.isTrain:
            self.netD_A, self.netD_B = discriminator(), discriminator()
            self.criterionGAN = gan_loss
            generators = itertools.chain(self.netG_A.parameters(), self.netG_B.parameters())
            self.optimizer_G = torch.optim.Adam(generators, lr=1e-3)
            self.optimizers.append(self.optimizer_G)

    def forward(self):
        self.fake_B = self.netG_A(self.real_A)
        self.rec_A = self.netG_B(self.fake_B)
        self.fake_A = self.netG_B(self.real_B)

    def backward_G(self):  # computes and backwards its own losses, as upstream does
        self.loss_G_A = self.criterionGAN(self.netD_A(self.fake_B), True)
        self.loss_G_B = self.criterionGAN(self.netD_B(self.fake_A), True)
        self.loss_cycle_A = F.l1_loss(self.rec_A, self.real_A) * self.opt.lambda_A
        self.loss_G = self.loss_G_A + self.loss_G_B + self.loss_cycle_A
        self.loss_G.backward()

    def optimize_parameters(self):
        self.forward()
        self.set_requires_grad([self.netD_A, self.netD_B], False)
        self.optimizer_G.zero_grad()
        self.backward_G()
        self.optimizer_G.step()


class CUTModel(BaseModel):
    @staticmethod
    def modify_commandline_options(parser, is_train=True):
        parser.add_argument("--CUT_mode", type=str, default="CUT")
        parser.add_argument("--lambda_GAN", type=float, default=1.0)
        parser.add_argument("--nce_idt", type=int, default=1)
        parser.add_argument("--flip_equivariance", type=int, default=0)
        return parser

    def __init__(self, opt):
        super().__init__(opt)
        self.loss_names = ["G_GAN", "G", "NCE"]
        self.model_names = ["G", "D"] if self.isTrain else ["G"]
        self.netG = generator()
        if self.isTrain:
            self.netD = discriminator()
            self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=1e-3)
            self.optimizers.append(self.optimizer_G)

    def data_dependent_initialize(self, data):
        """Upstream's first call on the first batch: forward, then the generator loss's backward."""
        self.set_input(data)
        self.forward()
        self.compute_G_loss().backward()

    def forward(self):
        self.real = torch.cat((self.real_A, self.real_B)) if self.opt.nce_idt and self.opt.isTrain else self.real_A
        if self.opt.flip_equivariance:
            self.flipped_for_equivariance = self.opt.isTrain and (np.random.random() < 0.5)
            if self.flipped_for_equivariance:
                self.real = torch.flip(self.real, [3])
        self.fake = self.netG(self.real)
        self.fake_B = self.fake[: self.real_A.size(0)]
        if self.opt.nce_idt:
            self.idt_B = self.fake[self.real_A.size(0) :]

    def compute_G_loss(self):
        self.loss_G_GAN = gan_loss(self.netD(self.fake_B), True) * self.opt.lambda_GAN
        self.loss_NCE = (self.fake_B - self.real[: self.fake_B.shape[0]]).abs().mean()  # stands for PatchNCE
        self.loss_G = self.loss_G_GAN + self.loss_NCE
        return self.loss_G

    def optimize_parameters(self):
        self.forward()
        self.set_requires_grad(self.netD, False)
        self.optimizer_G.zero_grad()
        self.loss_G = self.compute_G_loss()
        self.loss_G.backward()
        self.optimizer_G.step()


# ------------------------------------------------------------------------------------------------
# loading the recipe files as the frameworks do, and building models from command lines


@pytest.fixture
def recipes(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """The two recipe modules, imported against the stand-ins (fresh for every test)."""
    package = types.ModuleType("models")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "models", package)
    for name, cls in (("cycle_gan_model", CycleGANModel), ("cut_model", CUTModel)):
        module = types.ModuleType(f"models.{name}")
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    loaded = {}
    for name, path in (
        ("travel_cycle_gan_model", EXAMPLES / "cyclegan" / "travel_cycle_gan_model.py"),
        ("travel_cut_model", EXAMPLES / "cut" / "travel_cut_model.py"),
    ):
        spec = importlib.util.spec_from_file_location(f"models.{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        loaded[name] = module
    return types.SimpleNamespace(
        cycle_gan=loaded["travel_cycle_gan_model"].TravelCycleGANModel,
        cut=loaded["travel_cut_model"].TravelCUTModel,
    )


def parse(model_class, args: list[str], *, is_train: bool = True) -> argparse.Namespace:
    """The frameworks' option gathering: base flags, then the model's modify_commandline_options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="run")
    parser.add_argument("--checkpoints_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--input_nc", type=int, default=3)
    parser.add_argument("--output_nc", type=int, default=3)
    parser.add_argument("--epoch", default="latest")
    parser.add_argument("--continue_train", action="store_true")
    parser = model_class.modify_commandline_options(parser, is_train)
    opt = parser.parse_args(args)
    opt.isTrain, opt.gpu_ids, opt.pretrained_name = is_train, [], None
    os.makedirs(os.path.join(opt.checkpoints_dir, opt.name), exist_ok=True)
    return opt


def build(model_class, tmp_path, clip_dir, *args: str, is_train: bool = True):
    flags = ["--checkpoints_dir", str(tmp_path)] + (["--travel_encoder", str(clip_dir)] if is_train else [])
    opt = parse(model_class, [*flags, *args], is_train=is_train)
    torch.manual_seed(0)
    model = model_class(opt)
    return opt, model


def batches(n: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Asymmetric images in [-1, 1] (a mirror image is another image)."""
    generator = torch.Generator().manual_seed(1)
    return [
        {"A": torch.rand(n, 3, SIZE, SIZE, generator=generator) * 2 - 1, "B": torch.rand(n, 3, SIZE, SIZE) * 2 - 1}
        for _ in range(count)
    ]


def embed(model, images):
    with torch.no_grad():
        return model.travel_encoder(images)


def hand_travel(src, gen, queued_src, queued_gen):
    """Mean over current rows i and current-or-queued rows j != i of 1 - cos(s_i - s_j, g_i - g_j)."""
    all_src = src if queued_src is None else torch.cat([src, queued_src.to(src.dtype)])
    all_gen = gen if queued_gen is None else torch.cat([gen, queued_gen.to(gen.dtype)])
    terms = [
        1 - F.cosine_similarity(all_src[i] - all_src[j], all_gen[i] - all_gen[j], dim=0)
        for i in range(src.shape[0])
        for j in range(all_src.shape[0])
        if j != i
    ]
    return torch.stack(terms).mean()


def assert_gradients_close(got, want):
    """Largest deviation within 1e-4 of the largest gradient entry (float32 sums in another order)."""
    scale = max(float(w.abs().max()) for w in want)
    deviation = max(float((g - w).abs().max()) for g, w in zip(got, want))
    assert deviation <= 1e-4 * scale, (deviation, scale)


def gradients(parameters):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters]


def clear(parameters):
    for parameter in parameters:
        parameter.grad = None


def balanced_lambda(adversarial, travel, weight):
    """The gradient balance by hand: |d adversarial / d weight| / |d travel / d weight| (one step's ratio)."""
    (adv_grad,) = torch.autograd.grad(adversarial, weight, retain_graph=True)
    (travel_grad,) = torch.autograd.grad(travel, weight, retain_graph=True)
    return float(adv_grad.norm() / travel_grad.norm())


# ------------------------------------------------------------------------------------------------
# CUT


def test_cut_initialisation_call_leaves_the_queue_empty(recipes, tmp_path, tiny_clip_dir):
    """train.py's first batch goes through data_dependent_initialize and then trains: no image may
    meet its own copy, and the first step at batch 1 has no partner yet."""
    opt, model = build(recipes.cut, tmp_path, tiny_clip_dir, "--lambda_travel", "0.5")
    data = batches(1)
    model.data_dependent_initialize(data[0])
    model.setup(opt)
    assert len(model.travel_queue) == 0
    model.set_input(data[0])
    model.optimize_parameters()
    assert model.loss_travel.item() == 0.0 and len(model.travel_queue) == 1
    model.set_input(data[1])
    model.optimize_parameters()
    queued_src, _ = model.travel_queue.queued
    expected = torch.cat([embed(model, data[0]["A"]), embed(model, data[1]["A"])])
    torch.testing.assert_close(queued_src, expected.to(queued_src.dtype), rtol=1e-5, atol=1e-6)
    assert model.loss_travel.item() > 0


@pytest.mark.parametrize("nce_idt", [0, 1])
@pytest.mark.parametrize("flipped", [False, True])
def test_cut_source_is_the_batch_that_was_translated(recipes, tmp_path, tiny_clip_dir, monkeypatch, nce_idt, flipped):
    """Under flip equivariance fake_B = G(flip(real_A)): its source is flip(real_A), not real_A."""
    _, model = build(
        recipes.cut, tmp_path, tiny_clip_dir, "--batch_size", "2", "--travel_queue", "0", "--lambda_travel", "1",
        "--flip_equivariance", "1", "--nce_idt", str(nce_idt),
    )  # fmt: skip
    monkeypatch.setattr(np.random, "random", lambda: 0.0 if flipped else 0.9)
    data = batches(2)
    model.data_dependent_initialize(data[0])
    model.set_input(data[1])
    model.forward()
    assert model.flipped_for_equivariance == flipped
    loss = model.compute_G_loss()
    assert loss.requires_grad
    source = torch.flip(data[1]["A"], [3]) if flipped else data[1]["A"]
    with torch.no_grad():
        expected = hand_travel(embed(model, source), embed(model, model.fake_B), None, None)
        unflipped = hand_travel(embed(model, data[1]["A"]), embed(model, model.fake_B), None, None)
    assert model.loss_travel.item() == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    if flipped:  # the two pairings differ, so a recipe that used self.real_A fails here
        assert abs(float(expected) - float(unflipped)) > 1e-4


@pytest.mark.parametrize("lambda_travel", ["0.37", "auto"])
def test_cut_generator_gradient_is_that_of_loss_plus_lambda_travel(recipes, tmp_path, tiny_clip_dir, lambda_travel):
    _, model = build(recipes.cut, tmp_path, tiny_clip_dir, "--batch_size", "2", "--lambda_travel", lambda_travel)
    data = batches(2)
    model.data_dependent_initialize(data[0])
    model.set_input(data[0])
    model.optimize_parameters()  # one batch in the queue
    if lambda_travel == "auto":  # a fresh average: lambda is this step's ratio
        model.travel_balance = GradientBalancedLambda(last_layer_weight(model.netG))
    model.set_input(data[1])
    params = list(model.netG.parameters())
    queued_src, queued_gen = (t.clone() for t in model.travel_queue.queued)

    model.forward()
    clear(params)
    CUTModel.compute_G_loss(model).backward()
    framework = gradients(params)
    model.forward()
    clear(params)
    travel = hand_travel(embed(model, model.real_A), model.travel_encoder(model.fake_B), queued_src, queued_gen)
    lam = 0.37
    if lambda_travel == "auto":
        CUTModel.compute_G_loss(model)
        lam = balanced_lambda(model.loss_G_GAN, travel, last_layer_weight(model.netG))
        clear(params)
    travel.backward()
    travel_only = gradients(params)

    model.forward()
    clear(params)
    model.compute_G_loss().backward()
    assert model.loss_travel.item() == pytest.approx(travel.item(), rel=1e-5)
    assert model.lambda_travel == pytest.approx(lam, rel=1e-5)
    assert_gradients_close(gradients(params), [base + lam * extra for base, extra in zip(framework, travel_only)])


# ------------------------------------------------------------------------------------------------
# CycleGAN


@pytest.mark.parametrize("lambda_travel", ["0.37", "auto"])
def test_cycle_gan_generator_gradient_is_that_of_loss_plus_lambda_travel(
    recipes, tmp_path, tiny_clip_dir, lambda_travel
):
    opt, model = build(
        recipes.cycle_gan, tmp_path, tiny_clip_dir, "--batch_size", "2", "--lambda_travel", lambda_travel
    )
    data = batches(2)
    model.setup(opt)
    model.set_input(data[0])
    model.optimize_parameters()
    if lambda_travel == "auto":
        model.travel_balance = GradientBalancedLambda(last_layer_weight(model.netG_A))
    model.set_input(data[1])
    params_a, params_b = list(model.netG_A.parameters()), list(model.netG_B.parameters())
    params = params_a + params_b
    queued_src, queued_gen = (t.clone() for t in model.travel_queue.queued)

    model.forward()
    clear(params)
    CycleGANModel.backward_G(model)
    framework = gradients(params)
    model.forward()
    clear(params)
    travel = hand_travel(embed(model, model.real_A), model.travel_encoder(model.fake_B), queued_src, queued_gen)
    lam = 0.37
    if lambda_travel == "auto":
        lam = balanced_lambda(gan_loss(model.netD_A(model.fake_B), True), travel, last_layer_weight(model.netG_A))
    travel.backward()
    travel_only = gradients(params)

    model.forward()
    clear(params)
    model.backward_G()
    assert model.lambda_travel == pytest.approx(lam, rel=1e-5)
    assert all(float(g.abs().max()) == 0 for g in travel_only[len(params_a) :])  # the term is G_A's
    assert_gradients_close(gradients(params), [base + lam * extra for base, extra in zip(framework, travel_only)])


def test_cycle_gan_batch_1_pairs_with_earlier_images(recipes, tmp_path, tiny_clip_dir):
    opt, model = build(recipes.cycle_gan, tmp_path, tiny_clip_dir, "--travel_queue", "2", "--lambda_travel", "1")
    model.setup(opt)
    travel = []
    for data in batches(1):
        model.set_input(data)
        model.optimize_parameters()
        travel.append(model.loss_travel.item())
    assert travel[0] == 0.0 and all(value > 0 for value in travel[1:])
    assert len(model.travel_queue) == 2


# ------------------------------------------------------------------------------------------------
# both recipes: resume, the encoder outside the framework, flags


def train(model, data, *, initialise: bool):
    if initialise:
        model.data_dependent_initialize(data[0])
    for batch in data:
        model.set_input(batch)
        model.optimize_parameters()


@pytest.mark.parametrize("framework", ["cycle_gan", "cut"])
def test_continue_train_resumes_queue_and_lambda(recipes, tmp_path, tiny_clip_dir, framework):
    model_class = getattr(recipes, framework)
    opt, model = build(model_class, tmp_path, tiny_clip_dir, "--lambda_travel", "auto")
    model.setup(opt)
    train(model, batches(1, 3), initialise=framework == "cut")
    model.save_networks("latest")
    saved = sorted(os.listdir(model.save_dir))
    assert "latest_travel_queue.pt" in saved and not any(name.endswith(".tmp") for name in saved)
    state = torch.load(os.path.join(model.save_dir, "latest_travel_queue.pt"), weights_only=True)
    assert set(state) == {"queue", "lambda"} and list(state["queue"]) == ["_extra_state"]

    opt2, resumed = build(model_class, tmp_path, tiny_clip_dir, "--lambda_travel", "auto", "--continue_train")
    if framework == "cut":  # train.py: data_dependent_initialize first, then setup loads
        resumed.data_dependent_initialize(batches(1)[0])
    resumed.setup(opt2)
    for got, want in zip(resumed.travel_queue.queued, model.travel_queue.queued):
        assert torch.equal(got, want)
    assert len(resumed.travel_queue) == 3
    assert resumed.travel_balance.state_dict() == model.travel_balance.state_dict()
    assert resumed.travel_balance.value is not None and resumed.travel_balance.value > 0


@pytest.mark.parametrize("framework", ["cycle_gan", "cut"])
def test_missing_queue_file_starts_an_empty_queue(recipes, tmp_path, tiny_clip_dir, framework, capsys):
    model_class = getattr(recipes, framework)
    _, model = build(model_class, tmp_path, tiny_clip_dir)
    BaseModel.save_networks(model, "latest")  # networks only, as saved without the recipe
    opt2, resumed = build(model_class, tmp_path, tiny_clip_dir, "--continue_train")
    resumed.setup(opt2)
    assert len(resumed.travel_queue) == 0
    assert "the travel queue starts empty" in capsys.readouterr().out


@pytest.mark.parametrize("framework", ["cycle_gan", "cut"])
def test_encoder_is_frozen_and_outside_nets_optimizers_and_checkpoints(recipes, tmp_path, tiny_clip_dir, framework):
    _, model = build(getattr(recipes, framework), tmp_path, tiny_clip_dir, "--lambda_travel", "1")
    weights = list(model.travel_encoder.model.parameters())
    before = [w.clone() for w in weights]
    train(model, batches(1, 2), initialise=framework == "cut")
    model.save_networks("latest")
    assert weights and not any(w.requires_grad for w in weights)
    assert all(torch.equal(a, b) for a, b in zip(before, weights))
    ids = {id(w) for w in weights}
    in_optimizers = {id(p) for o in model.optimizers for group in o.param_groups for p in group["params"]}
    in_nets = {id(p) for name in model.model_names for p in getattr(model, "net" + name).parameters()}
    assert not ids & (in_optimizers | in_nets)
    for name in os.listdir(model.save_dir):
        state = torch.load(os.path.join(model.save_dir, name), weights_only=True)
        keys = state["queue"] if name.endswith("_travel_queue.pt") else state
        assert not any("vision_model" in key for key in keys), name


@pytest.mark.parametrize("framework", ["cycle_gan", "cut"])
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--lambda_travel", "lots"], "--lambda_travel"),
        (["--lambda_travel", "-1"], "--lambda_travel"),
        (["--travel_queue", "-3"], "--travel_queue"),
        (["--travel_queue", "0"], "--travel_queue"),  # batch 1 without a queue has no pairs
        (["--input_nc", "1"], "--input_nc"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(recipes, tmp_path, tiny_clip_dir, capsys, framework, args, flag):
    with pytest.raises(SystemExit) as exit_info:
        build(getattr(recipes, framework), tmp_path, tiny_clip_dir, *args)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_cut_auto_lambda_needs_the_gan_loss(recipes, tmp_path, tiny_clip_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build(recipes.cut, tmp_path, tiny_clip_dir, "--lambda_GAN", "0")
    assert exit_info.value.code == 2 and "--lambda_travel" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["cycle_gan", "cut"])
def test_test_phase_builds_no_encoder(recipes, tmp_path, tiny_clip_dir, framework):
    _, trained = build(getattr(recipes, framework), tmp_path, tiny_clip_dir, "--lambda_travel", "1")
    trained.save_networks("latest")
    opt, model = build(getattr(recipes, framework), tmp_path, tiny_clip_dir, is_train=False)
    model.setup(opt)
    assert not hasattr(model, "travel_encoder") and not hasattr(opt, "lambda_travel")
