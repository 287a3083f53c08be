"""The client side of ehrnode: the Python SDK, the ``ehr`` CLI and the Synthea import.

Encryption happens here and only here: a node sees ciphertext, wrapped keys and ids.

    async with Client("http://127.0.0.1:8645", identity) as doctor:
        written = await doctor.put(patient_id, {"resourceType": "Observation", ...})
        resource = await doctor.read(written.id)
"""

from ehrnode.client.errors import (
    AuditLogBroken,
    InvalidResource,
    NodeUnreachable,
    RecordErased,
)
from ehrnode.client.sdk import Client
from ehrnode.client.values import Submitted

__all__ = [
    "AuditLogBroken",
    "Client",
    "InvalidResource",
    "NodeUnreachable",
    "RecordErased",
    "Submitted",
]
