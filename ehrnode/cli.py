"""The ``ehrnode`` command: init, run, testnet, keys.

    ehrnode init --home DIR [--chain-id ID] [--genesis FILE] [--rpc HOST:PORT] [--p2p HOST:PORT]
    ehrnode run --home DIR
    ehrnode testnet --nodes N --dir DIR [--base-port P] [--load PATH ...] [--reset]
    ehrnode keys new --out FILE | ehrnode keys show --home DIR

Exit status 0 on success; otherwise a one-line reason on stderr and status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from ehrnode import config as cfg
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import EhrError
from ehrnode.core.genesis import Genesis, ValidatorInfo
from ehrnode.keys import load_identity, save_identity

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


def init_home(
    home: Path,
    *,
    chain_id: str = "ehr-local",
    genesis: Genesis | None = None,
    identity: Identity | None = None,
    rpc: str = "127.0.0.1:8645",
    p2p: str = "127.0.0.1:8646",
    peers: tuple[str, ...] = (),
    moniker: str = "ehrnode",
) -> Identity:
    """Create a node home: key, config and (unless given) a one-validator genesis."""
    if (home / cfg.KEY_FILE).exists():
        raise EhrError(f"{home} already holds a node; refusing to overwrite it")
    home.mkdir(parents=True, exist_ok=True)
    identity = identity or Identity.generate()
    save_identity(identity, home / cfg.KEY_FILE)
    if genesis is None:
        genesis = Genesis(
            chain_id=chain_id,
            genesis_time=int(time.time() * 1000),
            validators=(ValidatorInfo(identity.public_key, 1, moniker),),
        )
    (home / cfg.GENESIS_FILE).write_text(genesis.to_json())
    node_config = cfg.NodeConfig(
        home=home,
        moniker=moniker,
        rpc=cfg.RpcConfig(listen=rpc),
        p2p=cfg.P2pConfig(listen=p2p, peers=peers),
    )
    (home / cfg.CONFIG_FILE).write_text(cfg.render(node_config))
    return identity


async def run_node(home: Path) -> None:
    from ehrnode.node import Node

    node_config = cfg.load(home)
    _setup_logging(node_config.log_level)
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


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run_node(Path(args.home)))
    return 0


def _cmd_testnet(args: argparse.Namespace) -> int:
    from ehrnode.testnet import run_testnet

    return run_testnet(
        nodes=args.nodes,
        directory=Path(args.dir),
        base_port=args.base_port,
        load=[Path(p) for p in args.load or []],
        samples=args.samples,
        reset=args.reset,
    )


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
