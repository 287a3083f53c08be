"""The throughput measurement's account of its window (``ehrnode.bench.throughput``)."""

from __future__ import annotations

from ehrnode.bench.throughput import Block, window_blocks_note


def _block(seen: float, txs: int) -> Block:
    return Block(seen, 0, ["t"] * txs)


def test_the_window_note_counts_the_blocks_after_the_first_and_the_gaps_between_all() -> None:
    """The window's first block marks its start (its transactions are not in the rate), so
    the sizes are those of the blocks after it; every gap counts."""
    window = [_block(10.0, 7), _block(10.5, 1500), _block(11.7, 2000), _block(12.0, 10)]
    note = window_blocks_note(window)
    assert note == (
        "throughput: 3 blocks in the rate's window; transactions a block (least / median / "
        "most) 10 / 1,500 / 2,000; seconds between blocks 0.30 / 0.50 / 1.20"
    )


def test_no_window_note_for_fewer_than_two_blocks() -> None:
    assert window_blocks_note([]) is None
    assert window_blocks_note([_block(1.0, 5)]) is None
