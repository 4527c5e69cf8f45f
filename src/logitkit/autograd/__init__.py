"""One torch.autograd.Function per op, wiring the reference path and the Triton launchers."""
