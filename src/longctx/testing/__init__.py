"""Test support shared by the graded labs, the project tests and the book.

``oracles``: float64 numpy references. ``compare``: ``assert_close`` that names
the likely mistake (``longctx.exact`` and ``longctx.measure``, exact attention and
time and peak memory, are runtime modules the tests use too).
``backends``: numpy in, backend arrays out. ``harness``: the graded pytest plugin.
"""
from longctx.testing.compare import assert_close, assert_mask_equal
from longctx.testing.oracles import attention, causal_mask, sliding_mask, sliding_window_attention

__all__ = ["assert_close", "assert_mask_equal", "attention", "causal_mask", "sliding_mask",
           "sliding_window_attention"]
