"""Triton kernels, installed as ``otcore.kernels``."""
