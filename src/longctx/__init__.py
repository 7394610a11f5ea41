"""longctx: long-context LLM techniques, MLX first, with a PyTorch mirror.

Public namespaces: ``longctx.mlx`` (the MLX reference), ``longctx.torch``
(the PyTorch mirror), ``longctx.testing`` (oracles and the graded harness).
"""
from longctx.blas import preload_fast_blas

# Before anything imports mlx.core: see longctx/blas.py.
preload_fast_blas()

__version__ = "0.1.0"
