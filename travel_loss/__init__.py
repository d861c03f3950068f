"""travel-loss: the CLIPTraVeLGAN transformation-vector loss and a frozen CLIP encoder."""

from travel_loss.loss import TravelLoss, siamese_margin_loss, travel_loss

__all__ = ["TravelLoss", "siamese_margin_loss", "travel_loss"]
__version__ = "0.1.0"
