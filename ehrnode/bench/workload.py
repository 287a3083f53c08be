"""The benchmark's workload: real FHIR resources from the Synthea samples (or generated
ones when the samples are absent), encrypted, uploaded and signed as ``record``
transactions before any clock starts.

Writers are many providers (so nonces never serialise the load on one signer), each
endorsed by the first validator's institution; patients are registered up front.
Encryption and signing run in a process pool, one worker per core.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from ehrnode.blobs.store import INLINE_MAX
from ehrnode.client import fhir
from ehrnode.client.sealing import seal_record
from ehrnode.core import crypto, request, tx
from ehrnode.core.crypto import Identity

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthea"
MSGPACK = {"Content-Type": "application/msgpack"}
SKIP = {"Organization", "Practitioner", "Patient"}


def sample_resources(limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Resources to write, and where they came from (said in the bench output)."""
    if SAMPLES.is_dir():
        out: list[dict[str, Any]] = []
        for path in sorted(SAMPLES.glob("*.json")):
            bundle = json.loads(path.read_text())
            out.extend(
                e["resource"]
                for e in bundle.get("entry", [])
                if e["resource"]["resourceType"] not in SKIP
            )
            if limit is not None and len(out) >= limit:
                break
        return out[:limit] if limit else out, f"Synthea samples ({SAMPLES})"
    return generated_resources(
        limit or 20_000
    ), "generated Observations (no ../shared samples here)"


def generated_resources(count: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    return [
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "8867-4"}],
                "text": "Heart rate",
            },
            "valueQuantity": {"value": rng.randint(50, 120), "unit": "/min"},
        }
        for _ in range(count)
    ]


def cycle(resources: list[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield resources[i % len(resources)]


@dataclass
class People:
    institution: Identity
    providers: list[Identity]
    patients: list[Identity]


def _now_ms() -> int:
    return int(time.time() * 1000)


async def post_batch(
    http: aiohttp.ClientSession, url: str, raws: list[bytes], mode: str
) -> list[Any]:
    async with http.post(
        f"{url}/v1/txs/batch?mode={mode}", data=msgpack.packb(raws), headers=MSGPACK
    ) as r:
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"batch refused: {body}")
        results: list[Any] = body["results"]
        return results


async def register_people(
    url: str, chain: str, institution: Identity, providers: int, patients: int
) -> People:
    people = People(
        institution,
        [Identity.generate() for _ in range(providers)],
        [Identity.generate() for _ in range(patients)],
    )
    raws = [
        tx.make(
            p,
            chain,
            "register",
            1,
            {
                "role": "provider",
                "endorsement": tx.endorse(institution, chain, "provider", p.public_key),
            },
        ).raw
        for p in people.providers
    ] + [tx.make(p, chain, "register", 1, {"role": "patient"}).raw for p in people.patients]
    async with aiohttp.ClientSession() as http:
        for start in range(0, len(raws), 2000):
            results = await post_batch(http, url, raws[start : start + 2000], "commit")
            bad = [r for r in results if r["status"] != "committed"]
            if bad:
                raise RuntimeError(f"registration failed: {bad[:2]}")
    return people


def _seal_chunk(
    args: tuple[str, list[tuple[bytes, bytes, int, dict[str, Any]]]],
) -> list[tuple[bytes, bytes]]:
    """In a worker: seal and sign records; returns (blob, tx bytes) pairs."""
    chain, jobs = args
    out = []
    for seed, patient, nonce, resource in jobs:
        provider = Identity(seed)
        # Not validated: the client's validation is measured by the import, not here.
        prepared = fhir.Prepared(resource["resourceType"], fhir.encode(resource))
        sealed = seal_record(patient, prepared, {patient, provider.public_key})
        out.append((sealed.blob, tx.sign(provider, chain, "record", nonce, sealed.body)[0]))
    return out


def seal_and_sign(
    chain: str, people: People, resources: Iterator[dict[str, Any]], first_nonce: dict[bytes, int]
) -> list[tuple[bytes, bytes]]:
    """(blob, record tx) for each resource, round-robin over providers and patients."""
    jobs = []
    nonces = dict(first_nonce)
    for i, resource in enumerate(resources):
        provider = people.providers[i % len(people.providers)]
        patient = people.patients[i % len(people.patients)]
        nonce = nonces.get(provider.public_key, 2)
        nonces[provider.public_key] = nonce + 1
        jobs.append((provider.seed, patient.public_key, nonce, resource))
    workers = os.cpu_count() or 1
    chunk = max(1, len(jobs) // (workers * 8))
    pieces = [(chain, jobs[i : i + chunk]) for i in range(0, len(jobs), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return [pair for part in pool.map(_seal_chunk, pieces) for pair in part]


async def upload_blobs(url: str, chain: str, uploader: Identity, blobs: list[bytes]) -> None:
    """Batch uploads (each waits for the write quorum), four at a time."""
    gate = asyncio.Semaphore(4)
    async with aiohttp.ClientSession() as http:

        async def one(batch: list[bytes]) -> None:
            body = msgpack.packb(batch)
            async with gate:
                auth = request.authorization(uploader, chain, "POST", "/v1/blobs", _now_ms(), body)
                async with http.post(
                    f"{url}/v1/blobs", data=body, headers={**MSGPACK, "Authorization": auth}
                ) as r:
                    if r.status != 201:
                        raise RuntimeError(f"blob upload refused: {await r.text()}")

        async def alone(blob: bytes) -> None:
            path = f"/v1/blobs/{crypto.sha256(blob).hex()}"
            async with gate:
                auth = request.authorization(uploader, chain, "PUT", path, _now_ms())
                async with http.put(
                    f"{url}{path}", data=blob, headers={"Authorization": auth}
                ) as r:
                    if r.status != 201:
                        raise RuntimeError(f"blob upload refused: {await r.text()}")

        small = [b for b in blobs if len(b) <= INLINE_MAX]
        large = [b for b in blobs if len(b) > INLINE_MAX]
        await asyncio.gather(
            *(one(small[i : i + 1000]) for i in range(0, len(small), 1000)),
            *(alone(b) for b in large),
        )
