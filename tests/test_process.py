"""Process-wide tuning: glibc's malloc keeps the memory a stream of large buffers goes
through, instead of handing it back to the kernel and faulting it in again; Python's
collector runs far less often while a process builds and holds many small objects; a
node imports aiohttp without loading the system's CA certificates, which it never uses."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from ehrnode import cli as node_cli, config as cfg
from ehrnode.client import cli as ehr_cli
from ehrnode.core.errors import ConfigError
from ehrnode.process import (
    CA_ENV,
    HUGE_PAGES_ENV,
    HUGE_PAGES_TRIED_ENV,
    MAX_PREFAULT_MIB,
    NO_CA,
    THP_MODE_FILE,
    huge_pages_environment,
    machine_memory_mib,
    no_default_ca_certificates,
    prefault_heap,
    reexec_with_huge_pages,
    tune_malloc,
)
from ehrnode.testing import free_port, start_process_node

# Buffers like a replicated attachment's: 64 KiB chunks copied out of a 4 MiB block, joined
# and dropped, round after round; prints the minor page faults the later rounds took.
WORKLOAD = """
import os, resource, sys
if sys.argv[1] == "tuned":
    from ehrnode.process import tune_malloc
    assert tune_malloc()
data = os.urandom(4 << 20)
def rounds(count):
    for i in range(count):
        held = [bytes(data[j : j + (64 << 10) + i]) for j in range(0, 4 << 20, 64 << 10)]
        joined = b"".join(held)
        del held, joined
rounds(20)  # malloc's thresholds settle (and the tuned heap grows) first
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(40)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""

GLIBC = platform.libc_ver()[0] == "glibc"


def measured(mode: str, workload: str = WORKLOAD) -> int:
    """What ``workload`` printed, run in a fresh interpreter as ``mode`` ("plain" or "tuned")."""
    done = subprocess.run(
        [sys.executable, "-c", workload, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc malloc's")
def test_tuned_malloc_stops_faulting_in_the_same_memory_again_and_again() -> None:
    plain, tuned = measured("plain"), measured("tuned")
    assert tuned * 10 < plain, (plain, tuned)


# A burst of small buffers larger than the trim threshold (a block's thousands of decoded
# transactions), freed, round after round; prints the minor page faults the later rounds took.
BURSTS = """
import os, resource, sys
if sys.argv[1] == "tuned":
    from ehrnode.process import tune_malloc
    assert tune_malloc()
data = os.urandom(4096)
def rounds(count):
    for i in range(count):
        held = [data[j % 1000 : j % 1000 + 1000] for j in range(80_000)]  # about 80 MiB
        del held
rounds(3)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc malloc's")
def test_tuned_malloc_keeps_most_of_a_burst_larger_than_its_trim_threshold() -> None:
    """Without the top pad the burst went back to the kernel whole each round (as many
    faults as untuned); with it, 64 MiB of it stays."""
    plain, tuned = measured("plain", BURSTS), measured("tuned", BURSTS)
    assert tuned * 3 < plain, (plain, tuned)


# Threads alive together (a node's write threads, LevelDB's) that each free a burst in turn;
# prints how many MiB more the process holds afterwards.
THREADS = """
import os, sys, threading
if sys.argv[1] == "tuned":
    from ehrnode.process import tune_malloc
    assert tune_malloc()
data = os.urandom(4096)
def resident_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
turns = [threading.Event() for _ in range(4)]
done = [threading.Event() for _ in range(4)]
def worker(i):
    turns[i].wait()
    held = [data[j % 1000 : j % 1000 + 1000] for j in range(20_000)]  # about 20 MiB
    del held
    done[i].set()
    done[-1].wait()  # every thread lives until the last has run
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for thread in threads:
    thread.start()
before = resident_mib()
for i in range(4):
    turns[i].set()
    done[i].wait()
print(resident_mib() - before)
for thread in threads:
    thread.join()
"""


@pytest.mark.skipif(
    not GLIBC or not Path("/proc/self/status").exists(),
    reason="the arenas are glibc malloc's, and the memory held is read from /proc",
)
def test_tuned_malloc_lets_each_thread_reuse_what_another_freed() -> None:
    """With an arena a thread, each of the four kept its own 20 MiB (80 held); with one,
    the next thread takes what the one before freed."""
    held = measured("tuned", THREADS)
    assert held < 40, held


@pytest.mark.skipif(GLIBC, reason="on glibc the tuning applies")
def test_without_glibc_the_tuning_is_left_alone() -> None:
    assert tune_malloc() is False


# A node's start with ``memory.prefault_mb`` (argv[1] MiB), then a load's buffers taken
# from the heap and dropped, then a burst freed at the top of the heap; prints the MiB
# faulted in, and how many MiB the process held more after the start, the load, the burst.
PREFAULT = """
import sys
from ehrnode.process import prefault_heap, tune_malloc
def resident_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
assert tune_malloc()
before = resident_mib()
done = prefault_heap(int(sys.argv[1]))
started = resident_mib()
held = [b"x" * 200_000 for _ in range(300)]  # about 57 MiB, every page written
loaded = resident_mib()
del held
burst = b"y" * (24 << 20)
del burst
print(done, started - before, loaded - started, resident_mib() - started)
"""

NEEDS_GLIBC_PROC = pytest.mark.skipif(
    not GLIBC or not Path("/proc/self/status").exists(),
    reason="the heap is glibc malloc's, and the memory held is read from /proc",
)


def prefaulted(mib: int) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", PREFAULT, str(mib)], capture_output=True, text=True, check=True
    )
    return [int(n) for n in done.stdout.split()]


@NEEDS_GLIBC_PROC
def test_a_prefaulted_heap_is_resident_from_the_start_and_serves_the_load() -> None:
    done, at_start, by_load, after_burst = prefaulted(128)
    assert done == 128
    # Over tune_malloc's 64 MiB top pad: kept only because the pad and threshold grew.
    assert at_start >= 120, at_start
    assert by_load < 8, by_load  # the load's 57 MiB came out of the faulted-in heap
    assert after_burst >= -4, after_burst  # nothing handed back to the kernel


@NEEDS_GLIBC_PROC
def test_without_prefault_the_load_faults_its_memory_in_as_it_goes() -> None:
    done, at_start, by_load, _ = prefaulted(0)
    assert done == 0 and at_start < 4
    assert by_load >= 50, by_load


@pytest.mark.skipif(GLIBC, reason="on glibc the heap can be faulted in")
def test_without_glibc_nothing_is_prefaulted() -> None:
    assert prefault_heap(16) is None


@NEEDS_GLIBC_PROC
def test_a_node_faults_in_its_configured_heap_before_it_serves(tmp_path: Path) -> None:
    home = tmp_path / "node"
    cfg.init_home(home, rpc=f"127.0.0.1:{free_port()}", p2p=f"127.0.0.1:{free_port()}")
    with (home / cfg.CONFIG_FILE).open("a") as config:
        config.write("\n[memory]\nprefault_mb = 32\n")
    node = start_process_node(home)
    try:
        assert "faulted in 32 MiB of heap" in (home / "node.log").read_text()
    finally:
        node.terminate()


def test_a_node_refuses_a_prefault_over_what_malloc_can_keep(tmp_path: Path) -> None:
    home = tmp_path / "node"
    cfg.init_home(home, rpc=f"127.0.0.1:{free_port()}", p2p=f"127.0.0.1:{free_port()}")
    with (home / cfg.CONFIG_FILE).open("a") as config:
        config.write(f"\n[memory]\nprefault_mb = {MAX_PREFAULT_MIB + 1}\n")
    done = subprocess.run(
        [sys.executable, "-m", "ehrnode", "run", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "memory.prefault_mb must be at most" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_prefault_over_half_the_machine_is_refused_before_the_node_opens_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "node"
    cfg.init_home(home, rpc=f"127.0.0.1:{free_port()}", p2p=f"127.0.0.1:{free_port()}")
    with (home / cfg.CONFIG_FILE).open("a") as config:
        config.write("\n[memory]\nprefault_mb = 501\n")
    monkeypatch.setattr(node_cli, "_setup_logging", lambda level: None)
    monkeypatch.setattr(node_cli, "machine_memory_mib", lambda: 1000)
    monkeypatch.setattr(node_cli, "prefault_heap", lambda mib: pytest.fail("faulted in"))
    with pytest.raises(ConfigError, match=r"memory\.prefault_mb is 501 MiB"):
        asyncio.run(node_cli.run_node(home))
    assert not (home / "data").exists()


@pytest.mark.parametrize(
    ("done", "logged"),
    [
        (500, "faulted in 500 MiB of heap"),
        (120, "faulted in only 120 of 500 MiB"),
        (None, "no glibc mallopt"),
    ],
)
def test_a_prefault_up_to_half_the_machine_runs_and_says_how_it_went(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    done: int | None,
    logged: str,
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(node_cli, "machine_memory_mib", lambda: 1000)
    monkeypatch.setattr(node_cli, "prefault_heap", lambda mib: asked.append(mib) or done)
    with caplog.at_level(logging.INFO, logger="ehrnode"):
        node_cli._prefault(500)
    assert asked == [500]
    assert logged in caplog.text


def test_the_memory_a_node_may_use_is_its_cgroup_limit_where_lower(tmp_path: Path) -> None:
    physical = machine_memory_mib(str(tmp_path / "absent"))
    assert physical is not None and physical > 0
    limit = tmp_path / "memory.max"
    limit.write_text(f"{1 << 30}\n")
    assert machine_memory_mib(str(limit)) == min(physical, 1024)
    limit.write_text("max\n")
    assert machine_memory_mib(str(limit)) == physical


def test_prefault_heap_refuses_more_than_mallopt_can_keep() -> None:
    with pytest.raises(ValueError, match="at most"):
        prefault_heap(MAX_PREFAULT_MIB + 1)


# What an import does: parse bundles and hold them; prints how many collections ran.
HOLDING = """
import gc, json, sys
if sys.argv[1] == "tuned":
    from ehrnode.process import tune_gc
    tune_gc()
entry = json.dumps([{"resource": {"id": str(i)}} for i in range(500)])
before = sum(s["collections"] for s in gc.get_stats())
held = [json.loads(entry) for _ in range(400)]
print(sum(s["collections"] for s in gc.get_stats()) - before)
"""


def collections(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", HOLDING, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_tuned_collector_runs_far_less_often_while_objects_pile_up() -> None:
    plain, tuned = collections("plain"), collections("tuned")
    assert tuned * 10 < plain, (plain, tuned)


def test_the_ehr_command_tunes_the_collector_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called: list[str] = []
    monkeypatch.setattr(ehr_cli, "tune_gc", lambda: called.append("gc"))
    with pytest.raises(SystemExit):
        ehr_cli.main(["--help"])
    assert called == ["gc"]


# Huge pages: glibc reads its tunable at exec, so ``ehrnode run`` runs itself again with it.
THP_MODE = Path(THP_MODE_FILE).read_text() if Path(THP_MODE_FILE).exists() else None
LIBC = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
CAN_HUGE = huge_pages_environment({}, LIBC, THP_MODE) is not None
NEEDS_HUGE = pytest.mark.skipif(
    not CAN_HUGE, reason=f"needs glibc 2.35+ and transparent huge pages (libc {LIBC})"
)
MADVISE = "always [madvise] never\n"


def test_huge_pages_are_asked_for_on_glibc_2_35_and_later_with_transparent_huge_pages() -> None:
    env = huge_pages_environment({"PATH": "/bin"}, "glibc 2.36", MADVISE)
    assert env == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        HUGE_PAGES_TRIED_ENV: "1",
    }
    kept = huge_pages_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc 2.35", MADVISE
    )
    assert kept is not None
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert huge_pages_environment({}, "glibc 2.36", "[always] madvise never") is not None


@pytest.mark.parametrize(
    ("environ", "libc", "thp"),
    [
        ({HUGE_PAGES_ENV: "0"}, "glibc 2.36", MADVISE),  # the operator turned them off
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36", MADVISE),  # set already
        ({HUGE_PAGES_TRIED_ENV: "1"}, "glibc 2.36", MADVISE),  # glibc dropped it: once only
        ({}, "glibc 2.34", MADVISE),  # glibc before the tunable
        ({}, None, MADVISE),  # another libc
        ({}, "glibc", MADVISE),  # no version to read
        ({}, "glibc 2.36", "always madvise [never]\n"),  # the kernel's are off
        ({}, "glibc 2.36", None),  # no transparent huge pages in this kernel
    ],
)
def test_huge_pages_are_left_alone_where_off_set_or_unsupported(
    environ: dict[str, str], libc: str | None, thp: str | None
) -> None:
    assert huge_pages_environment(environ, libc, thp) is None


# Runs itself again as ``ehrnode run`` does, then takes 64 MiB from malloc and prints its
# pid, its GLIBC_TUNABLES and the kilobytes of its memory held in huge pages.
REEXEC = """
import ctypes, os, sys
from ehrnode.process import reexec_with_huge_pages
print(os.getpid(), file=sys.stderr, flush=True)
reexec_with_huge_pages()
held = [ctypes.create_string_buffer(16 << 10) for _ in range(4096)]
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), int(huge[0].split()[1]))
"""


def run_reexec(extra_env: dict[str, str]) -> tuple[list[str], list[str]]:
    ours = ("GLIBC_TUNABLES", HUGE_PAGES_ENV, HUGE_PAGES_TRIED_ENV)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    done = subprocess.run(
        [sys.executable, "-c", REEXEC],
        capture_output=True,
        text=True,
        check=True,
        env=env | extra_env,
    )
    return done.stdout.split(), done.stderr.split()


@NEEDS_HUGE
def test_the_process_runs_again_with_malloc_in_huge_pages() -> None:
    out, before = run_reexec({})
    pid, tunables, huge_kb = out
    assert before == [pid, pid]  # the same process, started twice
    assert tunables == "glibc.malloc.hugetlb=1"
    assert int(huge_kb) > 0


@NEEDS_HUGE
def test_the_operator_can_turn_huge_pages_off() -> None:
    out, before = run_reexec({HUGE_PAGES_ENV: "0"})
    assert before == [out[0]]  # started once
    assert out[1] == "None"


@NEEDS_HUGE
def test_a_node_runs_with_malloc_in_huge_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("GLIBC_TUNABLES", HUGE_PAGES_ENV, HUGE_PAGES_TRIED_ENV):
        monkeypatch.delenv(name, raising=False)  # the node inherits this environment
    home = tmp_path / "node"
    cfg.init_home(home, rpc=f"127.0.0.1:{free_port()}", p2p=f"127.0.0.1:{free_port()}")
    node = start_process_node(home)
    try:
        environ = Path(f"/proc/{node.process.pid}/environ").read_bytes().split(b"\0")
        assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ
    finally:
        node.terminate()


def test_huge_pages_leave_the_calling_process_alone_when_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    reexec_with_huge_pages(["never-run"])  # returns: an exec would end this test process


# What ``ehrnode run`` leaves in aiohttp's default TLS context and in the environment, its
# command line otherwise run (``--help``) and the exec for huge pages left out.
RUN_CA = """
import os, sys
sys.argv = ["ehrnode", "run", "--help"]
from ehrnode.launch import main
try:
    main()
except SystemExit:
    pass
from aiohttp import connector
print(connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"])
print(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
"""


def _system_ca_count() -> int:
    return ssl.create_default_context().cert_store_stats()["x509_ca"]


def test_the_node_imports_aiohttp_without_the_system_ca_certificates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in CA_ENV:
        monkeypatch.delenv(name, raising=False)  # the child's environment, as checked here
    if _system_ca_count() == 0:
        pytest.skip("this system has no default CA certificates to leave out")
    env = dict(os.environ, **{HUGE_PAGES_ENV: "0"})
    done = subprocess.run(
        [sys.executable, "-c", RUN_CA], env=env, capture_output=True, text=True, check=True
    )
    count, ca_env = done.stdout.splitlines()[-2:]
    assert count == "0"  # aiohttp's contexts trust no certificate: TLS would be refused
    assert ca_env == "None None"  # and the node's environment is as it was


def test_no_default_ca_certificates_hides_both_places_and_puts_the_environment_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", "/etc/ssl/certs")
    with no_default_ca_certificates():
        # OpenSSL reads both: a bundle file, and a folder it looks certificates up in
        # only while checking one (which no count shows), so both must lead nowhere.
        assert {os.environ[name] for name in CA_ENV} == {NO_CA}
        assert not os.path.exists(NO_CA)
        assert _system_ca_count() == 0
    assert "SSL_CERT_FILE" not in os.environ
    assert os.environ["SSL_CERT_DIR"] == "/etc/ssl/certs"
    with pytest.raises(RuntimeError), no_default_ca_certificates():
        raise RuntimeError("an import that fails")
    assert "SSL_CERT_FILE" not in os.environ
    assert os.environ["SSL_CERT_DIR"] == "/etc/ssl/certs"
