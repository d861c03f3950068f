"""CUT and FastCUT with the travel loss: a model file for taesungp/contrastive-unpaired-translation.

Install: ``pip install travel-loss``, copy this file into the framework's ``models/`` folder
(beside ``cut_model.py``) and train with ``python train.py --model travel_cut ...``
(``--CUT_mode CUT`` or ``FastCUT`` as usual). Test with ``--model cut`` or ``--model travel_cut``:
the test phase loads ``netG`` only and builds no encoder.

Flags (training only), next to CUT's own:

- ``--lambda_travel X|auto``: weight of the travel term of netG. ``auto`` (default):
  :class:`travel_loss.GradientBalancedLambda` at netG's last layer, balancing the travel gradient
  against ``loss_G_GAN``'s (two extra backward passes to that layer per step).
- ``--travel_queue K``: each image is also paired with the last K earlier ones (default 63;
  with 0 at ``--batch_size`` >= 2 the term is exactly ``travel_loss`` of the batch).
- ``--travel_encoder ID``: hub id or folder of the frozen encoder (CLIP, SigLIP, DINOv2/v3, ViT;
  default ``openai/clip-vit-large-patch14``).

What the file takes care of:

- The source of each translation is the batch netG actually translated: ``forward()`` translates
  ``self.real`` (``real_A``, with ``real_B`` appended under ``--nce_idt``, and mirrored as a whole
  half of the time under FastCUT's ``--flip_equivariance``), and ``fake_B`` is its first part.
  ``self.real_A`` would pair a source with the translation of its mirror image.
- ``train.py`` first calls ``data_dependent_initialize(first batch)``, which runs
  ``compute_G_loss``, and then trains on the same batch: the travel term is left out of that
  call, so the queue starts empty and no image is ever paired with its own copy.
- ``save_networks``/``load_networks`` also write/read ``{epoch}_travel_queue.pt`` (the queue's
  ``state_dict`` and the balanced lambda's state, never the encoder), so ``--continue_train``
  resumes with the same partners and the same lambda average.
- The encoder is a plain attribute of the model: not in ``model_names``, so not re-initialised,
  parallelised, saved or optimised by the framework.

Checked against taesungp/contrastive-unpaired-translation commit b3ac297 (2023-09-05) with its own
train.py, options and create_model on CPU: CUT and FastCUT, --nce_idt on and off, flipped and not,
batch 1 and 2, save and --continue_train, netG's gradient against a hand computation. On CPU that
commit's own --continue_train fails for every model (parallelize() wraps the nets in DataParallel,
so save_networks writes "module."-prefixed keys that load_networks rejects); on GPU it resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from models.cut_model import CUTModel

from travel_loss import FrozenEncoder, GradientBalancedLambda, TravelQueue
from travel_loss.lambdas import last_layer_weight

QUEUE_FILE = "%s_travel_queue.pt"  # % epoch, beside the framework's "%s_net_%s.pth"


def lambda_travel_flag(text: str) -> float | str:
    """``--lambda_travel``: a finite number >= 0, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}")
    return value


def queue_size_flag(text: str) -> int:
    """``--travel_queue``: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 (earlier images kept), got {text!r}")
    return value


def flag_error(flag: str, message: str) -> None:
    """One line naming the flag, and exit status 2, as argparse does for a bad flag."""
    print(f"error: {flag}: {message}", file=sys.stderr)
    raise SystemExit(2)


class TravelCUTModel(CUTModel):
    """CUT / FastCUT with ``lambda * travel(real, fake_B)`` added to ``compute_G_loss``."""

    @staticmethod
    def modify_commandline_options(parser, is_train=True):
        parser = CUTModel.modify_commandline_options(parser, is_train)
        if is_train:
            parser.add_argument(
                "--lambda_travel",
                type=lambda_travel_flag,
                default="auto",
                help="weight of the travel loss: a number >= 0, or auto (gradient-balanced against loss_G_GAN)",
            )
            parser.add_argument(
                "--travel_queue",
                type=queue_size_flag,
                default=63,
                help="pair each image also with the last K earlier ones (0 at batch >= 2: the batch's pairs only)",
            )
            parser.add_argument(
                "--travel_encoder",
                type=str,
                default="openai/clip-vit-large-patch14",
                help="hub id or folder of the frozen encoder (CLIP, SigLIP, DINOv2/v3, ViT)",
            )
        return parser

    def __init__(self, opt):
        super().__init__(opt)
        self.loss_names.append("travel")
        self.loss_travel: float | torch.Tensor = 0.0  # printed by get_current_losses
        self.travel_active = False
        if not self.isTrain:
            return
        if opt.batch_size < 2 and opt.travel_queue == 0:
            flag_error("--travel_queue", "0 leaves a batch of 1 without pairs; use K >= 1 at --batch_size 1")
        if opt.input_nc != 3 or opt.output_nc != 3:
            flag_error(
                "--input_nc/--output_nc", f"the travel encoder takes RGB images, got {opt.input_nc}/{opt.output_nc}"
            )
        if opt.lambda_travel == "auto" and not opt.lambda_GAN > 0:
            flag_error("--lambda_travel", "auto balances against the GAN loss, which --lambda_GAN 0 switches off")
        # Plain attributes, not net* entries of model_names: the framework never initialises,
        # wraps, saves or optimises them.
        self.travel_encoder = FrozenEncoder(opt.travel_encoder).to(self.device)
        self.travel_queue = TravelQueue(size=opt.travel_queue).to(self.device)
        self.travel_balance = None
        if opt.lambda_travel == "auto":
            self.travel_balance = GradientBalancedLambda(last_layer_weight(self.netG))
        self.travel_active = True

    def data_dependent_initialize(self, data):
        # train.py runs this on its first batch and then trains on that same batch: without the
        # travel term here the queue starts empty and that batch is not paired with its copy.
        self.travel_active = False
        try:
            super().data_dependent_initialize(data)
        finally:
            self.travel_active = self.isTrain

    def compute_G_loss(self):
        loss_G = super().compute_G_loss()
        if not self.travel_active:
            return loss_G
        # fake_B = netG(self.real)[:n]: its source is self.real[:n], flipped or not.
        source = self.real[: self.fake_B.shape[0]]
        with torch.no_grad():
            emb_src = self.travel_encoder(source)
        travel = self.travel_queue(emb_src, self.travel_encoder(self.fake_B))
        if self.travel_balance is None:
            self.lambda_travel = float(self.opt.lambda_travel)
        else:
            self.lambda_travel = self.travel_balance.update(self.loss_G_GAN, travel)
        self.loss_travel = travel
        self.loss_G = loss_G + self.lambda_travel * travel
        return self.loss_G

    def save_networks(self, epoch):
        super().save_networks(epoch)
        if self.isTrain:
            state = {
                "queue": self.travel_queue.state_dict(),
                "lambda": None if self.travel_balance is None else self.travel_balance.state_dict(),
            }
            path = os.path.join(self.save_dir, QUEUE_FILE % epoch)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: a crash leaves the previous file whole

    def load_networks(self, epoch):
        super().load_networks(epoch)
        if not self.isTrain:
            return
        load_dir = self.save_dir  # where CUT's load_networks reads the networks from
        if self.opt.pretrained_name is not None:
            load_dir = os.path.join(self.opt.checkpoints_dir, self.opt.pretrained_name)
        path = os.path.join(load_dir, QUEUE_FILE % epoch)
        if not os.path.exists(path):
            print(f"no {path}: the travel queue starts empty")
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.travel_queue.load_state_dict(state["queue"])
        if self.travel_balance is not None and state["lambda"] is not None:
            self.travel_balance.load_state_dict(state["lambda"])
        print(f"loaded the travel queue ({len(self.travel_queue)} rows) from {path}")
