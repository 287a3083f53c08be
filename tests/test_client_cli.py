"""The ``ehr`` command: bad usage and failures give one line on stderr and a non-zero
status; ``--json`` prints exactly one JSON document; the commands work against a node."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ehrnode.client.cli import main
from ehrnode.config import KEY_FILE
from ehrnode.keys import load_identity
from ehrnode.node import Node

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "Blood pressure"},
    "valueQuantity": {"value": 120, "unit": "mm[Hg]"},
}
CONDITION = {"resourceType": "Condition", "code": {"text": "Asthma"}, "subject": {"reference": "x"}}


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EHR_NODE", raising=False)
    monkeypatch.delenv("EHR_KEY", raising=False)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["grant", "ab"], "one of the arguments --records --standing is required"),
        (["grant", "ab", "--records", "cd", "--standing"], "not allowed with argument"),
        (["--key", "k.json", "grant", "ab", "--records", "cd", "--types", "X"], "--standing"),
        (["register", "emperor"], "invalid choice: 'emperor'"),
        (["put", "file.json"], "--patient"),
        (["put", "--patient", "ab", "file.json"], "give --key KEYFILE or set EHR_KEY"),
        (["audit"], "give --key KEYFILE or set EHR_KEY"),
        (["keygen"], "--out"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = one_line(err)
    assert line.startswith("ehr: ") and expected in line


def test_json_usage_error_is_one_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "grant", "ab"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "usage"
    one_line(err)


def test_bad_expiry_time_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.json"
    assert main(["keygen", "--out", str(key)]) == 0
    capsys.readouterr()
    argv = ["--key", str(key), "grant", "ab", "--standing", "--expires", "next tuesday"]
    assert main(argv) == 2
    assert "ISO 8601" in one_line(capsys.readouterr().err)


def test_keygen_writes_a_key_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "me.json"
    assert main(["--json", "keygen", "--out", str(key)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"public_id": load_identity(key).public_id, "key_file": str(key)}
    assert err == ""
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert main(["keygen", "--out", str(key)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "refusing to overwrite" in one_line(err)
    # Global options may also follow the command.
    other = tmp_path / "other.json"
    assert main(["keygen", "--out", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["public_id"] == load_identity(other).public_id


def test_failures_exit_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--key", str(tmp_path / "missing.json"), "audit"]) == 1
    assert "does not exist" in one_line(capsys.readouterr().err)

    key = tmp_path / "k.json"
    main(["keygen", "--out", str(key)])
    capsys.readouterr()
    # Nothing listens on port 9 of loopback (discard): the connection is refused at once.
    assert main(["--node", "http://127.0.0.1:9", "--key", str(key), "--json", "audit"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "node_unreachable"
    assert "no answer from the node at http://127.0.0.1:9" in one_line(err)


async def ehr(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run the CLI with --json in a worker thread while the node serves in this loop."""
    code = await asyncio.to_thread(main, ["--json", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


async def test_the_commands_against_a_node(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    validator = str(node.config.home / KEY_FILE)
    keys = {name: str(tmp_path / f"{name}.json") for name in ("patient", "doctor", "friend")}
    ids = {}
    for name, path in keys.items():
        code, doc, _ = await ehr(capsys, "keygen", "--out", path)
        ids[name] = doc["public_id"]

    def as_(name: str) -> list[str]:
        return ["--node", node.rpc_url, "--key", keys[name]]

    code, doc, err = await ehr(capsys, *as_("patient"), "register", "patient")
    assert code == 0 and doc["status"] == "committed", err
    code, doc, err = await ehr(
        capsys, *as_("doctor"), "register", "provider", "--name", "Dr P", "--endorser", validator
    )
    assert code == 0 and doc["role"] == "provider", err
    code, doc, err = await ehr(
        capsys, *as_("friend"), "register", "provider", "--endorser", validator
    )
    assert code == 0, err

    resource_file = tmp_path / "obs.json"
    resource_file.write_text(json.dumps(OBSERVATION))
    code, doc, err = await ehr(
        capsys, *as_("doctor"), "put", "--patient", ids["patient"], str(resource_file)
    )
    assert code == 0, err
    record_id = doc["record"]

    code, doc, err = await ehr(capsys, *as_("patient"), "read", record_id)
    assert code == 0 and doc["resource"] == OBSERVATION, err
    code, doc, err = await ehr(capsys, *as_("patient"), "records")
    assert [r["id"] for r in doc["records"]] == [record_id]
    code, doc, err = await ehr(capsys, "--node", node.rpc_url, "records", ids["patient"])
    assert code == 0 and doc["records"][0]["type"] == "Observation", err  # no key needed

    code, doc, err = await ehr(capsys, *as_("friend"), "read", record_id)
    assert code == 1 and doc["error"]["code"] == "not_granted"
    code, doc, err = await ehr(
        capsys,
        *as_("patient"),
        "grant",
        ids["friend"],
        "--standing",
        "--types",
        "Observation",
        "--expires",
        "2999-01-01T00:00:00Z",
    )
    assert code == 0, err
    grant_id = doc["grant"]
    code, doc, err = await ehr(capsys, *as_("friend"), "read", record_id)
    assert code == 0 and doc["resource"] == OBSERVATION, err
    code, doc, err = await ehr(capsys, *as_("patient"), "grants")
    [grant] = doc["grants"]
    assert grant["id"] == grant_id and grant["types"] == ["Observation"]
    assert grant["expires"] == 32472144000000  # 2999-01-01T00:00:00Z in ms
    code, doc, err = await ehr(capsys, *as_("patient"), "revoke", grant_id)
    assert code == 0, err
    code, doc, err = await ehr(capsys, *as_("friend"), "read", record_id)
    assert code == 1 and doc["error"]["code"] == "not_granted"

    code, doc, err = await ehr(capsys, *as_("patient"), "audit")
    assert code == 0 and doc["verified"] is True, err
    # The patient's own read, then the friend's (re-wrapping for the standing grant
    # fetched the key alone, which reads no ciphertext).
    readers = [e["reader"] for e in doc["entries"]]
    assert readers == [ids["patient"], ids["friend"]]
    code, doc, err = await ehr(capsys, "--node", node.rpc_url, "verify", record_id)
    assert code == 0 and doc["verified"] is True and doc["height"] >= 1, err

    out_file = tmp_path / "copy.json"
    code, doc, err = await ehr(capsys, *as_("patient"), "read", record_id, "--out", str(out_file))
    assert code == 0 and json.loads(out_file.read_text()) == OBSERVATION, err
    code, doc, err = await ehr(capsys, *as_("patient"), "erase", record_id)
    assert code == 0 and doc["txs"][0]["status"] == "committed", err
    code, doc, err = await ehr(capsys, *as_("patient"), "read", record_id)
    assert code == 1 and doc["error"]["code"] == "record_erased"
    assert "erased" in one_line(err)

    # Several files: one transaction, all or none, a record id each.
    second = tmp_path / "cond.json"
    second.write_text(json.dumps(CONDITION))
    files = [str(resource_file), str(second)]
    code, doc, err = await ehr(capsys, *as_("doctor"), "put", "--patient", ids["patient"], *files)
    assert code == 0 and doc["status"] == "committed", err
    assert [r["type"] for r in doc["records"]] == ["Observation", "Condition"]
    for written, expected in zip(doc["records"], (OBSERVATION, CONDITION), strict=True):
        code, back, err = await ehr(capsys, *as_("patient"), "read", written["record"])
        assert code == 0 and back["resource"] == expected, err
    code, doc, err = await ehr(
        capsys, *as_("doctor"), "put", "--patient", ids["patient"], "--amends", "ab" * 32, *files
    )
    assert code == 2 and doc["error"]["code"] == "usage" and "--amends" in err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"resourceType": "Observation", "status": "final"}))
    _, before, _ = await ehr(capsys, *as_("patient"), "records")
    code, doc, err = await ehr(
        capsys, *as_("doctor"), "put", "--patient", ids["patient"], str(second), str(bad)
    )
    assert code == 1 and doc["error"]["code"] == "invalid_resource"
    _, after, _ = await ehr(capsys, *as_("patient"), "records")
    assert after["records"] == before["records"]  # the valid one was not written either
    code, doc, err = await ehr(capsys, *as_("doctor"), "put", "--patient", ids["patient"], str(bad))
    assert code == 1 and doc["error"]["code"] == "invalid_resource"
    assert "Observation.code: required element missing" in one_line(err)


async def test_human_output(node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = str(tmp_path / "p.json")
    assert await asyncio.to_thread(main, ["keygen", "--out", key]) == 0
    public_id = capsys.readouterr().out.strip()
    argv = ["--node", node.rpc_url, "--key", key]
    assert await asyncio.to_thread(main, [*argv, "register", "patient"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"registered {public_id} as patient: tx ") and err == ""
    assert await asyncio.to_thread(main, [*argv, "records"]) == 0
    assert capsys.readouterr().out == "(no records)\n"
    assert await asyncio.to_thread(main, [*argv, "audit"]) == 0
    assert "0 read(s)" in capsys.readouterr().out
