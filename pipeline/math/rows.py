"""Functions of rows applied a block of rows at a time, so that their temporaries stay bounded however
many rows there are. For a function that treats each row on its own, the result is the same, bit for
bit, as one call on every row (tests/test_kde.py checks it for the KDE and the Mahalanobis scores)."""

from __future__ import annotations

import numpy as np


def by_blocks(fn, x, rows: int) -> np.ndarray:
    """fn(x[s : s + rows]) over consecutive blocks of x (an array, or anything sliced by rows that has a
    length), concatenated along the first axis; one call, fn(x[:]), when x has at most `rows` rows."""
    if len(x) <= rows:
        return fn(x[:])
    return np.concatenate([fn(x[s : s + rows]) for s in range(0, len(x), rows)])
