"""The ``ehrnode`` command: init, run, testnet, keys.

    ehrnode init --home DIR [--chain-id ID] [--genesis FILE] [--rpc HOST:PORT] [--p2p HOST:PORT]
    ehrnode run --home DIR
    ehrnode testnet --nodes N --dir DIR [--base-port P] [--load PATH ...] [--reset]
    ehrnode check --home DIR [--last N]
    ehrnode keys new --out FILE | ehrnode keys show --home DIR

Exit status 0 on success; otherwise a one-line reason on stderr and status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ehrnode import config as cfg
from ehrnode.config import init_home
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError, EhrError
from ehrnode.core.genesis import Genesis
from ehrnode.keys import load_identity, save_identity
from ehrnode.node import Node
from ehrnode.process import (
    STAGE_TIMES_ENV,
    machine_memory_mib,
    prefault_heap,
    tune_gc,
    tune_malloc,
)
from ehrnode.store.chain import Chain
from ehrnode.store.check import check_chain
from ehrnode.store.db import LevelKV

log = logging.getLogger("ehrnode")


def _setup_logging(level: str, path: Path | None = None) -> None:
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if path is None else logging.FileHandler(path)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def run_node(home: Path) -> None:
    node_config = cfg.load(home)
    _setup_logging(node_config.log_level)
    _prefault(node_config.memory.prefault_mb)
    node = Node(node_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    print(f"ehrnode {node.identity.public_id} serving RPC on {node.rpc_url}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await node.stop()


def _prefault(mib: int) -> None:
    """``memory.prefault_mb``: the heap a loaded validator grows to, faulted in before the
    node opens anything (``process.prefault_heap``)."""
    if not mib:
        return
    machine_mib = machine_memory_mib()
    if machine_mib and mib > machine_mib // 2:
        raise ConfigError(
            f"{cfg.CONFIG_FILE}: memory.prefault_mb is {mib} MiB, more than half of the "
            f"{machine_mib} MiB of memory this node may use"
        )
    started = time.perf_counter()
    done = prefault_heap(mib)
    took = time.perf_counter() - started
    if done is None:
        log.warning("memory.prefault_mb ignored: this system's malloc has no glibc mallopt")
    elif done < mib:
        log.warning("faulted in only %d of %d MiB of heap (memory.prefault_mb)", done, mib)
    else:
        log.info("faulted in %d MiB of heap in %.2f s", done, took)


def _cmd_init(args: argparse.Namespace) -> int:
    genesis = None
    if args.genesis:
        genesis = Genesis.from_json(Path(args.genesis).read_text())
    identity = init_home(
        Path(args.home),
        chain_id=args.chain_id,
        genesis=genesis,
        rpc=args.rpc,
        p2p=args.p2p,
        moniker=args.moniker,
    )
    print(identity.public_id)
    return 0


def _install_uvloop() -> None:
    """A faster event loop where uvloop is installed (a dependency where it builds)."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return
    uvloop.install()


def _stage_times() -> None:
    """``scripts/bench --stage-times``: stage timers in this node (``bench.nodetimes``)."""
    folder = os.environ.get(STAGE_TIMES_ENV)
    if folder:
        from ehrnode.bench import nodetimes  # noqa: PLC0415 - only when asked for

        nodetimes.record(Path(folder))


def _cmd_run(args: argparse.Namespace) -> int:
    _install_uvloop()
    tune_gc()
    tune_malloc()
    _stage_times()
    asyncio.run(run_node(Path(args.home)))
    return 0


def _cmd_testnet(args: argparse.Namespace) -> int:
    # Here, not at the top: it brings the client's modules, which ``run`` never needs.
    from ehrnode.testnet import run_testnet  # noqa: PLC0415

    return run_testnet(
        nodes=args.nodes,
        directory=Path(args.dir),
        base_port=args.base_port,
        load=[Path(p) for p in args.load or []],
        samples=args.samples,
        reset=args.reset,
    )


def _cmd_check(args: argparse.Namespace) -> int:
    node_config = cfg.load(Path(args.home))
    genesis = Genesis.from_json(node_config.genesis_path.read_text())
    kv = LevelKV(node_config.data_dir)
    try:
        chain = Chain(kv, genesis, node_config.blocks_dir)
        report = check_chain(chain, last_blocks=args.last)
        chain.close()
    finally:
        kv.close()
    print(
        f"height {report.height}: {report.blocks_checked} blocks checked, state hash "
        f"{'matches' if report.state_entries_hash_ok else 'DOES NOT match'}, index entries "
        f"{'match' if report.index_entries_ok else 'DO NOT match'}"
    )
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "new":
        identity = Identity.generate()
        save_identity(identity, Path(args.out))
        print(identity.public_id)
    else:
        print(load_identity(Path(args.home) / cfg.KEY_FILE).public_id)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ehrnode", description="Run an ehrnode health-record node.")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a node home (key, config, genesis)")
    init.add_argument("--home", required=True)
    init.add_argument("--chain-id", default="ehr-local")
    init.add_argument("--genesis", help="join the network of this genesis file")
    init.add_argument("--rpc", default="127.0.0.1:8645", help="RPC listen address")
    init.add_argument("--p2p", default="127.0.0.1:8646", help="peer listen address")
    init.add_argument("--moniker", default="ehrnode")
    init.set_defaults(func=_cmd_init)

    run = sub.add_parser("run", help="run the node in the foreground")
    run.add_argument("--home", required=True)
    run.set_defaults(func=_cmd_run)

    testnet = sub.add_parser("testnet", help="create and run a local network")
    testnet.add_argument("--nodes", type=int, default=4)
    testnet.add_argument("--dir", required=True)
    testnet.add_argument("--base-port", type=int, default=26650)
    testnet.add_argument(
        "--load", nargs="*", help="Synthea bundle files or folders to import once started"
    )
    testnet.add_argument(
        "--samples", type=int, default=0, help="import only this many bundles (0: all given)"
    )
    testnet.add_argument("--reset", action="store_true", help="delete DIR's network first")
    testnet.set_defaults(func=_cmd_testnet)

    check = sub.add_parser("check", help="check a stopped node's database for consistency")
    check.add_argument("--home", required=True)
    check.add_argument("--last", type=int, help="check only the last N blocks' links")
    check.set_defaults(func=_cmd_check)

    keys = sub.add_parser("keys", help="create or show keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="write a new identity to a key file")
    new.add_argument("--out", required=True)
    show = keys_sub.add_parser("show", help="print a node's public id")
    show.add_argument("--home", required=True)
    keys.set_defaults(func=_cmd_keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except EhrError as err:
        print(f"ehrnode: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        print(f"ehrnode: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
