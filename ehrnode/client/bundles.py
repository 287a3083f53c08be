"""Finding Synthea bundle files (no FHIR models needed: the testnet command uses this
without loading them)."""

from __future__ import annotations

from pathlib import Path

from ehrnode.core.errors import ConfigError


def bundle_files(paths: list[Path]) -> list[Path]:
    """Bundle files named or inside the named folders (``*.json``, sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path} is neither a bundle file nor a folder")
    return files
