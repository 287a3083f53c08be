"""A data directory written with another state layout is refused with a clear error, not
continued with state hashes that can no longer match the network's."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_core import identity, make_genesis

from ehrnode.core import codec
from ehrnode.core.errors import ConfigError
from ehrnode.store.chain import K_HEAD, STATE_LAYOUT, Chain
from ehrnode.store.db import LevelKV


def test_a_new_directory_keeps_this_layout_and_reopens(tmp_path: Path) -> None:
    genesis = make_genesis([identity(1)])
    kv = LevelKV(tmp_path / "data")
    try:
        head = Chain(kv, genesis).head
        assert codec.decode(kv.get(K_HEAD))["layout"] == STATE_LAYOUT
        assert Chain(kv, genesis).head == head
    finally:
        kv.close()


@pytest.mark.parametrize("layout", [None, 1, 2, 3, 4, 5, STATE_LAYOUT + 1])
def test_another_layout_is_refused_and_left_as_it_was(tmp_path: Path, layout: int | None) -> None:
    genesis = make_genesis([identity(1)])
    kv = LevelKV(tmp_path / "data")
    try:
        Chain(kv, genesis)
        head = codec.decode(kv.get(K_HEAD))
        if layout is None:
            del head["layout"]  # as written before the layout was recorded
        else:
            head["layout"] = layout
        written = codec.encode(head)
        kv.write({K_HEAD: written}, sync=True)
        with pytest.raises(ConfigError, match=f"holds state layout {layout or 1}"):
            Chain(kv, genesis)
        assert kv.get(K_HEAD) == written
    finally:
        kv.close()
