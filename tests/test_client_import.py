"""Importing a Synthea bundle through the ``ehr`` CLI: every resource reads back equal, the
organizations and practitioners become endorsed identities, a second run changes nothing,
and no plaintext reaches the node's disk."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import string
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ehrnode.client import Client
from ehrnode.client.bundles import BundleIndex
from ehrnode.client.cli import BUNDLES_AT_ONCE, _parallel as cli_parallel, main
from ehrnode.client.errors import NodeUnreachable
from ehrnode.client.importer import Importer
from ehrnode.config import KEY_FILE
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import InvalidTransaction
from ehrnode.keys import load_identity
from ehrnode.node import Node
from ehrnode.testing import local_node

BUNDLE = Path(__file__).parent / "data" / "1480536-bundle.json"
IDENTITY_TYPES = {"Organization", "Practitioner"}


async def ehr(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a worker thread (it runs its own event loop) while the node serves."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def import_args(node: Node, keys: Path, *extra: str) -> list[str]:
    home = node.config.home
    return ["--node", node.rpc_url, "--key", str(home / KEY_FILE), *extra, "import"]


def bundle_entries() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(BUNDLE.read_text())["entry"]
    return entries


async def test_a_bundle_imports_and_reads_back_resource_by_resource(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    args = [*import_args(node, keys, "--json"), "--keys-dir", str(keys), str(BUNDLE)]
    code, out, err = await ehr(capsys, *args)
    assert code == 0, err
    assert err == ""  # no progress bar: stderr is not a terminal
    doc = json.loads(out)  # exactly one JSON document
    entries = bundle_entries()
    records = [e for e in entries if e["resource"]["resourceType"] not in IDENTITY_TYPES]
    [bundle] = doc["bundles"]
    assert set(bundle["records"]) == {e["fullUrl"] for e in records}
    assert doc["counts"] == dict(Counter(e["resource"]["resourceType"] for e in records))
    assert doc["registered"] == {"institution": 2, "provider": 2, "patient": 1}

    [patient_entry] = [e for e in entries if e["resource"]["resourceType"] == "Patient"]
    patient = load_identity(keys / f"patient-{patient_entry['resource']['id']}.json")
    assert doc["patients"] == [patient.public_id]
    async with Client(node.rpc_url, patient) as client:
        for entry in records:
            record_id = bundle["records"][entry["fullUrl"]]
            assert await client.read(record_id) == entry["resource"], entry["fullUrl"]
        assert len(await client.records()) == len(records)
        # Each writer's records went up together: far fewer transactions than records.
        views = [await client.record(bundle["records"][e["fullUrl"]]) for e in records]
        by_tx = Counter(view["tx"] for view in views)
        assert len(by_tx) < len(records) / 4
        assert all(len({v["author"] for v in views if v["tx"] == t}) == 1 for t in by_tx)
        patient_account = await client.account()
        assert patient_account["role"] == "patient" and patient_account["name"] is None

        # Each organization is an institution endorsed by the validator; each practitioner
        # a provider endorsed by the organization of the encounters they took part in.
        index = BundleIndex(entries)
        for entry in entries:
            resource = entry["resource"]
            if resource["resourceType"] == "Organization":
                org = load_identity(keys / f"org-{resource['id']}.json")
                account = await client.account(org.public_key)
                assert account["role"] == "institution"
                assert account["endorsed_by"] == node.identity.public_id
            if resource["resourceType"] == "Encounter":
                author = (await client.record(bundle["records"][entry["fullUrl"]]))["author"]
                [practitioner] = [
                    t for t in index.references(resource) if t["resourceType"] == "Practitioner"
                ]
                provider = load_identity(keys / f"practitioner-{practitioner['id']}.json")
                assert author == provider.public_id
                org_ref = resource["serviceProvider"]["reference"]
                org = load_identity(keys / f"org-{index.resolve(org_ref)['id']}.json")  # type: ignore[index]
                account = await client.account(provider.public_key)
                assert account["role"] == "provider"
                assert account["endorsed_by"] == org.public_id

    # A second run reuses every key, registers nothing and writes nothing.
    code, out, err = await ehr(capsys, *args)
    assert code == 0, err
    again = json.loads(out)
    assert again["written"] == 0 and again["registered"] == {}
    assert again["bundles"][0]["skipped"] == len(records)
    assert again["bundles"][0]["records"] == bundle["records"]

    human = [a for a in args if a != "--json"]
    code, out, err = await ehr(capsys, *human)
    assert code == 0 and "0 record(s) written" in out and err == ""


def patient_copy(k: int) -> str:
    """The sample bundle as another patient's: every id but the organizations' and
    practitioners' made new, so that bundles share those identities."""
    text = BUNDLE.read_text()
    for entry in bundle_entries():
        resource = entry["resource"]
        if resource["resourceType"] not in IDENTITY_TYPES:
            text = text.replace(resource["id"], f"{resource['id'][:-4]}{k:04d}")
    return text


async def test_bundles_sharing_providers_import_at_once(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three patients' bundles with the same organizations and practitioners, imported
    together: each identity is registered once, by whichever bundle came first, and the
    others' records by those providers follow its register without waiting for its commit
    (the node checks them against its pending transactions)."""
    folder = tmp_path / "bundles"
    folder.mkdir()
    for k in range(3):
        (folder / f"patient-{k}.json").write_text(patient_copy(k))
    keys = tmp_path / "keys"
    args = [*import_args(node, keys, "--json"), "--keys-dir", str(keys), str(folder)]
    code, out, err = await ehr(capsys, *args)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["registered"] == {"institution": 2, "provider": 2, "patient": 3}
    records = [e for e in bundle_entries() if e["resource"]["resourceType"] not in IDENTITY_TYPES]
    assert doc["written"] == 3 * len(records)
    assert [len(bundle["records"]) for bundle in doc["bundles"]] == [len(records)] * 3
    async with Client(node.rpc_url, node.identity) as validator:
        for public_id in doc["patients"]:
            assert len(await validator.records(public_id)) == len(records)


async def test_import_needs_a_validator_key(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = tmp_path / "stranger.json"
    assert await ehr(capsys, "keygen", "--out", str(stranger)) == (
        0,
        load_identity(stranger).public_id + "\n",
        "",
    )
    code, out, err = await ehr(
        capsys, "--node", node.rpc_url, "--key", str(stranger), "import", str(BUNDLE)
    )
    assert code == 1 and out == ""
    assert "validator" in err and len(err.strip().splitlines()) == 1


def marker() -> str:
    alphabet = string.ascii_letters + string.digits
    return "PLAINTEXT" + "".join(secrets.choice(alphabet) for _ in range(40))


def files_holding(home: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(home)}: {n!r}" for n in needles if n in data]
    return found


async def test_no_plaintext_reaches_the_node_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "node"
    text_marker, file_marker = marker(), marker()
    patient_resource = next(
        e["resource"] for e in bundle_entries() if e["resource"]["resourceType"] == "Patient"
    )
    ssn = next(
        i["value"]
        for i in patient_resource["identifier"]
        if i.get("type", {}).get("text") == "Social Security Number"
    )
    family = patient_resource["name"][0]["family"]
    practitioner_name = next(
        e["resource"]["name"][0]["family"]
        for e in bundle_entries()
        if e["resource"]["resourceType"] == "Practitioner"
    )
    needles = [text_marker.encode(), file_marker.encode(), ssn.encode(), family.encode()]
    async with local_node(home) as node:
        code, _out, err = await ehr(
            capsys,
            *import_args(node, tmp_path / "keys"),
            "--keys-dir",
            str(tmp_path / "keys"),
            str(BUNDLE),
        )
        assert code == 0, err
        async with Client(node.rpc_url, node.identity) as validator:
            doctor = validator.as_identity(Identity.generate())
            patient = validator.as_identity(Identity.generate())
            await patient.register("patient")
            await doctor.register(
                "provider", None, validator.endorse(doctor.public_key, "provider")
            )
            note = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": text_marker},
            }
            written = await doctor.put(patient.public_id, note)
            attachment = tmp_path / "report.txt"
            attachment.write_bytes((file_marker + "\n").encode() * 5000)
            attached = await doctor.put_attachment(patient.public_id, attachment, "text/plain")
            assert await patient.read(written.id) == note
            await patient.read(attached.id, tmp_path / "report-copy.txt")
            assert (tmp_path / "report-copy.txt").read_bytes() == attachment.read_bytes()
        assert files_holding(home, needles) == []
    assert files_holding(home, needles) == []  # and after the node flushed and closed
    # The scan does see what is stored: a practitioner's name is public on the chain.
    assert files_holding(home, [practitioner_name.encode()]) != []


class _FailingClient:
    """A client whose node cannot be reached for account look-ups, and whose transactions
    are all rejected when waited for."""

    async def account(self, key: bytes) -> dict[str, Any]:
        await asyncio.sleep(0)
        raise NodeUnreachable("node 0 is unreachable")

    async def wait_committed(self, ids: list[str], timeout: float = 60.0) -> list[Any]:
        raise InvalidTransaction(f"transaction {ids[0][:16]}… was rejected: stale nonce")


async def test_bundles_waiting_for_a_shared_register_learn_why_it_failed(tmp_path: Path) -> None:
    """A bundle registering an identity another bundle also needs fails (here: its account
    look-up): the other bundle gets the same error instead of waiting for ever."""
    importer = Importer(_FailingClient(), tmp_path)  # type: ignore[arg-type]
    shared = Identity.generate()
    batch = [(shared, "register", {"role": "provider"})]
    first = asyncio.create_task(importer._register(batch))
    second = asyncio.create_task(importer._register(batch))
    for task in (first, second):
        with pytest.raises(NodeUnreachable):
            await asyncio.wait_for(task, 10)


async def test_a_register_that_did_not_commit_is_named(tmp_path: Path) -> None:
    importer = Importer(_FailingClient(), tmp_path)  # type: ignore[arg-type]
    tx_id = "ab" * 32
    importer._register_names[tx_id] = "provider 0123456789abcdef…"
    with pytest.raises(InvalidTransaction) as raised:
        await importer._registers_committed(Path("b.json"), [tx_id])
    message = raised.value.message
    assert "b.json" in message and "provider 0123456789abcdef…" in message
    assert "stale nonce" in message


async def test_bundles_at_once_is_bounded_and_bad_values_are_named(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*import_args(node, tmp_path / "keys"), "--keys-dir", str(tmp_path / "keys")]
    for bad in ("0", "65", "many"):
        code, out, err = await ehr(capsys, *args, "--parallel", bad, str(BUNDLE))
        assert code == 2 and out == ""
        assert "--parallel" in err and "from 1 to 64" in err and "Traceback" not in err
    monkeypatch.setenv("EHR_IMPORT_PARALLEL", "lots")
    code, out, err = await ehr(capsys, *args, str(BUNDLE))
    assert code == 1 and out == ""
    assert "EHR_IMPORT_PARALLEL" in err and "Traceback" not in err
    monkeypatch.setenv("EHR_IMPORT_PARALLEL", "2")
    code, out, err = await ehr(capsys, *args, "--parallel", "3", str(BUNDLE))
    assert code == 0, err
    assert cli_parallel(argparse.Namespace(parallel=None)) == 2
    monkeypatch.delenv("EHR_IMPORT_PARALLEL")
    assert cli_parallel(argparse.Namespace(parallel=None)) == BUNDLES_AT_ONCE
    assert cli_parallel(argparse.Namespace(parallel=3)) == 3


def test_references_resolve_in_document_order_at_any_depth() -> None:
    org = {
        "resourceType": "Organization",
        "id": "o1",
        "identifier": [{"system": "s", "value": "9"}],
    }
    prac = {"resourceType": "Practitioner", "id": "p1"}
    enc = {"resourceType": "Encounter", "id": "e1"}
    entries = [
        {"fullUrl": "urn:uuid:org", "resource": org},
        {"fullUrl": "urn:uuid:prac", "resource": prac},
        {"fullUrl": "urn:uuid:enc", "resource": enc},
    ]
    index = BundleIndex(entries)
    claim = {
        "resourceType": "Claim",
        "provider": {"reference": "Practitioner/p1"},
        "item": [
            {"encounter": [{"reference": "urn:uuid:enc"}], "net": {"value": 3.5}},
            {"note": "reference", "detail": [[{"reference": "Organization?identifier=s|9"}]]},
        ],
        # a "reference" that is not a string is walked into, not resolved
        "reference": {"inner": {"reference": "http://x/fhir/Practitioner/p1/_history/2"}},
        "other": {"reference": "urn:uuid:nowhere"},
    }
    assert [id(t) for t in index.references(claim)] == [id(prac), id(enc), id(org), id(prac)]
    assert list(index.references("Practitioner/p1")) == []
    assert list(index.references(None)) == []


async def test_bundles_sharing_a_new_key_file_get_one_key_even_if_one_is_cancelled(
    tmp_path: Path,
) -> None:
    importer = Importer(None, tmp_path)  # type: ignore[arg-type]  # keys need no node
    first = asyncio.ensure_future(importer.identity("org-x.json"))
    second = asyncio.ensure_future(importer.identity("org-x.json"))
    await asyncio.sleep(0)  # both wait for the one write
    first.cancel()
    key = await asyncio.wait_for(second, 10)
    assert first.cancelled()
    assert load_identity(tmp_path / "org-x.json").public_id == key.public_id
    # Written once it is loaded, not kept: a later bundle reads the same key back.
    assert importer._identities == {}
    assert (await importer.identity("org-x.json")).public_id == key.public_id
