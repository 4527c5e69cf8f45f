"""Vocab-parallel variants over torch.distributed process groups."""
