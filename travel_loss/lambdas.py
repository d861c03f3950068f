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
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "PAPER_BATCH_SIZE",
    "PAPER_PATCHES",
    "AdaptiveLambda",
    "DiscriminatorGapLambda",
    "GradientBalancedLambda",
    "discriminator_gap",
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


@runtime_checkable
class AdaptiveLambda(Protocol):
    """What a training step needs of an adaptive lambda (:class:`GradientBalancedLambda`,
    :class:`DiscriminatorGapLambda`): called once per generator step, before the backward."""

    @property
    def value(self) -> float | None: ...

    @property
    def computes_next(self) -> bool:
        """Whether the next :meth:`update` needs the two losses' gradient norms at ``parameter``."""
        ...

    def update(self, adv_loss: Tensor, travel_loss: Tensor) -> float: ...

    def update_from_norms(self, adv_norm: Tensor | None, travel_norm: Tensor | None) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_GAN_LOSSES = ("bce", "lsgan", "hinge")


def discriminator_gap(real_logits: Tensor, fake_logits: Tensor, gan_loss: str = "bce") -> Tensor:
    r"""How well the discriminator tells real target images from translations, in [-1, 1].

    Each logit is read as the discriminator's belief that its patch is real, on the scale its loss
    trains it to: :math:`\sigma(\ell)` for ``"bce"``; :math:`\ell` clipped to [0, 1] for ``"lsgan"``
    (targets 1 and 0); :math:`(\operatorname{clip}(\ell, -1, 1) + 1) / 2` for ``"hinge"`` (margins
    +-1). The gap is the mean belief over ``real_logits`` minus the mean over ``fake_logits``
    (any shapes, every entry one patch): 0 when D cannot tell them apart, 1 when it is certain of
    every patch. Returns a 0-D float32 tensor on the logits' device (no host synchronisation).
    """
    if gan_loss not in _GAN_LOSSES:
        raise ValueError(f"gan_loss: expected one of {', '.join(_GAN_LOSSES)}, got {gan_loss!r}")
    for name, logits in (("real_logits", real_logits), ("fake_logits", fake_logits)):
        if not isinstance(logits, Tensor) or logits.numel() == 0 or not logits.is_floating_point():
            raise ValueError(f"{name}: expected a non-empty floating-point tensor, got {_describe(logits)}")

    def belief(logits: Tensor) -> Tensor:
        logits = logits.detach().float()
        if gan_loss == "bce":
            return torch.sigmoid(logits)
        if gan_loss == "lsgan":
            return logits.clamp(0.0, 1.0)
        return (logits.clamp(-1.0, 1.0) + 1.0) / 2.0

    return belief(real_logits).mean() - belief(fake_logits).mean()


class DiscriminatorGapLambda:
    r"""Lambda as large as realism allows: raised while the discriminator cannot tell translations
    from real target images by more than ``target_gap``, lowered while it can.

    The travel term and the adversarial term pull against each other: a larger lambda keeps more
    of each input (fewer flips) until the translations stop looking like the target domain. This
    rule states the trade-off in the discriminator's own terms. After every discriminator step
    it reads the gap :math:`g_t` (:func:`discriminator_gap`: mean belief "real" on real images
    minus that on translations, 0 = indistinguishable, 1 = always told apart) and moves lambda
    multiplicatively, an integral controller on :math:`\log \lambda`:

    .. math::  \lambda_{t+1} = \operatorname{clip}\bigl(\lambda_t\, e^{\eta\,(g^* - g_t)},
               \lambda_\min, \lambda_\max\bigr), \qquad \lambda_0 = \text{initial},

    except during the first ``warmup`` observations, where lambda stays at ``initial``: early on
    every translation is easy to spot whatever lambda is (the generator has not yet learned the
    target's look), and lowering lambda then would only let content go.

    A gap held above :math:`g^*` (the translations are easy to spot) lowers lambda by a factor
    :math:`e^{\eta (g_t - g^*)}` per step; below it, lambda grows. What it guarantees: lambda
    settles where the discriminator separates real from translated images by about :math:`g^*`
    (if any lambda in the range gets there); what it does not: that this lambda keeps every
    input's content (a travel term that a generator can satisfy without keeping content, e.g. an
    embedder blind to what changed, is not helped by any lambda). Starting high (``initial``)
    holds the content while the generator first learns the target's look; the controller then
    gives up consistency only as far as realism demands.

    Cost: no extra backward pass (unlike :class:`GradientBalancedLambda`), one scalar all-reduce
    (under DDP) and one host synchronisation per :meth:`observe`.

    Args:
        target_gap: :math:`g^* \in (0, 1)`.
        initial: :math:`\lambda_0 > 0`, the value before the first observation.
        rate: :math:`\eta > 0`, the step of :math:`\log\lambda` per unit of gap error.
        warmup: observations at ``initial`` before the controller starts (the trainer: a fifth
            of the run's steps).
        min_value, max_value: :math:`0 < \lambda_\min \le \lambda_0 \le \lambda_\max`.
        distributed: inside an initialised ``torch.distributed`` process group, average
            :math:`g_t` over the ranks so that every process keeps the same lambda.

    Use::

        rule = DiscriminatorGapLambda()
        for real_a, real_b in data:
            ...generator step with lam = rule.value...
            real_logits, fake_logits = D(real_b), D(fake.detach())
            ...discriminator step...
            rule.observe(discriminator_gap(real_logits, fake_logits, "bce"))
    """

    computes_next = False  # never needs gradient norms (AdaptiveLambda)

    def __init__(
        self,
        *,
        target_gap: float = 0.5,
        initial: float = 3.0,
        rate: float = 0.05,
        warmup: int = 0,
        min_value: float = 1e-4,
        max_value: float = 1e4,
        distributed: bool = True,
    ) -> None:
        for name, value in (("target_gap", target_gap), ("initial", initial), ("rate", rate)):
            _check_real(name, value)
        _check_real("min_value", min_value)
        _check_real("max_value", max_value)
        if not 0.0 < target_gap < 1.0:
            raise ValueError(f"target_gap: expected a number in (0, 1), got {target_gap!r}")
        if not rate > 0:
            raise ValueError(f"rate: expected a positive number, got {rate!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
        if not 0 < min_value <= initial <= max_value:
            raise ValueError(
                f"min_value, initial, max_value: expected 0 < min_value <= initial <= max_value, "
                f"got {min_value!r}, {initial!r}, {max_value!r}"
            )
        self.target_gap, self.initial, self.rate = float(target_gap), float(initial), float(rate)
        self.warmup = warmup
        self.min_value, self.max_value = float(min_value), float(max_value)
        self.distributed = bool(distributed)
        self._value = self.initial
        self._count = 0
        self.last_gap: float | None = None

    @property
    def value(self) -> float:
        return self._value

    def observe(self, gap: Tensor | float) -> float:
        """Advance by one discriminator step with its gap :math:`g_t` (a 0-D tensor or float) and
        return the new lambda. A non-finite gap (diverged logits) leaves lambda and the count as
        they are (the training loop's own checks report the divergence)."""
        if isinstance(gap, Tensor):
            if gap.numel() != 1:
                raise ValueError(f"gap: expected a scalar, got {_describe(gap)}")
            gap_tensor = gap.detach().double().reshape(())
        else:
            _check_real("gap", gap)
            gap_tensor = torch.tensor(float(gap), dtype=torch.float64)
        if self.distributed and dist.is_available() and dist.is_initialized():
            gap_tensor = gap_tensor.clone()
            dist.all_reduce(gap_tensor)
            gap_tensor /= dist.get_world_size()
        observed = float(gap_tensor)  # the one host sync
        self.last_gap = observed
        if not math.isfinite(observed):  # diverged logits: lambda stays; reporting it is the caller's job
            return self.value
        if self._count >= self.warmup:
            moved = self._value * math.exp(self.rate * (self.target_gap - observed))
            self._value = min(max(moved, self.min_value), self.max_value)
        self._count += 1
        return self.value

    def update(self, adv_loss: Tensor, travel_loss: Tensor) -> float:
        """The current lambda (the losses are not used: this rule moves in :meth:`observe`)."""
        del adv_loss, travel_loss
        return self.value

    def update_from_norms(self, adv_norm: Tensor | None, travel_norm: Tensor | None) -> float:
        """The current lambda (see :meth:`update`)."""
        del adv_norm, travel_norm
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Plain python types only (safe under ``torch.load(weights_only=True)``)."""
        return {
            "target_gap": self.target_gap,
            "initial": self.initial,
            "rate": self.rate,
            "warmup": self.warmup,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "value": self._value,
            "count": self._count,
            "last_gap": self.last_gap,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda and the counters; the settings must equal this object's, except ``warmup``
        (a schedule: a run resumed with more steps may have a longer one)."""
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected a dict with keys {sorted(expected)}, got {got}")
        for key in ("target_gap", "initial", "rate", "min_value", "max_value"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state: {key} = {state[key]!r} was saved but this object has {getattr(self, key)!r}; "
                    f"construct DiscriminatorGapLambda with the saved settings to resume"
                )
        self._value = float(state["value"])
        self._count = int(state["count"])
        self.last_gap = None if state["last_gap"] is None else float(state["last_gap"])

    def __repr__(self) -> str:
        return (
            f"DiscriminatorGapLambda(target_gap={self.target_gap}, initial={self.initial}, rate={self.rate}, "
            f"warmup={self.warmup}, "
            f"min_value={self.min_value}, max_value={self.max_value}, value={self.value:.4g})"
        )
