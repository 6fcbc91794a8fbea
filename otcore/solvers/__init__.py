"""Solvers: they call geometry primitives only, never kernels."""
