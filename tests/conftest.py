"""Shared fixtures. Test doubles themselves live in ``ehrnode.testing``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ehrnode.node import Node
from ehrnode.testing import local_node

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea"
DATA = Path(__file__).parent / "data"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """One validator node in this process with its RPC on a free loopback port."""
    async with local_node(tmp_path / "node0") as running:
        yield running


def full_samples() -> Path:
    """The full Synthea sample set, or skip: it lives outside the repository."""
    if not SAMPLES.is_dir():
        pytest.skip(f"the full sample set is not at {SAMPLES} (only on a machine with ../shared)")
    return SAMPLES
