"""``assert_close``: one failure message that says what is wrong and, when it
can, which classic mistake produced it."""
from __future__ import annotations

import numpy as np

AXES = ("B", "H", "L", "D")


def _where(index, axes) -> str:
    names = axes if len(axes) == len(index) else [f"dim{i}" for i in range(len(index))]
    return "[" + ", ".join(f"{n}={i}" for n, i in zip(names, index)) + "]"


def _close(a, b, rtol, atol) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def assert_close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-5, name: str = "output",
                 axes=AXES, mistakes: dict[str, np.ndarray] | None = None) -> None:
    """Check shape, NaN/Inf, then values; name the worst element and the likely mistake.

    ``mistakes`` maps a description to the output that mistake would give; the
    first one that ``actual`` matches (and ``expected`` does not) is reported.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        hint = ""
        if sorted(actual.shape) == sorted(expected.shape) and len(expected.shape) == len(axes):
            order = [axes[list(expected.shape).index(n)] if list(expected.shape).count(n) == 1 else "?"
                     for n in actual.shape]
            hint = f" -- axes look swapped: got ({', '.join(order)}), want ({', '.join(axes)})"
        raise AssertionError(f"{name}: shape {actual.shape}, expected {expected.shape}{hint}")
    bad = ~np.isfinite(actual)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} NaN/Inf values of {actual.size}, first at "
                             f"{_where(first, axes)} = {actual[first]} -- overflow in a low-precision "
                             f"softmax (subtract the row max, accumulate in float32) or 0/0 on a row "
                             f"with no visible key")
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    if (excess <= 0).all():
        return
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
    message = (f"{name}: {int((excess > 0).sum())} of {actual.size} elements differ; worst at "
               f"{_where(worst, axes)}: got {actual[worst]:.6g}, expected {expected[worst]:.6g} "
               f"(rtol={rtol:g}, atol={atol:g})")
    for description, candidate in (mistakes or {}).items():
        candidate = np.asarray(candidate, dtype=np.float64)
        if _close(actual, candidate, rtol, atol) and not _close(expected, candidate, rtol, atol):
            message += f"\n  looks like: {description}"
            break
    raise AssertionError(message)


def assert_mask_equal(actual, expected, *, name: str = "mask", mistakes: dict[str, np.ndarray] | None = None):
    """Exact comparison of boolean masks, naming the first wrong (row, column)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape}, expected {expected.shape}")
    if actual.dtype != np.bool_:
        raise AssertionError(f"{name}: dtype {actual.dtype}, expected bool")
    wrong = np.argwhere(actual != expected)
    if len(wrong) == 0:
        return
    i, j = (int(x) for x in wrong[0])
    message = (f"{name}: {len(wrong)} wrong entries; first at row {i}, column {j}: got {bool(actual[i, j])}, "
               f"expected {bool(expected[i, j])}")
    for description, candidate in (mistakes or {}).items():
        if np.array_equal(actual, candidate):
            message += f"\n  looks like: {description}"
            break
    raise AssertionError(message)
