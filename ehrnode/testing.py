"""Test doubles and fixtures that tests (and developers at a prompt) import.

- ``wait_for``: wait on a condition with a timeout, never on a fixed sleep.
- ``local_node``: one validator node in this process, in a temporary home, RPC on a free
  port of 127.0.0.1.
- ``start_process_node`` / ``ProcessNode``: a node as a separate ``ehrnode run`` process,
  the way an operator starts it, for crash tests.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ehrnode import config as cfg
from ehrnode.config import init_home
from ehrnode.core.crypto import Identity
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.keys import load_identity
from ehrnode.node import Node


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str = "condition",
) -> None:
    """Poll ``condition`` until it holds; raise TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def local_node(home: Path, **rpc_settings: object) -> AsyncIterator[Node]:
    """A single-validator node in ``home`` (created if missing), stopped on exit."""
    if not (home / cfg.KEY_FILE).exists():
        init_home(home, rpc="127.0.0.1:0", p2p="127.0.0.1:0", moniker=home.name)
    config = cfg.load(home)
    if rpc_settings:
        config = replace(config, rpc=replace(config.rpc, **rpc_settings))  # type: ignore[arg-type]
    node = Node(config)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def cluster_homes(root: Path, n: int, chain_id: str = "ehr-cluster") -> list[Path]:
    """Homes for ``n`` validators of one network, on free loopback ports, each listing the
    others as peers (what ``ehrnode testnet`` writes, for tests)."""
    identities = [Identity.generate() for _ in range(n)]
    genesis = Genesis(
        chain_id=chain_id,
        genesis_time=int(time.time() * 1000),
        validators=tuple(ValidatorInfo(i.public_key, 1, f"v{k}") for k, i in enumerate(identities)),
    )
    p2p = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    homes = []
    for k, identity in enumerate(identities):
        home = root / f"node{k}"
        init_home(
            home,
            genesis=genesis,
            identity=identity,
            rpc=f"127.0.0.1:{free_port()}",
            p2p=p2p[k],
            peers=tuple(f"{o.public_id}@{p2p[j]}" for j, o in enumerate(identities) if j != k),
            moniker=f"node{k}",
        )
        homes.append(home)
    return homes


@asynccontextmanager
async def cluster(root: Path, n: int = 4) -> AsyncIterator[list[Node]]:
    """``n`` validator nodes in this process, linked over real loopback sockets, all
    connected to each other before the block is entered."""
    nodes = [Node(cfg.load(home)) for home in cluster_homes(root, n)]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        await wait_for(
            lambda: all(
                node.switch is not None and len(node.switch.peers) == n - 1 for node in nodes
            ),
            timeout=20,
            what=f"{n} nodes to connect to each other",
        )
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)


def validator_identity(home: Path) -> Identity:
    return load_identity(home / cfg.KEY_FILE)


@dataclass
class ProcessNode:
    home: Path
    process: subprocess.Popen[bytes]
    rpc_url: str

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up, like a power cut."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a port the kernel hands out
    for outgoing connections could be taken between now and the node's bind, one below it
    cannot (and this process never hands out the same one twice)."""
    high = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(max(1024, high - 12000), high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found below the ephemeral range")


def start_process_node(home: Path, timeout: float = 30.0) -> ProcessNode:
    """Run ``python -m ehrnode run --home`` and wait until its RPC answers."""
    config = cfg.load(home)
    host, port = cfg.split_address(config.rpc.listen)
    url = f"http://{host}:{port}"
    log = open(home / "node.log", "ab")  # noqa: SIM115 - handed to the child process
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "ehrnode", "run", "--home", str(home)],
        stdout=log,
        stderr=log,
        env=env,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}; see {home / 'node.log'}")
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=1) as response:
                if json.load(response).get("ok"):
                    return ProcessNode(home, process, url)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"node in {home} did not answer within {timeout} s")
