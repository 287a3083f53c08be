"""Key files: an identity on disk, readable only by its owner.

    {"kind": "ehrnode-identity", "public_id": "<64 hex>", "seed": "<64 hex>"}

The file is created with mode 0600 and never overwritten by accident.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ehrnode.core.crypto import Identity
from ehrnode.core.errors import ConfigError, InvalidEncoding

KIND = "ehrnode-identity"


def save_identity(identity: Identity, path: Path, *, overwrite: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as err:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from err
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {"kind": KIND, "public_id": identity.public_id, "seed": identity.seed.hex()}, handle
        )
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def load_identity(path: Path) -> Identity:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"key file {path} does not exist") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"key file {path} is not a readable JSON key file: {err}") from err
    if not isinstance(obj, dict) or obj.get("kind") != KIND or not isinstance(obj.get("seed"), str):
        raise ConfigError(f"{path} is not an ehrnode key file (expected kind '{KIND}')")
    try:
        seed = bytes.fromhex(obj["seed"])
        identity = Identity(seed)
    except (ValueError, InvalidEncoding) as err:
        raise ConfigError(f"key file {path} holds a malformed seed") from err
    if obj.get("public_id") not in (None, identity.public_id):
        raise ConfigError(f"key file {path}: public_id does not match the seed")
    return identity
