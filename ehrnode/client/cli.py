"""The ``ehr`` command: the SDK for people and scripts.

    ehr [--node URL] [--key KEYFILE] [--json] COMMAND ...

``--node`` and ``--key`` fall back to the EHR_NODE and EHR_KEY environment variables
(the node defaults to http://127.0.0.1:8645). With ``--json`` the command prints exactly
one JSON document on stdout (on failure ``{"error": {"code", "message"}}``) and nothing
else there. Exit status: 0 on success, 1 when the command fails, 2 for bad usage; a
failure's reason is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import select
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from ehrnode.client.errors import InvalidResource
from ehrnode.client.importer import BUNDLES_AT_ONCE, Importer, bundle_files
from ehrnode.client.sdk import Client
from ehrnode.core import tx
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError, EhrError
from ehrnode.core.genesis import Genesis
from ehrnode.keys import load_identity, save_identity
from ehrnode.process import tune_gc, tune_malloc

DEFAULT_NODE = "http://127.0.0.1:8645"
Output = tuple[Any, str]  # (the JSON document, the human text)
Command = Callable[[Client, argparse.Namespace], Awaitable[Output]]


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see 'ehr --help')")


# --- commands -------------------------------------------------------------------------------


def _submitted(what: str, done: Any) -> str:
    where = f"at height {done.height}" if done.height is not None else "(not yet committed)"
    return f"{what}: tx {done.id} {done.status} {where}"


async def cmd_register(client: Client, args: argparse.Namespace) -> Output:
    endorsement = None
    if args.endorser:
        endorser = load_identity(Path(args.endorser))
        endorsement = tx.endorse(endorser, client.chain_id, args.role, client.public_key)
    done = await client.register(args.role, args.name, endorsement)
    doc = {"public_id": client.public_id, "role": args.role, **done.to_json()}
    return doc, _submitted(f"registered {client.public_id} as {args.role}", done)


def _load_resource(path: Path) -> dict[str, Any]:
    try:
        resource = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise InvalidResource(f"{path} is not JSON: {err}") from err
    if not isinstance(resource, dict):
        raise InvalidResource(f"{path} does not hold a JSON object")
    return resource


async def cmd_put(client: Client, args: argparse.Namespace) -> Output:
    resources = [_load_resource(Path(name)) for name in args.files]
    if len(resources) == 1:
        done = await client.put(args.patient, resources[0], args.amends)
        doc = {"record": done.id, "type": resources[0]["resourceType"], **done.to_json()}
        return doc, done.id
    if args.amends:
        raise UsageError("--amends takes one file: it names the record that file replaces")
    ids = await client.put_many(args.patient, resources)
    records = [
        {"record": rid, "type": r["resourceType"]} for rid, r in zip(ids, resources, strict=True)
    ]
    return {"records": records, "status": "committed"}, "\n".join(ids)


async def cmd_attach(client: Client, args: argparse.Namespace) -> Output:
    content_type = args.content_type or mimetypes.guess_type(args.file)[0]
    done = await client.put_attachment(
        args.patient, Path(args.file), content_type or "application/octet-stream"
    )
    return {"record": done.id, "type": "Binary", **done.to_json()}, done.id


async def cmd_read(client: Client, args: argparse.Namespace) -> Output:
    resource = await client.read(args.record_id, args.out)
    doc = {"record": args.record_id, "resource": resource}
    if args.out:
        doc["out"] = args.out
        return doc, f"wrote record {args.record_id} ({resource['resourceType']}) to {args.out}"
    return doc, json.dumps(resource, indent=2, ensure_ascii=False)


def _record_line(r: dict[str, Any]) -> str:
    state = "  ERASED" if r["erased"] else ""
    return f"{r['id']}  {r['type']:<24} v{r['version']}  height {r['height']}{state}"


async def cmd_records(client: Client, args: argparse.Namespace) -> Output:
    patient = args.patient or client.public_id
    records = await client.records(patient, args.type)
    lines = [_record_line(r) for r in records] or ["(no records)"]
    return {"patient": patient, "records": records}, "\n".join(lines)


async def cmd_versions(client: Client, args: argparse.Namespace) -> Output:
    versions = await client.versions(args.record_id)
    return {"versions": versions}, "\n".join(_record_line(v) for v in versions)


def _grant_line(g: dict[str, Any]) -> str:
    scope = "standing " + ",".join(g["types"] or ["all types"])
    if g["scope"] == "records":
        scope = f"{len(g['records'])} record(s)"
    state = "in force" if g["in_force"] else ("revoked" if g["revoked"] else "expired")
    return f"{g['id']}  to {g['grantee']}  {scope}  {state}"


async def cmd_grants(client: Client, args: argparse.Namespace) -> Output:
    patient = args.patient or client.public_id
    grants = await client.grants(patient)
    lines = [_grant_line(g) for g in grants] or ["(no grants)"]
    return {"patient": patient, "grants": grants}, "\n".join(lines)


def parse_time(text: str) -> datetime:
    """ISO 8601; UTC unless the text names a zone."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError as err:
        raise UsageError(f"--expires: {text!r} is not an ISO 8601 time") from err
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


async def cmd_grant(client: Client, args: argparse.Namespace) -> Output:
    expires = parse_time(args.expires) if args.expires else None  # checked before connecting
    done = await client.grant(
        args.grantee,
        None if args.standing else args.records,
        standing=args.standing,
        types=args.types,
        expires=expires,
    )
    return {"grant": done.id, **done.to_json()}, done.id


async def cmd_revoke(client: Client, args: argparse.Namespace) -> Output:
    done = await client.revoke(args.grant_id)
    return {"grant": args.grant_id, **done.to_json()}, _submitted("revoked", done)


async def cmd_erase(client: Client, args: argparse.Namespace) -> Output:
    done = await client.erase(args.record_id)
    text = "\n".join(_submitted("erased", d) for d in done)
    return {"record": args.record_id, "txs": [d.to_json() for d in done]}, text


async def cmd_audit(client: Client, args: argparse.Namespace) -> Output:
    entries = await client.audit()
    lines = [
        f"{datetime.fromtimestamp(e['time'] / 1000, UTC).isoformat(timespec='seconds')}  "
        f"{e['reader']} read {e['record']}"
        for e in entries
    ]
    lines.append(f"{len(entries)} read(s); the log's hash chain and signatures verify")
    doc = {"patient": client.public_id, "verified": True, "entries": entries}
    return doc, "\n".join(lines)


async def cmd_verify(client: Client, args: argparse.Namespace) -> Output:
    height = await client.verify(args.tx_id)
    text = f"{args.tx_id} is in block {height}, final under validators trusted from genesis"
    return {"tx": args.tx_id, "verified": True, "height": height}, text


MAX_BUNDLES_AT_ONCE = 64


def _bundles_at_once(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_BUNDLES_AT_ONCE:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_BUNDLES_AT_ONCE}, not {text!r}"
        )
    return n


def _parallel(args: argparse.Namespace) -> int:
    """``--parallel``, else ``EHR_IMPORT_PARALLEL``, else ``BUNDLES_AT_ONCE``."""
    if args.parallel is not None:
        return int(args.parallel)
    env = os.environ.get("EHR_IMPORT_PARALLEL")
    if not env:
        return BUNDLES_AT_ONCE
    try:
        return _bundles_at_once(env)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"EHR_IMPORT_PARALLEL {err}") from err


async def cmd_import(client: Client, args: argparse.Namespace) -> Output:
    files = bundle_files([Path(p) for p in args.paths])
    parallel = _parallel(args)
    bar = tqdm(
        total=0,
        unit="res",
        file=sys.stderr,
        disable=args.json or not sys.stderr.isatty(),
        desc="import",
    )

    def grow(n: int) -> None:
        bar.total += n
        bar.refresh()

    try:
        importer = Importer(
            client,
            Path(args.keys_dir),
            progress=bar.update,
            grow=grow,
            parallel=parallel,
        )
        result = await importer.run(files)
    finally:
        bar.close()
    doc = result.to_json()
    lines = [
        f"{b['file']}: patient {b['patient']}, {b['written']} written, {b['skipped']} already there"
        for b in doc["bundles"]
    ]
    counts = ", ".join(f"{k} {v}" for k, v in doc["counts"].items()) or "nothing new"
    lines.append(f"{len(files)} bundle(s): {doc['written']} record(s) written ({counts})")
    return doc, "\n".join(lines)


# --- parsing and running --------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    def common(parser: argparse.ArgumentParser, default: Any) -> None:
        # On the main parser and on each command, so they may come before or after it.
        parser.add_argument(
            "--node", default=default, help=f"node RPC URL (EHR_NODE; default {DEFAULT_NODE})"
        )
        parser.add_argument("--key", default=default, help="your key file (EHR_KEY)")
        parser.add_argument(
            "--json",
            action="store_true",
            default=False if default is None else default,
            help="print one JSON document",
        )
        parser.add_argument(
            "--genesis", default=default, help="genesis file the node must match (pins the network)"
        )

    p = _Parser(prog="ehr", description="Write, read and share encrypted FHIR health records.")
    common(p, None)
    shared = _Parser(add_help=False)
    common(shared, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func: Command | None, text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=text, description=text, parents=[shared])
        c.set_defaults(func=func)
        return c

    c = command("keygen", None, "write a new identity to a key file; print its public id")
    c.add_argument("--out", required=True, help="key file to create")
    c = command("register", cmd_register, "register your key in a role")
    c.add_argument("role", choices=tx.ROLES)
    c.add_argument("--name", help="public name (never a patient's: the chain is public)")
    c.add_argument("--endorser", help="key file of the institution (or validator) endorsing you")
    c = command("put", cmd_put, "validate, encrypt and write FHIR resources for a patient")
    c.add_argument("--patient", required=True, help="the patient's public id")
    c.add_argument("--amends", help="record id this is a new version of")
    c.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="the FHIR resource (JSON); several are written in one transaction, all or none",
    )
    c = command("attach", cmd_attach, "encrypt and write a large file as a Binary record")
    c.add_argument("--patient", required=True, help="the patient's public id")
    c.add_argument("--content-type", help="MIME type (default: guessed from the name)")
    c.add_argument("file")
    c = command("read", cmd_read, "fetch and decrypt a record")
    c.add_argument("record_id")
    c.add_argument("--out", help="write the content to this file (needed for attachments)")
    c = command("records", cmd_records, "list a patient's records (default: yours)")
    c.add_argument("patient", nargs="?")
    c.add_argument("--type", help="only this FHIR resource type")
    c = command("versions", cmd_versions, "list the versions of a record")
    c.add_argument("record_id")
    c = command("grants", cmd_grants, "list a patient's grants (default: yours)")
    c.add_argument("patient", nargs="?")
    c = command("grant", cmd_grant, "give someone access to your records")
    c.add_argument("grantee", help="the grantee's public id")
    scope = c.add_mutually_exclusive_group(required=True)
    scope.add_argument("--records", nargs="+", metavar="ID", help="these records only")
    scope.add_argument("--standing", action="store_true", help="all records, now and later")
    c.add_argument("--types", nargs="+", metavar="T", help="standing: only these types")
    c.add_argument("--expires", help="ISO 8601 time the grant ends (UTC unless a zone is given)")
    c = command("revoke", cmd_revoke, "end a grant")
    c.add_argument("grant_id")
    c = command("erase", cmd_erase, "erase a record (every version) from every node")
    c.add_argument("record_id")
    command("audit", cmd_audit, "who read your records: the verified access log")
    c = command("verify", cmd_verify, "check a transaction's or record's proof yourself")
    c.add_argument("tx_id", metavar="ID", help="a transaction id or a record id")
    c = command("import", cmd_import, "import Synthea FHIR bundles (your key: a validator's)")
    c.add_argument("paths", nargs="+", metavar="PATH", help="bundle files or folders")
    c.add_argument("--keys-dir", default="ehr-keys", help="where identities are kept")
    c.add_argument(
        "--parallel",
        type=_bundles_at_once,
        metavar="N",
        help=f"bundles imported at once (default {BUNDLES_AT_ONCE}, or EHR_IMPORT_PARALLEL)",
    )
    return p


_UNSIGNED = {"records", "versions", "grants", "verify"}


def _identity(args: argparse.Namespace) -> Identity:
    key = args.key or os.environ.get("EHR_KEY")
    if key:
        return load_identity(Path(key))
    if args.command in _UNSIGNED:
        return Identity.generate()  # reads that need no signature
    raise UsageError(f"'{args.command}' acts as you: give --key KEYFILE or set EHR_KEY")


async def _run(args: argparse.Namespace) -> Output:
    if args.command == "keygen":
        identity = Identity.generate()
        save_identity(identity, Path(args.out))
        return {"public_id": identity.public_id, "key_file": args.out}, identity.public_id
    if args.command == "grant":
        if args.types and not args.standing:
            raise UsageError("--types applies only with --standing")
        if args.expires:
            parse_time(args.expires)
    identity = _identity(args)
    genesis = Genesis.from_json(Path(args.genesis).read_text()) if args.genesis else None
    node = args.node or os.environ.get("EHR_NODE") or DEFAULT_NODE
    async with Client(node, identity, genesis=genesis) as client:
        func: Command = args.func
        return await func(client, args)


def _fail(json_mode: bool, code: str, message: str) -> None:
    line = " ".join(message.split())
    if json_mode:
        try:
            write_out(json.dumps({"error": {"code": code, "message": line}}) + "\n")
        except BrokenPipeError:
            _reader_gone()
    print(f"ehr: {line}", file=sys.stderr)


def _reader_gone() -> int:
    """Whoever read stdout went away (``ehr records | head -1``): end quietly, as Unix tools
    do, with the status of a SIGPIPE, rather than a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit's flush
    return 128 + signal.SIGPIPE


def write_out(text: str) -> None:
    """All of ``text`` on stdout. A large write to a pipe that is stopped and continued
    meanwhile (Ctrl-Z and ``fg``, a debugger or profiler attaching, a paused container)
    returns part-way, and Python's buffered stdout then drops the rest without an error
    (3.11 and 3.12 here: a 3 MB ``import --json`` report came out as its first 64 KiB).
    So the bytes go out by ``os.write`` until all are written."""
    stream = sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        stream.write(text)
        stream.flush()
        return
    stream.flush()
    data = memoryview(text.encode(stream.encoding or "utf-8", stream.errors or "strict"))
    while data:
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:  # stdout left non-blocking by whoever shares it
            select.select([], [fd], [])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in argv
    tune_malloc()  # attachments and imports stream large buffers (ehrnode.process)
    tune_gc()  # an import parses and holds tens of megabytes of bundles
    try:
        args = parser().parse_args(argv)
        doc, text = asyncio.run(_run(args))
    except UsageError as err:
        _fail(json_mode, "usage", str(err))
        return 2
    except EhrError as err:
        _fail(json_mode, err.code, str(err))
        return 1
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        _fail(json_mode, "os_error", f"{err.strerror or err}{where}")
        return 1
    except KeyboardInterrupt:
        _fail(json_mode, "interrupted", "interrupted")
        return 130
    try:
        write_out((json.dumps(doc) if json_mode else text) + "\n")
    except BrokenPipeError:
        return _reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
