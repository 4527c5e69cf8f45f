"""Reference implementations: the plain-PyTorch path (plain, losses) and the float64/mpmath oracle."""
