"""Nothing is lost: SIGKILL a node process in the middle of a stream of writes, restart it,
and everything acknowledged as committed is there, with state and head in agreement."""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from ehrnode import config as cfg
from ehrnode.core import crypto, request, tx
from ehrnode.core.genesis import Genesis
from ehrnode.store.chain import Chain
from ehrnode.store.check import check_chain
from ehrnode.store.db import LevelKV
from ehrnode.testing import free_port, start_process_node

pytestmark = pytest.mark.slow
MSGPACK = {"Content-Type": "application/msgpack"}


class Writer:
    """Registers patients and writes records for them until told to stop; remembers what
    the node acknowledged as committed."""

    def __init__(self, url: str, chain: str) -> None:
        self.url = url
        self.chain = chain
        self.acked_txs: list[bytes] = []
        self.acked_blobs: list[bytes] = []
        self.stop = False

    async def run(self, worker: int) -> None:
        async with aiohttp.ClientSession(base_url=self.url) as http:
            while not self.stop:
                try:
                    await self._one_patient(http)
                except (TimeoutError, aiohttp.ClientError, ConnectionError):
                    return  # the node died under us: what was acknowledged is what counts

    async def _submit(self, http: aiohttp.ClientSession, t: tx.Tx) -> None:
        async with http.post("/v1/txs?mode=commit", data=t.raw, headers=MSGPACK) as response:
            reply = await response.json()
        assert response.status == 200 and reply["status"] == "committed", reply
        self.acked_txs.append(t.id)

    async def _one_patient(self, http: aiohttp.ClientSession) -> None:
        patient = crypto.Identity.generate()
        await self._submit(http, tx.make(patient, self.chain, "register", 1, {"role": "patient"}))
        for nonce in range(2, 5):
            data_key = crypto.new_data_key()
            ciphertext = b"\x01" + crypto.seal(data_key, b'{"resourceType": "Observation"}')
            blob = hashlib.sha256(ciphertext).digest()
            path = f"/v1/blobs/{blob.hex()}"
            auth = request.authorization(patient, self.chain, "PUT", path, _now_ms())
            async with http.put(path, data=ciphertext, headers={"Authorization": auth}) as r:
                assert r.status == 201, await r.text()
            body = {
                "patient": patient.public_key,
                "blob": blob,
                "size": len(ciphertext),
                "type": "Observation",
                "keys": [[patient.public_key, crypto.wrap_key(data_key, patient.public_key)]],
            }
            await self._submit(http, tx.make(patient, self.chain, "record", nonce, body))
            self.acked_blobs.append(blob)


def _now_ms() -> int:
    return int(time.time() * 1000)


def make_home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    cfg.init_home(
        home,
        chain_id="crash-test",
        rpc=f"127.0.0.1:{free_port()}",
        p2p=f"127.0.0.1:{free_port()}",
    )
    return home


def open_chain(home: Path) -> tuple[LevelKV, Chain]:
    kv = LevelKV(home / "data")
    genesis = Genesis.from_json((home / cfg.GENESIS_FILE).read_text())
    return kv, Chain(kv, genesis, home / "blocks")


async def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    rng = random.Random(20261125)
    writer: Writer | None = None
    all_acked: list[bytes] = []
    all_blobs: list[bytes] = []
    for cycle in range(3):
        node = start_process_node(home)
        writer = Writer(node.rpc_url, "crash-test")
        tasks = [asyncio.create_task(writer.run(i)) for i in range(6)]
        target = len(writer.acked_txs) + rng.randint(20, 80)
        deadline = asyncio.get_running_loop().time() + 60
        while len(writer.acked_txs) < target:
            assert asyncio.get_running_loop().time() < deadline, "writes stalled"
            await asyncio.sleep(0.005)
        node.kill()  # while writers still have requests in flight
        writer.stop = True
        await asyncio.gather(*tasks)
        all_acked += writer.acked_txs
        all_blobs += writer.acked_blobs

        kv, chain = open_chain(home)
        try:
            missing = [t.hex() for t in all_acked if chain.tx_location(t) is None]
            assert not missing, f"cycle {cycle}: acknowledged but lost: {missing[:3]}"
            report = check_chain(chain)
            assert report.ok, report.problems
            assert report.height >= 1
            kv_blobs = [b for b in all_blobs if kv.get(b"O" + b) is None]
            assert not kv_blobs, f"cycle {cycle}: {len(kv_blobs)} committed records lost their blob"
        finally:
            chain.close()
            kv.close()

    result = subprocess.run(
        [sys.executable, "-m", "ehrnode", "check", "--home", str(home)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "state hash matches, index entries match" in result.stdout

    # And the restarted node serves and keeps committing.
    node = start_process_node(home)
    try:
        writer = Writer(node.rpc_url, "crash-test")
        async with aiohttp.ClientSession(base_url=node.rpc_url) as http:
            await writer._one_patient(http)
            async with http.get("/v1/status") as response:
                status = await response.json()
        assert status["height"] > report.height
    finally:
        node.terminate()
