"""Process-wide tuning shared by the node (``ehrnode run``) and the ``ehr`` CLI.

glibc's malloc adapts its thresholds as a process runs: once a block of size S served by
``mmap`` is freed, blocks up to S come from the heap, and free memory at the top of the
heap beyond 2 S is handed back to the kernel. With the 64-256 KiB buffers a stream of
ciphertext goes through (each socket read, each chunk hashed, written and relayed), the
top of the heap is given back and faulted in again, page by zeroed page, all the time:
perf put the page faults and the zeroing at an eighth of the machine's CPU while a
1 GiB attachment was replicated. Fixed thresholds keep that memory in the process: at
most 64 MiB of free heap, and blocks under 32 MiB (glibc's largest setting) from the heap.
A burst larger than that (a block of thousands of transactions decoded, executed and
written) was still handed back whole once freed, down to 128 KiB, and faulted in again by
the next: a 64 MiB top pad keeps that much of it (validators under load took half the page
faults, 0.1 against 0.2 a transaction, in five alternating pairs; benchmarks note 59).
Those thresholds hold for each of malloc's arenas, and glibc gives each thread that
allocates at the same time as another an arena of its own: the node's write threads and
LevelDB's kept up to 64 MiB each of what they had freed, out of reach of the others. One
arena for every thread lets each reuse what another freed (validators under load peaked
at 184-199 against 214-227 MB; benchmarks note 60).

A node may also fault a share of its heap in at start (``prefault_heap``, the setting
``[memory] prefault_mb``), so that a load right after the start does not pay for the
heap's first touches (benchmarks note 65).

``ehrnode run`` also asks glibc for transparent huge pages (``reexec_with_huge_pages``),
which glibc reads only at exec: the node runs itself again, as the same process. Then it
imports aiohttp without the system's CA certificates (``no_default_ca_certificates``),
which a node never uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
TRIM_THRESHOLD = 64 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024
MMAP_THRESHOLD = 32 * 1024 * 1024
ARENA_MAX = 1
# The most ``prefault_heap`` keeps: mallopt takes a C int, and the trim threshold and top
# pad it raises by this much must stay under 2 GiB. A loaded validator grows to 250 MB.
MAX_PREFAULT_MIB = 1024


def _libc() -> ctypes.CDLL | None:
    """This process's C library with ``mallopt``, ``malloc`` and ``free`` typed, or None
    where there is no glibc ``mallopt`` (another libc, another system)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc, free = libc.mallopt, libc.malloc, libc.free
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    malloc.argtypes = [ctypes.c_size_t]
    malloc.restype = ctypes.c_void_p
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    return libc


def tune_malloc() -> bool:
    """Fix glibc malloc's trim and mmap thresholds and its top pad, and give every thread
    the one arena; False where there is no glibc ``mallopt`` (another libc, another
    system) or it refuses. Call it before starting threads: a thread keeps the arena it
    first allocated from."""
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
        (M_ARENA_MAX, ARENA_MAX),
    )
    return all(bool(mallopt(option, value)) for option, value in settings)


CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"


def machine_memory_mib(cgroup_file: str = CGROUP_MEMORY_MAX) -> int | None:
    """The memory this process may use, in MiB: the machine's physical memory, or its
    cgroup's limit (v2 ``memory.max``) where lower; None where the system does not say."""
    try:
        physical: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (ValueError, OSError):
        physical = None
    try:
        with open(cgroup_file) as handle:
            limit = handle.read().strip()
    except OSError:
        return physical
    if not limit.isdigit():  # "max": no limit
        return physical
    cgroup = int(limit) // (1 << 20)
    return cgroup if physical is None else min(physical, cgroup)


def prefault_heap(mib: int, chunk_mib: int = 8) -> int | None:
    """Fault in ``mib`` MiB of malloc's heap now and keep it for what the node allocates
    later; the MiB faulted in (fewer when memory ran out first), or None where there is no
    glibc ``mallopt``. Call it after ``tune_malloc``, never before: that would set the trim
    threshold and top pad back, and the next large free would hand this memory back.

    A validator's heap grows by about 100 MB in its first minute of load, and each page is
    faulted in as it is first touched: LevelDB's memtable, blocks, batches, and byte strings
    over 512 bytes (smaller objects live in Python's own arenas, outside malloc's heap).
    Where the hypervisor takes back the guest's free memory (this machine's VM does), a
    first touch of a 2 MiB huge page cost 5 ms, against 0.26 ms for one the process had
    touched before: a fresh validator spent a few percent of its CPU under load there.
    Faulting the heap in at start moves that cost to the start, as a JVM's
    ``AlwaysPreTouch`` does. The chunks are faulted in under ``tune_malloc``'s settings
    (its mmap threshold keeps them in the heap); then the trim threshold and top pad grow by
    what was faulted in, and the chunks are freed into the top of the heap, which is kept
    rather than handed back."""
    if mib <= 0:
        return 0
    if mib > MAX_PREFAULT_MIB:
        raise ValueError(f"at most {MAX_PREFAULT_MIB} MiB of heap can be prefaulted, not {mib}")
    libc = _libc()
    if libc is None:
        return None
    mallopt, malloc, free = libc.mallopt, libc.malloc, libc.free
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return None
    chunks: list[int] = []
    done = 0
    try:
        while done < mib:
            size = min(chunk_mib, mib - done) * 1024 * 1024
            chunk = malloc(size)
            if not chunk:
                break  # no more memory to be had: keep what was faulted in
            ctypes.memset(chunk, 0, size)  # a write to every page faults it in
            chunks.append(chunk)
            done += size // (1024 * 1024)
        keep = done * 1024 * 1024
        raised = (
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD + keep, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD + keep, TOP_PAD),
        )
        if not all(bool(mallopt(option, value)) for option, value, _ in raised):
            for option, _, before in raised:  # as tune_malloc left them
                mallopt(option, before)
            done = 0
    finally:
        for chunk in reversed(chunks):
            free(chunk)
    return done


def tune_gc() -> None:
    """Collect the young generation less often and keep what start-up built out of every
    collection. A node holds many small long-lived objects (pending transactions, caches),
    ``ehr import`` tens of megabytes of parsed bundles, and neither makes many reference
    cycles: at the default threshold (700) the collector ran every few hundred objects a
    bundle's parse made, and each older collection walked every bundle still held."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


# Huge pages for malloc's memory (``reexec_with_huge_pages``): "0" turns them off.
HUGE_PAGES_ENV = "EHR_HUGE_PAGES"
# Set in the environment of the exec, so that it is tried once even where glibc drops
# GLIBC_TUNABLES (a secure-execution process).
HUGE_PAGES_TRIED_ENV = "EHR_HUGE_PAGES_TRIED"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_environment(
    environ: Mapping[str, str], libc: str | None, thp_mode: str | None
) -> dict[str, str] | None:
    """The environment in which to run the node again so that glibc's malloc takes its
    memory in transparent huge pages, or None when that is off, already so, or not
    possible: ``libc`` as ``confstr("CS_GNU_LIBC_VERSION")`` gives it ("glibc 2.36"),
    ``thp_mode`` the kernel's ``transparent_hugepage/enabled`` ("always [madvise] never").

    glibc 2.35 and later read ``glibc.malloc.hugetlb=1`` from ``GLIBC_TUNABLES`` at exec
    only: malloc then grows its heaps in 2 MiB steps and advises the kernel to back them
    with huge pages. LevelDB's memtable, the blocks, batches and buffers a validator
    allocates by the megabyte then take one page fault each 2 MiB instead of each 4 KiB,
    and fewer TLB misses (docs/benchmarks.md, note 52)."""
    if environ.get(HUGE_PAGES_ENV, "1") == "0" or HUGE_PAGES_TRIED_ENV in environ:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGETLB_TUNABLE in tunables:
        return None  # set already: by the operator, or by the exec that made this process
    name, _, version = (libc or "").partition(" ")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):
        return None
    if thp_mode is None or "[never]" in thp_mode:
        return None
    env = dict(environ)
    setting = f"{HUGETLB_TUNABLE}=1"
    env["GLIBC_TUNABLES"] = f"{tunables}:{setting}" if tunables else setting
    env[HUGE_PAGES_TRIED_ENV] = "1"
    return env


def reexec_with_huge_pages(argv: Sequence[str] | None = None) -> None:
    """Run this process again (same pid, same arguments) with glibc's huge-page tunable,
    where ``huge_pages_environment`` says so; return only when it does not. Called by
    ``ehrnode run`` before it imports the node, so the second start costs about 50 ms."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return
    try:
        with open(THP_MODE_FILE) as handle:
            thp_mode: str | None = handle.read()
    except OSError:
        thp_mode = None
    env = huge_pages_environment(os.environ, libc, thp_mode)
    if env is None:
        return
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError:
        return  # run on without: huge pages are a saving, not a need


# Names a folder: ``ehrnode run`` times its stages there (``ehrnode.bench.nodetimes``).
STAGE_TIMES_ENV = "EHR_STAGE_TIMES"


# OpenSSL's variables for where the default CA certificates are, and a path no file can
# have (a folder under the null device).
CA_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")
NO_CA = os.path.join(os.devnull, "no-ca-certificates")


@contextlib.contextmanager
def no_default_ca_certificates() -> Iterator[None]:
    """Inside it, a TLS context that loads the system's default CA certificates finds none;
    the environment is as it was once it ends.

    aiohttp builds two TLS client contexts when imported, and each loads the system's CA
    certificates: about 40 ms of a node's start of 0.3 s (benchmarks note 62). A node
    never opens TLS (its peers, block sync and replication speak plain HTTP), so
    ``ehrnode run`` imports aiohttp inside this: its default contexts then trust no
    certificate, so TLS, were a node ever to open it, would be refused, not let through.
    The ``ehr`` client, which may reach a node through a TLS proxy, is left alone."""
    saved = {name: os.environ.get(name) for name in CA_ENV}
    os.environ.update(dict.fromkeys(CA_ENV, NO_CA))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
