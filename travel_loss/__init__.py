"""travel-loss: the CLIPTraVeLGAN transformation-vector loss and a frozen CLIP encoder.

- :func:`travel_loss` / :class:`TravelLoss`: the loss between (N, D) embeddings of a batch and
  of its translations; :func:`siamese_margin_loss` for a trainable (TraVeLGAN) embedder.
- :class:`RandomViews` (``TravelLoss(encoder=..., views=...)``, :func:`travel_loss_over_views`,
  :func:`embed_views`): the loss over embeddings averaged across random views shared by x and
  G(x), against a generator that games the frozen encoder; transforms in :mod:`travel_loss.views`.
- :class:`FrozenCLIPEncoder`: a frozen CLIP image encoder that takes generator images and
  crops, resizes and normalises them differentiably; :class:`FrozenEncoder` for SigLIP, DINOv2,
  DINOv3, ViT or any image backbone; :class:`EncoderEnsemble` for several. Missing weights raise
  :class:`CheckpointNotFoundError`; checkpoints are loaded by :mod:`travel_loss.hub`.
- :func:`paper_to_mean_lambda` (and its inverse): the paper's summed-loss lambda in this package's
  mean convention; :class:`GradientBalancedLambda`: lambda from the ratio of gradient norms.
- :func:`self_similarity_loss` / :class:`StructureLoss` (:mod:`travel_loss.structure`): the
  structure loss, self-similarity of a frozen network's spatial features (tokens from
  ``FrozenEncoder.forward_with_tokens``) compared between an image and its translation.
- :class:`TravelConsistency`: the evaluation metric, accumulated batch by batch.
- :func:`flip_scores`: a label-free audit, one score per translation, higher = more likely it
  lost its content (:mod:`travel_loss.audit`).
- :mod:`travel_loss.distributed`: the global-batch loss under DDP; :mod:`travel_loss.gradcache`:
  the exact micro-batched generator step (gradient caching).
- :mod:`travel_loss.testing`: ``check_embedder`` and hypothesis strategies for your own embedders.
"""

from travel_loss.audit import flip_scores
from travel_loss.encoder import EncoderEnsemble, FrozenCLIPEncoder, FrozenEncoder
from travel_loss.hub import CheckpointNotFoundError
from travel_loss.lambdas import (
    DiscriminatorGapLambda,
    GradientBalancedLambda,
    discriminator_gap,
    mean_to_paper_lambda,
    paper_to_mean_lambda,
)
from travel_loss.loss import TravelLoss, siamese_margin_loss, travel_loss, travel_loss_over_views
from travel_loss.metrics import TravelConsistency
from travel_loss.queue import TravelQueue
from travel_loss.structure import StructureLoss, sample_positions, self_similarity, self_similarity_loss
from travel_loss.views import RandomViews, embed_views

__all__ = [
    "CheckpointNotFoundError",
    "DiscriminatorGapLambda",
    "EncoderEnsemble",
    "FrozenCLIPEncoder",
    "FrozenEncoder",
    "GradientBalancedLambda",
    "RandomViews",
    "StructureLoss",
    "TravelConsistency",
    "TravelLoss",
    "TravelQueue",
    "discriminator_gap",
    "embed_views",
    "flip_scores",
    "mean_to_paper_lambda",
    "paper_to_mean_lambda",
    "sample_positions",
    "self_similarity",
    "self_similarity_loss",
    "siamese_margin_loss",
    "travel_loss",
    "travel_loss_over_views",
]
__version__ = "0.1.0"
