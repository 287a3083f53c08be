"""A large attachment goes up and comes down as a stream: the node's memory stays flat
whatever the size (here 96 MiB through a node process, well above what it may grow by)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrnode import config as cfg
from ehrnode.client.sdk import Client
from ehrnode.core import crypto
from ehrnode.testing import free_port, start_process_node, validator_identity

pytestmark = pytest.mark.slow
SIZE = 96 * 1024 * 1024
ALLOWED_GROWTH_MB = 40


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_a_large_attachment_keeps_node_memory_flat(tmp_path: Path) -> None:
    home = tmp_path / "node"
    cfg.init_home(home, rpc=f"127.0.0.1:{free_port()}", p2p=f"127.0.0.1:{free_port()}")
    node = start_process_node(home)
    try:
        source = tmp_path / "scan.bin"
        with open(source, "wb") as handle:
            block = bytes(range(256)) * 4096  # 1 MiB
            for _ in range(SIZE // len(block)):
                handle.write(block)
        provider, patient = crypto.Identity.generate(), crypto.Identity.generate()
        async with Client(node.rpc_url, validator_identity(home)) as c:
            await c.as_identity(provider).register(
                "provider", None, c.endorse(provider.public_key, "provider")
            )
            await c.as_identity(patient).register("patient")
            before = peak_rss_mb(node.process.pid)
            written = await c.as_identity(provider).put_attachment(
                patient.public_key, source, "application/octet-stream"
            )
            out = tmp_path / "back.bin"
            await c.as_identity(patient).read(written.id, out=out)
        after = peak_rss_mb(node.process.pid)
        assert out.read_bytes() == source.read_bytes()
        assert after - before < ALLOWED_GROWTH_MB, (
            f"node peak memory grew by {after - before:.0f} MB for a {SIZE >> 20} MiB attachment"
        )
    finally:
        node.terminate()
