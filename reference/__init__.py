"""Reference trainer for CLIPTraVeLGAN: networks, data, toy-street benchmark, training, translation."""
