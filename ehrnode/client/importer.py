"""Import Synthea patient Bundles (FHIR R4 transaction Bundles) into the network.

Per bundle:

1. Organizations become institutions, endorsed by the importing key (a validator's).
2. Practitioners become providers, endorsed by their organization's institution (the
   ``serviceProvider`` of an Encounter they took part in) or else by the importing key.
3. The Patient becomes a patient identity that registers itself, without a name: names on
   the chain are public, and a patient's name is health data.
4. Every other resource, the Patient resource included, is written for that patient by
   a provider: the first practitioner the resource references, else the practitioner of
   its Encounter, else a provider of the bundle's first organization (else any provider
   of the bundle, else the patient). Records go up in batches: blobs in one request,
   each writer's records of the batch as one ``records`` transaction (all or none), the
   transactions in one ``/v1/txs/batch``; the bundle's manifest is written once all of
   them are committed.

References may be ``urn:uuid:…`` fullUrls, ``Type/id`` or ``Type?identifier=system|value``.

Identities are key files in ``keys_dir`` (``org-<id>.json``, ``practitioner-<id>.json``,
``patient-<Patient id>.json``) and a manifest per patient (``import-<Patient id>.json``:
bundle entry fullUrl -> record id). A second run reuses the keys, registers nothing twice
and skips the entries its manifest already holds, so it is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ehrnode.client import fhir
from ehrnode.client.bundles import BundleIndex, bundle_files as bundle_files, entry_url, load_bundle
from ehrnode.client.errors import InvalidResource
from ehrnode.client.sdk import Client
from ehrnode.client.sealing import SealedRecord, seal_record, standing_readers
from ehrnode.core import tx
from ehrnode.core.crypto import Identity, KeyWrapper
from ehrnode.core.errors import ConfigError, EhrError, NotAuthorised
from ehrnode.keys import load_identity, save_identity

BATCH = 500
# Bundles in flight: more make larger blocks (4 -> 8 took an import 17% faster).
BUNDLES_AT_ONCE = 8
IDENTITY_TYPES = ("Organization", "Practitioner")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Progress = Callable[[int], None]


# --- results ---------------------------------------------------------------------------------


@dataclass
class BundleResult:
    file: str
    patient: str
    patient_resource: str
    records: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "patient": self.patient,
            "patient_resource": self.patient_resource,
            "written": sum(self.counts.values()),
            "skipped": self.skipped,
            "counts": dict(sorted(self.counts.items())),
            "records": self.records,
        }


@dataclass
class ImportResult:
    bundles: list[BundleResult] = field(default_factory=list)
    registered: Counter[str] = field(default_factory=Counter)

    @property
    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for bundle in self.bundles:
            total.update(bundle.counts)
        return total

    def to_json(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "bundles": [b.to_json() for b in self.bundles],
            "patients": [b.patient for b in self.bundles],
            "counts": dict(sorted(counts.items())),
            "written": sum(counts.values()),
            "skipped": sum(b.skipped for b in self.bundles),
            "registered": dict(sorted(self.registered.items())),
        }


def _seal_all(
    jobs: list[tuple[bytes, str, bytes, set[bytes]]],
) -> list[SealedRecord] | tuple[int, str]:
    """In a worker process: validate and seal each resource, given as its type and canonical
    JSON bytes (cheaper to send than the objects, and what is validated); (position,
    reason) for the first one that is not valid FHIR."""
    out = []
    wrapper = KeyWrapper()  # one ephemeral key for this batch, gone with it
    for position, (patient, kind, plaintext, readers) in enumerate(jobs):
        try:
            resource = fhir.validated(kind, plaintext)
        except InvalidResource as err:
            return position, str(err)
        out.append(seal_record(patient, resource, readers, wrapper=wrapper))
    return out


# --- the import --------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)[:100] or "unnamed"


def _practitioner_name(resource: dict[str, Any]) -> str | None:
    for name in resource.get("name") or []:
        if not isinstance(name, dict):
            continue
        words = [*(name.get("prefix") or []), *(name.get("given") or [])]
        if name.get("family"):
            words.append(name["family"])
        text = " ".join(str(w) for w in words).strip() or str(name.get("text", "")).strip()
        if text:
            return text[: tx.MAX_NAME_CHARS]
    return None


def _org_name(resource: dict[str, Any]) -> str | None:
    name = resource.get("name")
    return str(name)[: tx.MAX_NAME_CHARS] if isinstance(name, str) and name else None


class Importer:
    """Imports bundles through ``client``, whose identity endorses the institutions."""

    def __init__(
        self,
        client: Client,
        keys_dir: Path,
        *,
        batch: int = BATCH,
        progress: Progress | None = None,
        grow: Progress | None = None,
        parallel: int = BUNDLES_AT_ONCE,
    ) -> None:
        self.client = client
        self.keys_dir = keys_dir
        self.batch = batch
        self.progress = progress or (lambda n: None)
        self.grow = grow or (lambda n: None)
        self.result = ImportResult()
        self.parallel = parallel
        self._pool: ProcessPoolExecutor | None = None
        self._registering: dict[bytes, asyncio.Future[None]] = {}
        self._register_names: dict[str, str] = {}  # register tx id -> role and key
        self._identities: dict[str, asyncio.Future[Identity]] = {}  # key files being written

    async def identity(self, name: str) -> Identity:
        """The key file ``name`` in keys_dir, created on first use. A new key file is
        written and synced on a thread (the event loop goes on with other bundles); the
        bundles that share it wait for that one write."""
        known = self._identities.get(name)
        if known is None:
            known = self._identities[name] = asyncio.ensure_future(self._key_file(name))
            # Once written the file is there to load: only writes in flight are shared.
            known.add_done_callback(lambda _: self._identities.pop(name, None))
        # Shielded: a bundle cancelled while waiting leaves the write to the others.
        return await asyncio.shield(known)

    async def _key_file(self, name: str) -> Identity:
        path = self.keys_dir / name
        if path.exists():
            return load_identity(path)
        identity = Identity.generate()
        await asyncio.to_thread(save_identity, identity, path)
        return identity

    async def check_endorser(self) -> None:
        status = await self.client.transport.get_json("/v1/status")
        validators = {v["key"] for v in status.get("validators", [])}
        if self.client.public_id not in validators:
            raise NotAuthorised(
                "the import key must be a current validator's (e.g. a node's node_key.json): "
                "it endorses each Organization as an institution",
                code="not_endorsed",
            )

    async def run(self, files: list[Path]) -> ImportResult:
        """Import ``files``, a few bundles at a time; results in the order given."""
        await self.check_endorser()
        gate = asyncio.Semaphore(self.parallel)

        async def one(path: Path) -> BundleResult:
            async with gate:
                return await self.import_bundle(path)

        workers = min(os.cpu_count() or 1, 4)
        with ProcessPoolExecutor(workers) as pool:
            self._pool = pool
            try:
                self.result.bundles.extend(await asyncio.gather(*(one(p) for p in files)))
            finally:
                self._pool = None
        return self.result

    async def _register(self, batch: list[tuple[Identity, str, dict[str, Any]]]) -> list[str]:
        """Register those not yet registered, in one batch; return the ids of the
        transactions sent (the caller waits for their commit with its records').

        The batch is waited for until the node has admitted it, not until it is committed:
        the node checks each later transaction against its pending ones too, so a
        provider's records (or an institution's endorsement of a provider) can follow its
        register at once, as long as they go to the same node, as everything here does.
        Not waiting for two commits per bundle takes two blocks' time off each bundle.
        Bundles imported at the same time share organizations and practitioners: a key
        another bundle is registering is waited for (until admitted), not registered
        twice."""
        todo = []
        others: list[asyncio.Future[None]] = []
        mine: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        sent: list[str] = []
        try:
            for identity, kind, body in batch:
                key = identity.public_key
                if key in self._registering:
                    others.append(self._registering[key])
                    continue
                future: asyncio.Future[None] = loop.create_future()
                self._registering[key] = future
                mine.append(future)
                account = await self.client.account(key)
                if not account["registered"]:
                    todo.append((identity, kind, body))
                elif account["role"] != body["role"]:
                    raise EhrError(
                        f"key {identity.public_id[:16]}… is registered as {account['role']}, "
                        f"not {body['role']}",
                        code="already_registered",
                    )
            if todo:
                submitted = await self.client.submit_many(todo, wait=False)
                sent = [done.id for done in submitted]
                for (identity, _, body), done in zip(todo, submitted, strict=True):
                    self._register_names[done.id] = f"{body['role']} {identity.public_id[:16]}…"
                self.result.registered.update(body["role"] for _, _, body in todo)
        except BaseException as err:
            # Bundles waiting for these keys learn why (each reads the error once).
            for f in mine:
                if not f.done():
                    f.set_exception(err)
                    f.exception()
            raise
        for f in mine:
            f.set_result(None)
        for other in others:
            await other
        return sent

    async def _registers_committed(self, path: Path, ids: list[str]) -> None:
        """Wait for a bundle's registers; if one was not committed, say whose it was."""
        try:
            await self.client.wait_committed(ids)
        except EhrError as err:
            names = ", ".join(self._register_names.get(i, i[:16]) for i in ids)
            raise type(err)(
                f"{path}: the registers of this bundle's identities ({names}) did not all "
                f"commit: {err.message}",
                code=err.code,
            ) from err

    async def import_bundle(self, path: Path) -> BundleResult:
        entries = load_bundle(path)
        self.grow(len(entries))
        index = BundleIndex(entries)
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_kind.setdefault(str(entry["resource"].get("resourceType")), []).append(entry)
        patients = by_kind.get("Patient", [])
        if len(patients) != 1:
            raise InvalidResource(
                f"{path}: a Synthea bundle holds one Patient, not {len(patients)}"
            )
        patient_resource = patients[0]["resource"]
        patient_rid = str(patient_resource.get("id") or path.stem)

        # 1. institutions
        orgs: dict[int, Identity] = {}
        batch: list[tuple[Identity, str, dict[str, Any]]] = []
        for entry in by_kind.get("Organization", []):
            org = entry["resource"]
            identity = await self.identity(
                f"org-{_safe(str(org.get('id') or entry_url(entry)))}.json"
            )
            orgs[id(org)] = identity
            body: dict[str, Any] = {
                "role": "institution",
                "endorsement": self.client.endorse(identity.public_key, "institution"),
            }
            if _org_name(org):
                body["name"] = _org_name(org)
            batch.append((identity, "register", body))
        registers = await self._register(batch)

        # 2. providers, each with the organization it works for
        works_for: dict[int, dict[str, Any]] = {}
        for entry in by_kind.get("Encounter", []):
            encounter = entry["resource"]
            org = self._first(index, encounter.get("serviceProvider"), "Organization")
            if org is None:
                continue
            for participant in encounter.get("participant") or []:
                prac = self._first(index, participant, "Practitioner")
                if prac is not None:
                    works_for.setdefault(id(prac), org)
        providers: dict[int, Identity] = {}
        batch = []
        for entry in by_kind.get("Practitioner", []):
            prac = entry["resource"]
            identity = await self.identity(
                f"practitioner-{_safe(str(prac.get('id') or entry_url(entry)))}.json"
            )
            providers[id(prac)] = identity
            org = works_for.get(id(prac))
            endorser = orgs[id(org)] if org is not None else self.client.identity
            body = {
                "role": "provider",
                "endorsement": tx.endorse(
                    endorser, self.client.chain_id, "provider", identity.public_key
                ),
            }
            if _practitioner_name(prac):
                body["name"] = _practitioner_name(prac)
            batch.append((identity, "register", body))
        # 3. the patient, self-registered and nameless
        patient = await self.identity(f"patient-{_safe(patient_rid)}.json")
        batch.append((patient, "register", {"role": "patient"}))
        registers += await self._register(batch)
        self.progress(sum(len(by_kind.get(k, [])) for k in IDENTITY_TYPES))

        # 4. records
        first_org = by_kind.get("Organization", [{}])[0].get("resource")
        default = self._default_writer(providers, works_for, first_org, patient)
        manifest_path = self.keys_dir / f"import-{_safe(patient_rid)}.json"
        result = BundleResult(str(path), patient.public_id, patient_rid)
        result.records = self._load_manifest(manifest_path, patient.public_id)
        todo = []
        for entry in entries:
            if entry["resource"].get("resourceType") in IDENTITY_TYPES:
                continue
            if entry_url(entry) in result.records:
                result.skipped += 1
                self.progress(1)
                continue
            todo.append(entry)
        grants = await self.client.grants(patient.public_key)
        pending: dict[str, str] = {}
        sent: list[str] = []
        for start in range(0, len(todo), self.batch):
            chunk = todo[start : start + self.batch]
            writers = [self._writer(index, e["resource"], providers, default) for e in chunk]
            await self._write(patient.public_key, chunk, writers, grants, result, pending, sent)
            self.progress(len(chunk))
        # Registers and batches went in without waiting for their commit; the manifest
        # names only what is committed.
        await self._registers_committed(path, registers)
        await self.client.wait_committed(sent)
        result.records.update(pending)
        self._save_manifest(manifest_path, patient.public_id, result.records)
        return result

    @staticmethod
    def _first(index: BundleIndex, value: Any, kind: str) -> dict[str, Any] | None:
        for target in index.references(value):
            if target.get("resourceType") == kind:
                return target
        return None

    @staticmethod
    def _default_writer(
        providers: dict[int, Identity],
        works_for: dict[int, dict[str, Any]],
        first_org: dict[str, Any] | None,
        patient: Identity,
    ) -> Identity:
        if first_org is not None:
            for prac_key, org in works_for.items():
                if org is first_org and prac_key in providers:
                    return providers[prac_key]
        return next(iter(providers.values()), patient)

    def _writer(
        self,
        index: BundleIndex,
        resource: dict[str, Any],
        providers: dict[int, Identity],
        default: Identity,
    ) -> Identity:
        for target in index.references(resource):
            if id(target) in providers:
                return providers[id(target)]
        encounter = self._first(index, resource.get("encounter"), "Encounter")
        if encounter is not None:
            for target in index.references(encounter.get("participant")):
                if id(target) in providers:
                    return providers[id(target)]
        return default

    async def _write(
        self,
        patient: bytes,
        entries: list[dict[str, Any]],
        writers: list[Identity],
        grants: list[dict[str, Any]],
        result: BundleResult,
        pending: dict[str, str],
        sent: list[str],
    ) -> None:
        jobs = []
        for entry, writer in zip(entries, writers, strict=True):
            try:
                kind = fhir.resource_type(entry["resource"])
                plaintext = fhir.encode_parsed(entry["resource"])
            except InvalidResource as err:
                raise InvalidResource(f"{result.file}: entry {entry_url(entry)}: {err}") from err
            readers = {patient, writer.public_key} | standing_readers(grants, kind)
            jobs.append((patient, kind, plaintext, readers))
        # Validation and encryption are CPU work: done in worker processes, in parallel
        # with the uploads and submissions of other bundles.
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self._pool, _seal_all, jobs)
        if isinstance(outcome, tuple):
            position, message = outcome
            raise InvalidResource(f"{result.file}: entry {entry_url(entries[position])}: {message}")
        sealed = outcome
        await self.client.upload_many([s.blob for s in sealed])
        # Each writer's records go up as one ``records`` transaction (or a few, within the
        # size limit): one signature, nonce and mempool entry for many records.
        ids, submitted = await self.client.submit_records(
            [(w, s.body) for w, s in zip(writers, sealed, strict=True)], wait=False
        )
        for entry, rid in zip(entries, ids, strict=True):
            pending[entry_url(entry)] = rid
            result.counts[str(entry["resource"]["resourceType"])] += 1
        sent.extend(done.id for done in submitted)

    @staticmethod
    def _load_manifest(path: Path, patient: str) -> dict[str, str]:
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text())
            records = manifest["records"]
            if manifest["patient"] != patient or not isinstance(records, dict):
                raise ValueError("it belongs to another patient key")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"import manifest {path} cannot be used: {err}") from err
        return {str(k): str(v) for k, v in records.items()}

    @staticmethod
    def _save_manifest(path: Path, patient: str, records: dict[str, str]) -> None:
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps({"patient": patient, "records": records}, indent=1) + "\n")
        os.replace(part, path)
