"""``ehr``'s stdout survives being stopped and continued mid-write: a large ``--json``
document written to a pipe while the process is stopped and continued (Ctrl-Z and
``fg``, a profiler attaching, a paused container) arrives whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SIZE = 4_000_000


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_large_document_arrives_whole_through_stops_and_continues() -> None:
    code = (
        "from ehrnode.client.cli import write_out\n"
        f"write_out('[' + '1,' * {SIZE // 2 - 1} + '1]\\n')\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as child:
        assert child.stdout is not None
        got = [os.read(child.stdout.fileno(), 65536)]  # it is writing
        for _ in range(3):
            # The pipe is full and the child blocked in its write (or, had it lost the
            # rest, done): stop and continue it.
            wait_until(lambda: state(child.pid) in ("S", "Z"))
            if state(child.pid) == "Z":
                break
            os.kill(child.pid, signal.SIGSTOP)
            wait_until(lambda: state(child.pid) == "T")
            os.kill(child.pid, signal.SIGCONT)
            wait_until(lambda: state(child.pid) != "T")
            got.append(os.read(child.stdout.fileno(), 65536))
        got.append(child.stdout.read())
        assert child.wait(timeout=30) == 0
    out = b"".join(got)
    assert len(out) == SIZE + 2, f"{len(out)} bytes arrived"
    assert out == b"[" + b"1," * (SIZE // 2 - 1) + b"1]\n"


def test_a_large_document_arrives_whole_through_a_non_blocking_stdout() -> None:
    """Whoever shares the pipe may have set it non-blocking: a full pipe is waited for,
    not a traceback after the first 64 KiB."""
    code = (
        "import os\n"
        "from ehrnode.client.cli import write_out\n"
        "os.set_blocking(1, False)\n"
        f"write_out('[' + '1,' * {SIZE // 2 - 1} + '1]\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()[-500:]
    assert out.stdout == b"[" + b"1," * (SIZE // 2 - 1) + b"1]\n"


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_reader_that_went_away_ends_ehr_quietly(tmp_path: Path, json_flag: list[str]) -> None:
    """``ehr records | head -1``: the rest has nowhere to go; no traceback, SIGPIPE's status."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before ehr writes
    key = tmp_path / "me.json"
    done = subprocess.run(
        [sys.executable, "-m", "ehrnode.client.cli", *json_flag, "keygen", "--out", str(key)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        check=False,
    )
    os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE
    assert b"Traceback" not in done.stderr and done.stderr == b""
    assert key.exists()  # the command itself did its work
