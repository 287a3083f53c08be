"""The mypyc build of the transaction path: loaded only for the sources it was made from,
never instead of an edited source, and the same behaviour as the Python it came from."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ehrnode import compiled

ROOT = Path(__file__).resolve().parents[1]
BUILT = (compiled.build_dir() / "complete").is_file()
needs_build = pytest.mark.skipif(
    not BUILT,
    reason="no compiled build in this environment (scripts/* build it; without a C compiler "
    "or Python's headers ehrnode runs as Python)",
)

# What a fresh interpreter loads for one compiled module.
PROBE = "import ehrnode.core.tx as m; print(m.__file__)"


def _copy_package(into: Path) -> Path:
    shutil.copytree(
        compiled.PACKAGE, into / "ehrnode", ignore=shutil.ignore_patterns("__pycache__")
    )
    return into / "ehrnode"


def _loaded(pythonpath: Path | None = None, code: str = PROBE, **env: str) -> str:
    """What a fresh interpreter running ``code`` prints (by default, where it loaded a
    compiled module from)."""
    environ = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, **env},
        cwd=pythonpath or ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_the_fingerprint_follows_every_source_of_the_package(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    assert compiled.fingerprint(copy) == compiled.fingerprint()
    # Not a compiled module: compiled code is typed against what it imports.
    with (copy / "store" / "chain.py").open("a") as handle:
        handle.write("\n# an edit\n")
    edited = compiled.fingerprint(copy)
    assert edited != compiled.fingerprint()
    (copy / "extra.py").write_text("")
    assert compiled.fingerprint(copy) not in (edited, compiled.fingerprint())


@needs_build
def test_the_build_is_loaded_for_the_sources_it_was_made_from(tmp_path: Path) -> None:
    assert compiled.active()  # this test process
    for name in compiled.MODULES:  # each subpackage's folder too (core, store)
        module = importlib.import_module("ehrnode." + name.removesuffix(".py").replace("/", "."))
        assert str(module.__file__).startswith(str(compiled.build_dir())), name
    loaded = _loaded()
    assert loaded.startswith(str(compiled.build_dir())) and loaded.endswith(".so")
    # A copy of the same sources elsewhere has the same fingerprint, so the same build.
    _copy_package(tmp_path)
    assert _loaded(tmp_path).startswith(str(compiled.build_dir()))


@needs_build
def test_an_edited_source_runs_as_python_never_from_a_stale_build(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    with (copy / "core" / "tx.py").open("a") as handle:
        handle.write("\nEDITED = True\n")
    assert _loaded(tmp_path) == str(copy / "core" / "tx.py")


SPAWNED = """
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import ehrnode.core.tx


def where():
    import ehrnode.core.errors, ehrnode.core.tx
    return ehrnode.core.tx.__file__


if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        print(pool.submit(where).result())
"""


@needs_build
def test_a_spawned_process_loads_the_package_from_anywhere(tmp_path: Path) -> None:
    """A child started by ``spawn`` copies its parent's sys.path, which holds the build's
    shared library: from a folder other than the sources' (where ``ehrnode`` is not found
    first in the current directory), it still imports the package, compiled."""
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNED)
    environ = {k: v for k, v in os.environ.items() if k not in (compiled.PURE_ENV, "PYTHONPATH")}
    out = subprocess.run(
        [sys.executable, str(script)],
        env=environ,
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(compiled.build_dir()))


def test_pure_python_on_request() -> None:
    assert _loaded(**{compiled.PURE_ENV: "1"}) == str(compiled.PACKAGE / "core" / "tx.py")


@needs_build
def test_the_core_tests_pass_on_the_python_sources_too() -> None:
    """The suite runs on the build; the modules it compiles are also tested as Python."""
    files = [
        "test_codec.py",
        "test_tx.py",
        "test_tx_bodies.py",
        "test_tx_types.py",
        "test_state.py",
        "test_state_records.py",
        "test_state_grants.py",
        "test_state_hash.py",
        "test_mempool.py",
        "test_admission_batch.py",
        "test_block.py",
        "test_authority.py",
        "test_merkle.py",
        "test_crypto.py",
        "test_claim_filter.py",
        "test_commit_batches.py",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [f"tests/{name}" for name in files],
        env={**os.environ, compiled.PURE_ENV: "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


# Counts the package's modules a fresh interpreter compiles from source to import a node.
COMPILES = """
import importlib._bootstrap_external as ext
from_source = []
real = ext.SourceLoader.source_to_code
def counting(self, data, path, *args, **kwargs):
    from_source.append(path)
    return real(self, data, path, *args, **kwargs)
ext.SourceLoader.source_to_code = counting
import ehrnode.node, ehrnode.cli
print(sum("/ehrnode/" in str(path) for path in from_source))
"""


def _compiled_at_start(pythonpath: Path) -> int:
    # Every module from the copy's sources, where Python writes no .pyc.
    env = {compiled.PURE_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return int(_loaded(pythonpath, COMPILES, **env))


def test_scripts_byte_compile_the_package_so_a_start_compiles_none_of_it(
    tmp_path: Path,
) -> None:
    """Where Python writes no .pyc (PYTHONDONTWRITEBYTECODE), every start compiled the
    package's sources again; ``main`` (run by scripts/*) writes them once."""
    copy = _copy_package(tmp_path)
    assert _compiled_at_start(tmp_path) > 40  # and again at the next start: nothing written
    assert _compiled_at_start(tmp_path) > 40
    assert compiled.write_bytecode(copy)
    assert _compiled_at_start(tmp_path) == 0
    # An edited source is compiled again (its .pyc no longer matches), and no other.
    with (copy / "store" / "chain.py").open("a") as handle:
        handle.write("\n# an edit, one byte longer than before\n")
    assert _compiled_at_start(tmp_path) == 1
    assert compiled.write_bytecode(copy)
    assert _compiled_at_start(tmp_path) == 0
