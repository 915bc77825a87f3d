"""The chunking of the fused loss's softmax (its numerics are tested through the fused loss)."""
from __future__ import annotations

import pytest

from fcnseg.ops import chunk_softmax


@pytest.mark.parametrize("rows,row_size,chunk_size", [(10, 80, 280), (8, 80, 280), (1200, 5376, 21 * 2**17),
                                                     (7, 16, 7), (1, 5, 100), (100, 3, 299)])
def test_chunks_fit_their_buffer_and_are_as_few_as_can_be(rows, row_size, chunk_size):
    per_chunk = chunk_softmax.rows_per_chunk(rows, row_size, chunk_size)
    fitting = max(1, chunk_size // row_size)  # rows that fit a buffer (always at least one)
    assert 1 <= per_chunk <= fitting
    assert -(-rows // per_chunk) == -(-rows // fitting)  # no more chunks than the fewest possible
