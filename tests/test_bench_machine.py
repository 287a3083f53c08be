"""The bench's probes of this machine's speed (``ehrnode.bench.machine``). Speeds are never
asserted: only that each probe runs the work it names."""

from __future__ import annotations

import pytest
from helpers_core import identity, raw_tx, record_body

from ehrnode.bench import machine
from ehrnode.core.errors import InvalidTransaction


def test_the_decode_probe_leaves_the_signature_check_out() -> None:
    """A transaction whose signature is wrong still decodes: the probe measures the work
    besides the check, which the verify probe measures on its own."""
    forged = raw_tx(identity(1), kind="record", body=record_body(), sig=bytes(64))
    assert machine.decode_rate([forged], seconds=0.01) > 0


def test_the_decode_probe_runs_the_nodes_decode_with_its_checks() -> None:
    """Bytes a node would refuse are refused by the probe too: it decodes, not just parses."""
    unknown_kind = raw_tx(identity(1), kind="no-such-kind", body={})
    with pytest.raises(InvalidTransaction):
        machine.decode_rate([unknown_kind], seconds=0.01)


def test_the_decode_probe_needs_transactions() -> None:
    with pytest.raises(ValueError, match="no transactions"):
        machine.decode_rate([], seconds=0.01)
