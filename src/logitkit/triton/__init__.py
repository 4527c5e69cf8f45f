"""Triton kernels and their launchers. Importing this package needs the optional triton dependency."""
