"""The transaction path compiled to C with mypyc, used only while it matches the source.

The modules in ``MODULES`` (decoding, the rules, the state, the mempool, admission, the
blob-claim filter, a commit's LevelDB batch) are plain typed Python. ``main()``, which
``scripts/*`` run, compiles them with mypyc (part of mypy, a dev dependency) into the
virtual environment, in a folder named by a fingerprint of the interpreter and every
``.py`` of the package: compiled code is typed against the modules it imports, so an edit
to any of them calls for a new build. It byte-compiles the whole package first
(``write_bytecode``), in or out of a virtual environment.

``ehrnode/__init__.py`` calls ``activate``, which puts that folder ahead of the sources on
the packages' search paths when it exists for the sources as they are now. An edited
source changes the fingerprint, so a stale build is never loaded: the sources run as
Python until the next build.

``EHR_PURE_PYTHON=1`` runs the sources as Python even where a build exists. Without a C
compiler or Python's headers the build fails with a note and everything runs as Python.
The build takes about 3% off a validator's CPU a transaction in the bench's network
(eleven alternating pairs, each within the machine's noise) and 8% with four validators
in one process (docs/benchmarks.md, note 42).

Compiled code differs from Python in ways the tests found; in a module of ``MODULES``:
annotations are checked at every call (type what comes from outside as ``object`` or
``Any`` and check it, so that bad input gets its own error, not a ``TypeError``); a
class has no ``__dict__`` (no ``functools.cached_property``) and keeps a value given for
an ``int`` field as an int (check ``bool`` before building it); an exception class loses
its class attributes. ``scripts/test`` runs the suite on the build and the core tests on
the sources.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path

import ehrnode

PACKAGE = Path(__file__).resolve().parent
PURE_ENV = "EHR_PURE_PYTHON"
# Relative to the package. Left as Python: errors.py (mypyc's exception classes lose the
# class attributes, an error's HTTP status, that the RPC reads); block.py (a vote built
# from the wire would keep True as 1, past its bool check); crypto.py (a compiled class
# has no __dict__, so Identity's cached_property would derive the key pair at every use).
MODULES = (
    "core/access.py",
    "core/authority.py",
    "core/bodies.py",
    "core/codec.py",
    "core/layout.py",
    "core/merkle.py",
    "core/records.py",
    "core/state.py",
    "core/statekv.py",
    "core/tx.py",
    "store/claims.py",
    "store/batches.py",
    "admission.py",
    "mempool.py",
)
FOLDER = "ehrnode-compiled"
SHARED = "shared"  # in a build, the folder of mypyc's shared library
KEEP_BUILDS = 3


def fingerprint(package: Path = PACKAGE) -> str:
    """What a build was made from: the interpreter and the package's sources (about 650 kB,
    3 ms to hash at every start)."""
    digest = hashlib.sha256(f"{sys.implementation.cache_tag} {sys.version}".encode())
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def build_dir() -> Path:
    """Where the build for the sources as they are now lives (or would)."""
    return Path(sys.prefix) / FOLDER / fingerprint()


def active() -> bool:
    """Whether this process runs the compiled modules."""
    tx = importlib.import_module("ehrnode.core.tx")
    return tx.__file__ is not None and not tx.__file__.endswith(".py")


def activate() -> bool:
    """Load the compiled modules from here on, if a build matches the sources."""
    if os.environ.get(PURE_ENV) or sys.prefix == sys.base_prefix:
        return False  # asked for Python, or not in a virtual environment: no build
    try:
        where = build_dir()
    except OSError:
        return False
    if not (where / "complete").is_file():
        return False
    sys.path.append(str(where / SHARED))  # mypyc's shared library, a top-level module
    ehrnode.__path__.insert(0, str(where / "ehrnode"))
    for package in sorted({Path(name).parent.as_posix() for name in MODULES} - {"."}):
        sub = importlib.import_module("ehrnode." + package.replace("/", "."))
        sub.__path__.insert(0, str(where / "ehrnode" / package))
    return True


def build() -> Path:
    """Compile ``MODULES`` for the sources as they are now, unless done; the build's folder.

    Raises ``subprocess.CalledProcessError`` (with mypyc's output) when mypyc fails."""
    import shutil  # noqa: PLC0415 - here, not at every start of every process
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    done = build_dir()
    if (done / "complete").is_file():
        return done
    with tempfile.TemporaryDirectory(prefix="ehrnode-mypyc-") as scratch:
        work = Path(scratch)
        shutil.copytree(PACKAGE, work / "ehrnode", ignore=shutil.ignore_patterns("__pycache__"))
        # Named by what was copied: a source edited during the build is not covered by it.
        where = Path(sys.prefix) / FOLDER / fingerprint(work / "ehrnode")
        (work / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
        subprocess.run(
            [sys.executable, "-m", "mypyc", "--config-file", "mypy.ini"]
            + [f"ehrnode/{name}" for name in MODULES],
            cwd=work,
            check=True,
            capture_output=True,
        )
        where.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=where.parent))
        for name in MODULES:
            (built,) = (work / "ehrnode" / name).parent.glob(Path(name).stem + ".*.so")
            target = staging / "ehrnode" / Path(name).parent / built.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, target)
        # mypyc's shared library is a top-level module, so its folder goes on sys.path: a
        # folder of its own, for that folder to hold no "ehrnode" that a spawned process
        # (whose sys.path is copied from its parent's) could import as a namespace package.
        for shared in work.glob("*__mypyc.*.so"):
            (staging / SHARED).mkdir(exist_ok=True)
            shutil.copy2(shared, staging / SHARED / shared.name)
        (staging / "complete").write_text("")
        try:
            staging.rename(where)
        except OSError:  # another process built the same sources meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    # Builds of earlier sources: the newest few are kept for processes still running on them.
    builds = sorted(
        (p for p in where.parent.iterdir() if not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    for old in builds[:-KEEP_BUILDS]:
        if old != where:
            shutil.rmtree(old, ignore_errors=True)
    return where


def write_bytecode(package: Path = PACKAGE) -> bool:
    """Byte-compile every module of ``package`` that has no up-to-date ``.pyc``, as pip does
    for a package it installs; False if a module does not compile or its ``.pyc`` cannot
    be written (a read-only folder: the sources are then compiled at each start, as
    before).

    Python writes a module's ``.pyc`` when it first imports it, unless told not to
    (``PYTHONDONTWRITEBYTECODE``, set on the bench's machine): then every process compiles
    the package's sources again at every start, about 40 ms of a node's 0.3 s start
    (docs/benchmarks.md, note 61). Written here, the ``.pyc`` files are read all the same;
    an edited source is compiled again by its next import, and here by the next script."""
    import compileall  # noqa: PLC0415 - only in scripts, not at every start

    return bool(compileall.compile_dir(package, quiet=2))


def main() -> int:
    write_bytecode()
    if sys.prefix == sys.base_prefix:
        print("ehrnode.compiled: not in a virtual environment; nothing built", file=sys.stderr)
        return 0
    if (build_dir() / "complete").is_file():
        return 0
    import subprocess  # noqa: PLC0415 - only to build

    print("compiling the transaction path with mypyc (about 25 s)", file=sys.stderr)
    try:
        where = build()
    except subprocess.CalledProcessError as err:
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(
            errors="replace"
        )
        print(output[-3000:], file=sys.stderr)
        print("note: mypyc failed; ehrnode runs as Python (slower)", file=sys.stderr)
        return 0
    except (OSError, ValueError) as err:
        print(f"note: no compiled build ({err}); ehrnode runs as Python", file=sys.stderr)
        return 0
    print(f"compiled into {where}", file=sys.stderr)
    return 0
