"""An MLX output filled tile by tile in place, for the references whose memory must not grow with ``L``.

MLX arrays are immutable in the graph, but ``out[index] = rows`` followed by a
*synchronous* ``mx.eval(out)`` lets MLX donate ``out``'s buffer and write the
rows into it. Evaluated asynchronously (``mx.async_eval``), the update keeps a
reference to the old buffer and copies the whole output at every tile: memory
doubles and time grows as ``L^2`` (measured: 64 MiB written in 256 tiles took
16 s instead of 34 ms). ``RowWriter`` keeps one tile in flight: it starts the
next tile's evaluation, then writes the previous one while that runs.

Inside a graph transformation (``mx.grad``, ``mx.vjp``: training through a
layer) nothing may be evaluated; there ``RowWriter`` keeps the tiles and joins
them at the end with differentiable ops, so the gradient flows through every
tile (the graph then holds each tile, as any differentiated loop does).
"""
from __future__ import annotations

import mlx.core as mx


class RowWriter:
    """``out = mx.zeros(shape, dtype)`` filled along ``axis``: ``put(start, rows)`` writes
    ``rows`` at ``start`` (cast to ``dtype``); ``result()`` is ``out`` once every tile is in."""

    def __init__(self, shape, dtype, axis: int):
        self.out = mx.zeros(shape, dtype=dtype)
        self.axis = axis
        self._pending = None
        self._traced: list | None = None  # the tiles, inside a graph transformation

    def put(self, start: int, rows: mx.array) -> None:
        rows = rows.astype(self.out.dtype)
        if self._traced is None:
            try:
                mx.async_eval(rows)  # runs while the previous tile is written
            except ValueError as e:  # inside mx.grad / mx.vjp: no evaluation, keep the graph
                if "graph transformation" not in str(e):
                    raise
                self._traced = []
        if self._traced is not None:
            self._traced.append((start, rows))
            return
        self._flush()
        self._pending = (start, rows)

    def _flush(self) -> None:
        if self._pending is not None:
            start, rows = self._pending
            index = (slice(None),) * self.axis + (slice(start, start + rows.shape[self.axis]),)
            self.out[index] = rows
            mx.eval(self.out)  # synchronous: in place
            self._pending = None

    def result(self) -> mx.array:
        if self._traced is not None:
            return self._joined()
        self._flush()
        return self.out

    def _joined(self) -> mx.array:
        """The traced tiles as one array: concatenated when they cover the axis in order, else
        written one by one (a differentiable slice update each)."""
        pieces, n = self._traced, self.out.shape[self.axis]  # (the first put noticed it: none is pending)
        ends = [0] + [start + rows.shape[self.axis] for start, rows in pieces]
        if [start for start, _ in pieces] == ends[:-1] and ends[-1] == n:
            return mx.concatenate([rows for _, rows in pieces], axis=self.axis)
        out = self.out
        for start, rows in pieces:
            index = (slice(None),) * self.axis + (slice(start, start + rows.shape[self.axis]),)
            out[index] = rows
        return out
