"""Reference trainer for CLIPTraVeLGAN: networks, data, training, translation, studies."""
