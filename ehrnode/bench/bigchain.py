"""A chain of a million records, built offline for the query and start-up measurements.

One validator; real, signed ``register`` and ``record`` transactions executed by the real
state machine and committed through ``store.chain`` with real certificates, in blocks of
5,000. Only the ciphertext is left out: the records' blob hashes and wrapped keys are
random bytes of the right sizes (the measurement reads the chain, not the payloads).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ehrnode import config as cfg
from ehrnode.consensus.execution import make_block
from ehrnode.core import crypto, state, tx
from ehrnode.core.block import PRECOMMIT, Certificate, sign_vote
from ehrnode.core.genesis import Genesis
from ehrnode.keys import load_identity
from ehrnode.store.chain import Chain
from ehrnode.store.db import LevelKV
from ehrnode.testing import free_port

BLOCK_TXS = 5000
CHAIN_ID = "ehr-bigchain"


def _sign_records(jobs: list[tuple[bytes, bytes, int]]) -> list[bytes]:
    rng = os.urandom
    out = []
    for provider_seed, patient, nonce in jobs:
        provider = crypto.Identity(provider_seed)
        readers = sorted({patient, provider.public_key})
        body = {
            "patient": patient,
            "blob": rng(32),
            "size": 1500,
            "type": "Observation",
            "keys": [[r, rng(crypto.WRAPPED_KEY_BYTES)] for r in readers],
        }
        out.append(tx.sign(provider, CHAIN_ID, "record", nonce, body)[0])
    return out


def _commit(chain: Chain, validator: crypto.Identity, raws: list[bytes], time_ms: int) -> None:
    head = chain.head
    height = head.height + 1
    ctx = state.BlockContext(CHAIN_ID, height, time_ms, chain.validators())
    txs = [tx.decode(raw, verify_sig=False) for raw in raws]
    execution = state.execute_block(chain.state, ctx, txs, head.digest)
    last = None if head.height == 0 else chain.certificate(head.height)
    block = make_block(chain, ctx, validator.public_key, txs, dict(ctx.validators), last)
    vote = sign_vote(validator, CHAIN_ID, PRECOMMIT, height, 0, block.id)
    chain.commit(block, Certificate(height, 0, block.id, ((vote.validator, vote.sig),)), execution)


def settle(kv: LevelKV) -> None:
    """Compact the whole database, as an operator does after a bulk import.

    The load commits blocks far faster than a network does, so LevelDB's one compaction
    thread falls behind and leaves every level at its size limit, with a fresh level-0
    table on top. The node's first reads then charge that table with seeks until LevelDB
    compacts it, and that cascades down the full levels: in one run, 50 compactions over
    the first 5 s of queries set the record list's p99 (15-20 ms, against 6-7 ms once
    they were done; 6.8 ms from the first query after this). Waiting for the owed
    compactions alone (reopening until an opening starts none) still left the cascade to
    the first reads. About 13 s for a million records on the benchmark machine.
    """
    kv.compact(b"\x00", b"\xff")  # every key: each starts with an ASCII table letter


def build_chain(root: Path, records: int, patients: int) -> tuple[Path, list[str]]:
    """A node home holding ``records`` records of ``patients`` patients; their ids."""
    home = root / "bigchain"
    cfg.init_home(
        home,
        chain_id=CHAIN_ID,
        rpc=f"127.0.0.1:{free_port()}",
        p2p=f"127.0.0.1:{free_port()}",
        moniker="bigchain",
    )
    validator = load_identity(home / cfg.KEY_FILE)
    genesis = Genesis.from_json((home / cfg.GENESIS_FILE).read_text())
    providers = [crypto.Identity.generate() for _ in range(max(1, records // 20_000))]
    people = [crypto.Identity.generate() for _ in range(patients)]
    kv = LevelKV(home / "data")
    try:
        chain = Chain(kv, genesis, home / "blocks")
        time_ms = genesis.genesis_time + 1
        registers = [
            tx.make(
                p,
                CHAIN_ID,
                "register",
                1,
                {
                    "role": "provider",
                    "endorsement": tx.endorse(validator, CHAIN_ID, "provider", p.public_key),
                },
            ).raw
            for p in providers
        ] + [tx.make(p, CHAIN_ID, "register", 1, {"role": "patient"}).raw for p in people]
        for start in range(0, len(registers), BLOCK_TXS):
            _commit(chain, validator, registers[start : start + BLOCK_TXS], time_ms)
            time_ms += 1
        jobs = []
        nonces = {p.public_key: 2 for p in providers}
        for i in range(records):
            provider = providers[i % len(providers)]
            jobs.append(
                (provider.seed, people[i % len(people)].public_key, nonces[provider.public_key])
            )
            nonces[provider.public_key] += 1
        chunks = [jobs[i : i + BLOCK_TXS] for i in range(0, len(jobs), BLOCK_TXS)]
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            for raws in pool.map(_sign_records, chunks):
                _commit(chain, validator, raws, time_ms)
                time_ms += 1
        settle(kv)
        chain.close()
    finally:
        kv.close()
    return home, [p.public_id for p in people]
