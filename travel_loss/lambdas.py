r"""Choosing the travel-loss weight lambda: the paper's values in this library's convention, and
an automatic choice by gradient balancing.

Lambda conventions
==================

The paper's lambda multiplies *summed* losses (the generator's BCE summed over the whole
:math:`N \times P` PatchGAN logit map, the travel term summed over the :math:`N(N-1)` ordered
pairs). :func:`travel_loss.travel_loss` averages over pairs by default and the usual
adversarial losses average over logits, so the same objective needs

.. math::  \lambda_\mathrm{mean} = \lambda_\mathrm{paper} \, \frac{N - 1}{P}
           \qquad (N = 128,\ P = 30^2 = 900:\ \lambda_\mathrm{mean} = 0.1411\, \lambda_\mathrm{paper}),

because :math:`J_\mathrm{paper} = NP\,(A + \lambda_\mathrm{paper}\frac{N-1}{P} T)` with the means
:math:`A` and :math:`T`: the same gradient direction at every step, and Adam ignores the common
factor :math:`NP`. N is the global batch (all ranks under DDP), P the discriminator logits per
image (900 for the 3-layer PatchGAN at 256 px, CycleGAN's and CUT's default discriminator).
:func:`paper_to_mean_lambda` and :func:`mean_to_paper_lambda` apply the formula.

Gradient-balanced lambda
========================

The paper chooses lambda by hand and names its automatic choice as future work. This module
offers one principled rule: give the travel term a gradient of the same size as the
adversarial term's, measured where both act on the generator: at a tensor :math:`\theta` that
both losses depend on, by default the weight of the generator's last layer
(:func:`last_layer_weight`). At update t,

.. math::

    r_t = \operatorname{clip}\Bigl(s \cdot \frac{\|\nabla_\theta L_\mathrm{adv}\|_2}
                                         {\|\nabla_\theta L_\mathrm{travel}\|_2 + \varepsilon},
                                   \lambda_\min, \lambda_\max\Bigr),

    m_t = \beta\, m_{t-1} + (1 - \beta)\, r_t, \quad m_0 = 0, \qquad
    \lambda_t = \frac{m_t}{1 - \beta^t},

an exponential moving average with momentum :math:`\beta` and Adam's bias correction, so that
:math:`\lambda_1 = r_1` exactly. Without smoothing (:math:`\beta = 0`) and with scale
:math:`s = 1`, :math:`\|\lambda_t \nabla_\theta L_\mathrm{travel}\| = \|\nabla_\theta
L_\mathrm{adv}\|`: the two terms pull on the last layer equally hard, and ``scale`` sets how
much harder the travel term should pull. The same idea weights the adaptive perceptual /
adversarial balance of VQGAN (Esser et al., 2021).

Use in a generator step::

    balance = GradientBalancedLambda(last_layer_weight(generator))
    ...
    adversarial, travel = ..., travel_loss(emb_src, encoder(fake))
    lam = balance.update(adversarial, travel)          # a python float, no gradient through it
    (adversarial + lam * travel).backward()

Cost: each computed update runs two extra backward passes from the losses to :math:`\theta`
(``torch.autograd.grad(..., retain_graph=True)``), i.e. through the discriminator and through
the frozen encoder once more, and one device-to-host synchronisation (the returned float).
With a large encoder (CLIP ViT-L/14) that is a noticeable fraction of a step; ``every=k``
recomputes the ratio only on every k-th call and returns the current value in between.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "PAPER_BATCH_SIZE",
    "PAPER_PATCHES",
    "GradientBalancedLambda",
    "last_layer_weight",
    "mean_to_paper_lambda",
    "paper_to_mean_lambda",
]

PAPER_BATCH_SIZE = 128
# Logits per image of the 3-layer 70 x 70 PatchGAN at 256 px: 256 -> 128 -> 64 -> 32 -> 31 -> 30.
PAPER_PATCHES = 30 * 30


def paper_to_mean_lambda(
    lambda_paper: float, *, batch_size: int = PAPER_BATCH_SIZE, patches: int | None = None
) -> float:
    r""":math:`\lambda_\mathrm{mean} = \lambda_\mathrm{paper} (N - 1) / P`: the paper's summed-loss lambda in
    this library's mean convention (N: global batch, P: logits per image, default
    :data:`PAPER_PATCHES` = 900, the 3-layer PatchGAN at 256 px)."""
    n, p = _check_batch_and_patches(batch_size, patches)
    return _check_lambda(lambda_paper) * (n - 1) / p


def mean_to_paper_lambda(
    lambda_mean: float, *, batch_size: int = PAPER_BATCH_SIZE, patches: int | None = None
) -> float:
    r"""The inverse of :func:`paper_to_mean_lambda`:
    :math:`\lambda_\mathrm{paper} = \lambda_\mathrm{mean} P / (N - 1)`."""
    n, p = _check_batch_and_patches(batch_size, patches)
    return _check_lambda(lambda_mean) * p / (n - 1)


def _check_batch_and_patches(batch_size: int, patches: int | None) -> tuple[int, int]:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
        raise ValueError(
            f"batch_size: expected an int >= 2 (the global batch; pairs need two images), got {batch_size!r}"
        )
    patches = PAPER_PATCHES if patches is None else patches
    if not isinstance(patches, int) or isinstance(patches, bool) or patches < 1:
        raise ValueError(f"patches: expected an int >= 1 (logits per image), got {patches!r}")
    return batch_size, patches


def _check_lambda(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"lambda: expected a finite number >= 0, got {value!r}")
    return float(value)


def last_layer_weight(module: nn.Module) -> Tensor:
    """The weight of the last convolution or linear layer of ``module`` in registration order.

    For a ResNet generator (``reference.models.ResnetGenerator``) this is the 7x7 output convolution before
    the tanh, the layer every output pixel depends on.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if not layers:
        raise ValueError(f"module: expected at least one convolution or linear layer in {type(module).__name__}")
    return layers[-1].weight


class GradientBalancedLambda:
    r"""Lambda that balances the adversarial and travel gradient norms at ``parameter``.

    Args:
        parameter: the tensor :math:`\theta` at which gradient norms are compared, usually
            :func:`last_layer_weight` of the generator; it must require grad.
        momentum: :math:`\beta \in [0, 1)` of the moving average (0: no smoothing).
        scale: :math:`s > 0`, the wanted ratio of travel to adversarial gradient norm.
        min_value, max_value: clip range of each raw ratio :math:`r_t` (``max_value=None``:
            no upper bound). Clipping before averaging keeps :math:`\lambda_t` in the range too.
            A travel gradient that vanishes (or underflows in float16 without loss scaling;
            the ratio is invariant to scaling both losses by one factor) makes :math:`r_t`
            huge: set ``max_value`` where that can happen.
        eps: :math:`\varepsilon > 0` in the denominator.
        every: recompute on every ``every``-th call of :meth:`update` (calls 0, k, 2k, ...);
            other calls return the current value without any work.
        distributed: inside an initialised ``torch.distributed`` process group, average the raw
            ratio :math:`r_t` over all ranks (one all-reduce of a scalar per computed update), so
            that every process uses the same lambda and keeps the same state; without a
            process group this does nothing.

    Attributes:
        value: the current :math:`\lambda_t` as a python float, ``None`` before the first update.
    """

    def __init__(
        self,
        parameter: Tensor,
        *,
        momentum: float = 0.9,
        scale: float = 1.0,
        min_value: float = 0.0,
        max_value: float | None = None,
        eps: float = 1e-12,
        every: int = 1,
        distributed: bool = True,
    ) -> None:
        if not isinstance(parameter, Tensor):
            raise TypeError(f"parameter: expected a torch.Tensor, got {type(parameter).__name__}")
        if not parameter.requires_grad:
            raise ValueError("parameter: expected a tensor that requires grad (e.g. the generator's last layer weight)")
        _check_real("momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        _check_real("scale", scale)
        if not scale > 0:
            raise ValueError(f"scale: expected a positive number, got {scale!r}")
        _check_real("min_value", min_value)
        if not min_value >= 0:
            raise ValueError(f"min_value: expected a non-negative number, got {min_value!r}")
        if max_value is not None:
            _check_real("max_value", max_value)
            if not max_value >= min_value:
                raise ValueError(f"max_value: expected None or a number >= min_value = {min_value}, got {max_value!r}")
        _check_real("eps", eps)
        if not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.parameter = parameter
        self.momentum, self.scale, self.eps, self.every = float(momentum), float(scale), float(eps), every
        self.min_value = float(min_value)
        self.distributed = bool(distributed)
        self.max_value = None if max_value is None else float(max_value)
        self._average = 0.0  # m_t, the biased moving average
        self._count = 0  # t, number of computed updates
        self._calls = 0  # number of update() calls, computed or not
        self.last_ratio: float | None = None  # r_t of the latest computed update

    @property
    def value(self) -> float | None:
        if self._count == 0:
            return None
        return self._average / (1.0 - self.momentum**self._count)

    def gradient_norms(self, adv_loss: Tensor, travel_loss: Tensor) -> tuple[Tensor, Tensor]:
        r"""(:math:`\|\nabla_\theta L_\mathrm{adv}\|`, :math:`\|\nabla_\theta L_\mathrm{travel}\|`) as 0-D
        tensors, graphs kept."""
        norms = []
        for name, loss in (("adv_loss", adv_loss), ("travel_loss", travel_loss)):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"{name}: expected a scalar tensor, got {_describe(loss)}")
            if not loss.requires_grad:
                raise ValueError(f"{name}: expected a loss with a graph back to parameter, got a tensor without grad")
            (gradient,) = torch.autograd.grad(loss, self.parameter, retain_graph=True, allow_unused=True)
            if gradient is None:
                raise ValueError(f"{name}: does not depend on parameter (its gradient there is None)")
            norms.append(torch.linalg.vector_norm(gradient.detach().double()))
        return norms[0], norms[1]

    def update(self, adv_loss: Tensor, travel_loss: Tensor) -> float:
        """Advance by one generator step and return the smoothed lambda (see the module docstring).

        Both losses keep their graphs (``retain_graph=True``), so ``(adv + lam * travel).backward()``
        can follow. On calls skipped by ``every`` no gradient is computed and the current value
        is returned.
        """
        if not self.computes_next:
            return self.update_from_norms(None, None)
        return self.update_from_norms(*self.gradient_norms(adv_loss, travel_loss))

    @property
    def computes_next(self) -> bool:
        """Whether the next :meth:`update` computes gradient norms (``False`` on calls skipped by ``every``)."""
        return self._calls % self.every == 0 or self._count == 0

    def update_from_norms(self, adv_norm: Tensor | None, travel_norm: Tensor | None) -> float:
        r""":meth:`update` from :math:`\|\nabla_\theta L_\mathrm{adv}\|` and :math:`\|\nabla_\theta L_\mathrm{travel}\|`
        computed elsewhere (e.g. summed over micro-batches); 0-D tensors. On calls skipped by
        ``every`` (:attr:`computes_next` is ``False``) they are not used: pass ``None``.
        """
        if not self.computes_next:
            self._calls += 1
            return self.value  # type: ignore[return-value]
        if not isinstance(adv_norm, Tensor) or not isinstance(travel_norm, Tensor):
            raise ValueError(
                f"adv_norm, travel_norm: expected two 0-D tensors on a computed update, got "
                f"{type(adv_norm).__name__} and {type(travel_norm).__name__}"
            )
        # A travel term without gradient (no pair yet: a TravelQueue's first step at batch 1) says
        # nothing about the balance: such a rank does not vote, and with no vote the value stays.
        has_gradient = (travel_norm != 0).to(torch.float64)  # NaN votes, and then raises below
        ratio_here = self.scale * adv_norm.double() / (travel_norm.double() + self.eps)
        votes = torch.stack([ratio_here * has_gradient, has_gradient])
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(votes)  # every process must use the same lambda: average the ranks' ratios
        total, count = votes.tolist()  # the one host sync
        if count == 0:
            self._calls += 1
            return 0.0 if self.value is None else self.value
        ratio = total / count
        if not math.isfinite(ratio):
            raise ValueError(
                f"adv_loss, travel_loss: non-finite gradient norms at parameter "
                f"(ratio {ratio}); the losses hold NaN or infinite gradients"
            )
        ratio = max(ratio, self.min_value)
        if self.max_value is not None:
            ratio = min(ratio, self.max_value)
        self.last_ratio = ratio
        self._average = self.momentum * self._average + (1.0 - self.momentum) * ratio
        self._count += 1
        self._calls += 1
        return self.value  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        """Plain python types only (safe under ``torch.load(weights_only=True)``)."""
        return {
            "momentum": self.momentum,
            "scale": self.scale,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "eps": self.eps,
            "every": self.every,
            "average": self._average,
            "count": self._count,
            "calls": self._calls,
            "last_ratio": self.last_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moving average and counters; the settings must equal this object's."""
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected a dict with keys {sorted(expected)}, got {got}")
        for key in ("momentum", "scale", "min_value", "max_value", "eps", "every"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state: {key} = {state[key]!r} was saved but this object has {getattr(self, key)!r}; "
                    f"construct GradientBalancedLambda with the saved settings to resume"
                )
        self._average = float(state["average"])
        self._count = int(state["count"])
        self._calls = int(state["calls"])
        self.last_ratio = None if state["last_ratio"] is None else float(state["last_ratio"])

    def __repr__(self) -> str:
        return (
            f"GradientBalancedLambda(momentum={self.momentum}, scale={self.scale}, min_value={self.min_value}, "
            f"max_value={self.max_value}, every={self.every}, value={self.value})"
        )


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
