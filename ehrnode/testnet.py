"""``ehrnode testnet``: a local network of N validators, each a separate ``ehrnode run``
process on 127.0.0.1, in the foreground until Ctrl-C.

    DIR/testnet.json   {"chain_id", "nodes": [{"name", "rpc", "p2p", "public_id", "home"}],
                        "keys_dir", "loaded": [paths imported so far]}
    DIR/node<i>/       each node's home (config, genesis, key, data, node.log)
    DIR/keys/          identities created by the sample import (patients, providers, ...)

Run again with the same DIR and the network resumes where it stopped (data kept, samples
not imported twice); ``--reset`` starts afresh.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from ehrnode import config as cfg
from ehrnode.client.bundles import bundle_files
from ehrnode.config import init_home
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError
from ehrnode.core.genesis import Genesis, ValidatorInfo

MANIFEST = "testnet.json"
CHAIN_ID = "ehr-testnet"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def create(directory: Path, nodes: int, base_port: int) -> dict[str, Any]:
    if not 1 <= nodes <= 64:
        raise ConfigError("--nodes must be from 1 to 64")
    identities = [Identity.generate() for _ in range(nodes)]
    genesis = Genesis(
        chain_id=CHAIN_ID,
        genesis_time=int(time.time() * 1000),
        validators=tuple(
            ValidatorInfo(identity.public_key, 1, f"Institution {i}")
            for i, identity in enumerate(identities)
        ),
    )
    addresses = [
        (f"127.0.0.1:{base_port + 2 * i}", f"127.0.0.1:{base_port + 2 * i + 1}")
        for i in range(nodes)
    ]
    entries = []
    for i, identity in enumerate(identities):
        rpc, p2p = addresses[i]
        peers = tuple(
            f"{other.public_id}@{addresses[j][1]}" for j, other in enumerate(identities) if j != i
        )
        home = directory / f"node{i}"
        init_home(
            home,
            genesis=genesis,
            identity=identity,
            rpc=rpc,
            p2p=p2p,
            peers=peers,
            moniker=f"node{i}",
        )
        entries.append(
            {
                "name": f"node{i}",
                "rpc": f"http://{rpc}",
                "p2p": p2p,
                "public_id": identity.public_id,
                "home": str(home),
            }
        )
    manifest = {
        "chain_id": CHAIN_ID,
        "nodes": entries,
        "keys_dir": str(directory / "keys"),
        "loaded": [],
    }
    _save(directory, manifest)
    return manifest


def _save(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/health", timeout=1) as response:
            return bool(json.load(response).get("ok"))
    except (OSError, ValueError):
        return False


def start(manifest: dict[str, Any], timeout: float = 60.0) -> list[subprocess.Popen[bytes]]:
    processes: list[subprocess.Popen[bytes]] = []
    for entry in manifest["nodes"]:
        for address in (entry["rpc"].removeprefix("http://"), entry["p2p"]):
            port = cfg.split_address(address)[1]
            if not _port_free(port):
                stop(processes)
                raise ConfigError(
                    f"port {port} for {entry['name']} is in use (another testnet running?); "
                    "stop it or pick --base-port with --reset"
                )
        home = Path(entry["home"])
        log = open(home / "node.log", "ab")  # noqa: SIM115 - handed to the child
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "ehrnode", "run", "--home", str(home)],
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches us; we stop the nodes in order
            )
        )
        log.close()
    deadline = time.monotonic() + timeout
    for entry, process in zip(manifest["nodes"], processes, strict=True):
        while not _healthy(entry["rpc"]):
            if process.poll() is not None or time.monotonic() > deadline:
                stop(processes)
                log_path = Path(entry["home"]) / "node.log"
                said = _last_line(log_path)
                raise ConfigError(
                    f"{entry['name']} did not start{': ' + said if said else ''}; see {log_path}"
                )
            time.sleep(0.1)
    return processes


def _last_line(path: Path) -> str:
    """The last line a node wrote to its log (why it stopped, as a rule)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, 2) - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _bundles(paths: list[Path], samples: int) -> list[Path]:
    files = bundle_files(paths)
    if samples:
        files = sorted(files, key=lambda f: f.stat().st_size)[:samples]
    return files


def load_samples(manifest: dict[str, Any], directory: Path, files: list[Path]) -> None:
    todo = [f for f in files if str(f.resolve()) not in manifest["loaded"]]
    if not todo:
        return
    first = manifest["nodes"][0]
    command = [
        sys.executable,
        "-m",
        "ehrnode.client.cli",
        "--node",
        first["rpc"],
        "--key",
        str(Path(first["home"]) / cfg.KEY_FILE),
        "import",
        "--keys-dir",
        manifest["keys_dir"],
        *[str(f) for f in todo],
    ]
    print(f"importing {len(todo)} Synthea bundle(s) through {first['name']} ...", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise ConfigError("the sample import failed (see above); the network keeps running")
    manifest["loaded"].extend(str(f.resolve()) for f in todo)
    _save(directory, manifest)


def _example_patient(manifest: dict[str, Any]) -> tuple[str, str] | None:
    """A patient's key file and one of their record ids, for the hints."""
    keys = sorted(Path(manifest["keys_dir"]).glob("patient-*.json"))
    if not keys:
        return None
    public_id = json.loads(keys[0].read_text())["public_id"]
    url = f"{manifest['nodes'][0]['rpc']}/v1/patients/{public_id}/records?limit=1"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            records = json.load(response)["records"]
    except (OSError, ValueError, KeyError):
        return None
    return (str(keys[0]), records[0]["id"]) if records else None


def hints(manifest: dict[str, Any], directory: Path) -> str:
    lines = [
        "",
        f"Network '{manifest['chain_id']}' of {len(manifest['nodes'])} validator(s) is running "
        "(Ctrl-C stops it; run the same command again to resume).",
    ]
    for entry in manifest["nodes"]:
        lines.append(f"  {entry['name']}  {entry['rpc']}  {entry['public_id']}")
    lines += [f"Manifest: {directory / MANIFEST}", "", "Try, in another terminal:"]
    activate = Path(sys.executable).parent / "activate"
    if activate.exists():
        lines.append(f"  source {activate}        # puts ehr and ehrnode on PATH")
    url = manifest["nodes"][-1]["rpc"]
    lines.append(f"  export EHR_NODE={url}   # any node will do")
    example = _example_patient(manifest)
    if example is not None:
        key, record = example
        lines += [
            f"  export EHR_KEY={key}   # a sample patient",
            "  ehr records                      # the patient's records",
            f"  ehr read {record}",
            "  ehr audit                        # who read the patient's records, and when",
            f"  ehr verify {record}   # inclusion proof against the genesis validators",
        ]
    lines += [
        "  ehr keygen --out me.json && ehr --key me.json register patient",
        f"  curl -s {url}/v1/status",
        "",
    ]
    return "\n".join(lines)


def run_testnet(
    *, nodes: int, directory: Path, base_port: int, load: list[Path], samples: int, reset: bool
) -> int:
    if reset and directory.exists():
        shutil.rmtree(directory)
    manifest_path = directory / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if len(manifest["nodes"]) != nodes:
            raise ConfigError(
                f"{directory} holds a network of {len(manifest['nodes'])} node(s); "
                "use --reset to replace it"
            )
        print(f"resuming the network in {directory}", flush=True)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        manifest = create(directory, nodes, base_port)
        print(f"created a network of {nodes} validator(s) in {directory}", flush=True)
    files = _bundles(load, samples)
    processes = start(manifest)
    stopping = False

    def _interrupt(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if files:
            load_samples(manifest, directory, files)
        print(hints(manifest, directory), flush=True)
        while not stopping:
            for entry, process in zip(manifest["nodes"], processes, strict=True):
                if process.poll() is not None:
                    print(f"{entry['name']} exited with status {process.returncode}", flush=True)
                    stopping = True
            time.sleep(0.2)
    finally:
        print("stopping the network ...", flush=True)
        stop(processes)
    return 0
