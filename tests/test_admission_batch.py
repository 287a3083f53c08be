"""A batch of transactions from a client (or a peer's frame) is checked in order, a
rejection in its place, and the event loop gets turns while the signatures are checked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from helpers_core import make_genesis

from ehrnode.admission import YIELD_EVERY, Admission
from ehrnode.consensus.execution import next_context
from ehrnode.core import crypto, tx
from ehrnode.core.errors import EhrError
from ehrnode.mempool import Mempool
from ehrnode.store.chain import Chain
from ehrnode.store.db import MemoryKV

T = TypeVar("T")


def _admission() -> tuple[Admission, str]:
    genesis = make_genesis([crypto.Identity.generate()])
    chain = Chain(MemoryKV(), genesis)
    pool = Mempool(chain.state, lambda: next_context(chain, genesis.genesis_time))
    return Admission(chain, pool, None, lambda: None), genesis.chain_id  # type: ignore[arg-type]


def _registers(chain_id: str, count: int) -> list[tx.Tx]:
    return [
        tx.make(crypto.Identity.generate(), chain_id, "register", 1, {"role": "patient"})
        for _ in range(count)
    ]


async def _turns_during(work: Awaitable[T]) -> tuple[T, int]:
    """``work``'s result, and how many turns another task (consensus, say) got meanwhile."""
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    result = await work
    task.cancel()
    return result, turns


async def test_a_batch_is_decoded_in_order_with_each_rejection_in_its_place() -> None:
    admission, chain_id = _admission()
    good = _registers(chain_id, 3)
    forged = bytearray(good[1].raw)
    forged[good[1].raw.index(good[1].sig)] ^= 1  # a signature byte
    out = await admission.decode_batch([good[0].raw, bytes(forged), good[2].raw, b"\x00"])
    assert [t.id for t in (out[0], out[2])] == [good[0].id, good[2].id]  # type: ignore[union-attr]
    assert isinstance(out[1], EhrError) and isinstance(out[3], EhrError)
    assert "signature" in out[1].message


async def test_the_event_loop_gets_turns_during_a_large_batch() -> None:
    admission, chain_id = _admission()
    raws = [t.raw for t in _registers(chain_id, 3 * YIELD_EVERY)]
    out, turns = await _turns_during(admission.decode_batch(raws))
    assert all(not isinstance(t, EhrError) for t in out)
    assert turns >= 2


async def test_a_peers_transactions_are_admitted_in_order_those_known_skipped() -> None:
    """A peer's frame: what is pending here already is skipped before its signature check
    (not refused as a duplicate), a forged one is counted, the rest join the mempool and
    are not relayed again."""
    admission, chain_id = _admission()
    relayed: list[tx.Tx] = []
    admission.relays.append(relayed.extend)
    pending, forged_tx, new = _registers(chain_id, 3)
    admission.submit(pending.raw, relay=False)
    forged = bytearray(forged_tx.raw)
    forged[forged_tx.raw.index(forged_tx.sig)] ^= 1
    refused = await admission.admit_relayed([pending.raw, bytes(forged), new.raw])
    assert refused == 1
    assert new.id in admission.mempool and forged_tx.id not in admission.mempool
    assert [t.id for t in admission.mempool.reap(1 << 20, 10)] == [pending.id, new.id]
    assert relayed == []


async def test_the_event_loop_gets_turns_during_a_peers_large_frame() -> None:
    admission, chain_id = _admission()
    raws = [t.raw for t in _registers(chain_id, 3 * YIELD_EVERY)]
    refused, turns = await _turns_during(admission.admit_relayed(raws))
    assert refused == 0 and len(admission.mempool) == len(raws)
    assert turns >= 2
