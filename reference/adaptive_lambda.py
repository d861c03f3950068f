r"""Automatic choice of the travel-loss weight lambda by balancing gradient norms.

The implementation lives in :mod:`travel_loss.lambdas` (installed with the package); this module
re-exports it for the reference code.

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

from travel_loss.lambdas import GradientBalancedLambda, last_layer_weight

__all__ = ["GradientBalancedLambda", "last_layer_weight"]
