"""CycleGAN with the travel loss: a model file for junyanz/pytorch-CycleGAN-and-pix2pix.

Install: ``pip install travel-loss``, copy this file into the framework's ``models/`` folder
(beside ``cycle_gan_model.py``) and train with ``python train.py --model travel_cycle_gan ...``.
Test with ``--model test`` or ``--model travel_cycle_gan`` as for CycleGAN: the test phase loads
the generators only and builds no encoder.

Flags (training only), next to CycleGAN's own:

- ``--lambda_travel X|auto``: weight of the travel term of G_A (A -> B). ``auto`` (default):
  :class:`travel_loss.GradientBalancedLambda` at G_A's last layer, balancing the travel gradient
  against ``loss_G_A``'s (one extra D_A forward and two backward passes to that layer per step).
- ``--travel_queue K``: each image is also paired with the last K earlier ones (default 63;
  with 0 at ``--batch_size`` >= 2 the term is exactly ``travel_loss`` of the batch).
- ``--travel_encoder ID``: hub id or folder of the frozen encoder (CLIP, SigLIP, DINOv2/v3, ViT;
  default ``openai/clip-vit-large-patch14``).

What the file takes care of:

- ``backward_G`` backwards the travel term first with ``retain_graph=True`` (G_A's graph is
  shared with CycleGAN's losses), then runs CycleGAN's own ``backward_G``: the gradients add up to
  those of ``loss_G + lambda * travel``.
- ``save_networks``/``load_networks`` also write/read ``{epoch}_travel_queue.pt`` (the queue's
  ``state_dict`` and the balanced lambda's state, never the encoder), so ``--continue_train``
  resumes with the same partners and the same lambda average.
- The encoder is a plain attribute of the model: not in ``model_names``, so not initialised,
  saved or optimised by the framework. CycleGAN's ``train.py`` has no initialisation pass
  before training, so the queue starts empty on the first step.

Checked against junyanz/pytorch-CycleGAN-and-pix2pix commit 00d5574 (2021-11-17) with its own
train.py, options, create_model and test.py on CPU: batch 1 and 2, save and --continue_train, the
generators' gradients against a hand computation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from models.cycle_gan_model import CycleGANModel

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


class TravelCycleGANModel(CycleGANModel):
    """CycleGAN with ``lambda * travel(real_A, fake_B)`` added to the generators' loss."""

    @staticmethod
    def modify_commandline_options(parser, is_train=True):
        parser = CycleGANModel.modify_commandline_options(parser, is_train)
        if is_train:
            parser.add_argument(
                "--lambda_travel",
                type=lambda_travel_flag,
                default="auto",
                help="weight of the travel loss: a number >= 0, or auto (gradient-balanced against loss_G_A)",
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
        if not self.isTrain:
            return
        if opt.batch_size < 2 and opt.travel_queue == 0:
            flag_error("--travel_queue", "0 leaves a batch of 1 without pairs; use K >= 1 at --batch_size 1")
        if opt.input_nc != 3 or opt.output_nc != 3:
            flag_error(
                "--input_nc/--output_nc", f"the travel encoder takes RGB images, got {opt.input_nc}/{opt.output_nc}"
            )
        # Plain attributes, not net* entries of model_names: the framework never initialises,
        # saves or optimises them.
        self.travel_encoder = FrozenEncoder(opt.travel_encoder).to(self.device)
        self.travel_queue = TravelQueue(size=opt.travel_queue).to(self.device)
        self.travel_balance = None
        if opt.lambda_travel == "auto":
            self.travel_balance = GradientBalancedLambda(last_layer_weight(self.netG_A))

    def backward_G(self):
        with torch.no_grad():
            emb_src = self.travel_encoder(self.real_A)
        travel = self.travel_queue(emb_src, self.travel_encoder(self.fake_B))
        if self.travel_balance is None:
            self.lambda_travel = float(self.opt.lambda_travel)
        else:
            # loss_G_A as CycleGAN's backward_G computes it (D_A is frozen here), for its gradient only.
            adversarial = self.criterionGAN(self.netD_A(self.fake_B), True)
            self.lambda_travel = self.travel_balance.update(adversarial, travel)
        (self.lambda_travel * travel).backward(retain_graph=True)
        self.loss_travel = travel
        super().backward_G()  # CycleGAN's losses; the gradients add up

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
        path = os.path.join(self.save_dir, QUEUE_FILE % epoch)
        if not os.path.exists(path):
            print(f"no {path}: the travel queue starts empty")
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.travel_queue.load_state_dict(state["queue"])
        if self.travel_balance is not None and state["lambda"] is not None:
            self.travel_balance.load_state_dict(state["lambda"])
        print(f"loaded the travel queue ({len(self.travel_queue)} rows) from {path}")
