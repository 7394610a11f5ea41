"""longctx.torch: the PyTorch mirror of longctx.mlx (same names, torch.Tensor in and out).

Names load on first use (PEP 562), from the module of the same name as in
``longctx.mlx`` (one table, the registry's ``Task.exports``, for both): a ring rank that
needs ``longctx.torch.ring`` does not import transformers for Task 8 (4 s a
process, 4 processes a launch).
"""
from longctx.blas import share_with_torch
from longctx.mlx import lazy_names  # backend-free: longctx.mlx's names load lazily too
from longctx.techniques import public_names

share_with_torch()  # a preloaded multi-threaded OpenBLAS would slow torch down 3-30x: see longctx/blas.py

__all__ = sorted(public_names())
__getattr__, __dir__ = lazy_names(__name__)
