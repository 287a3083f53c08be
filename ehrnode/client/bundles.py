"""Synthea bundle files: finding them, reading their entries and resolving the references
between entries (plain JSON: nothing here validates FHIR)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ehrnode.client.errors import InvalidResource
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


def load_bundle(path: Path) -> list[dict[str, Any]]:
    """The entries of a FHIR Bundle file, each with a ``resource``."""
    try:
        bundle = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise InvalidResource(f"{path}: not a readable JSON file: {err}") from err
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidResource(f"{path}: not a FHIR Bundle")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("resource"), dict) for e in entries
    ):
        raise InvalidResource(f"{path}: every Bundle entry must hold a resource")
    return entries


def entry_url(entry: dict[str, Any]) -> str:
    resource = entry["resource"]
    return str(entry.get("fullUrl") or f"{resource.get('resourceType')}/{resource.get('id')}")


class BundleIndex:
    """Resolves the references inside one bundle to its entries' resources."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.by_url: dict[str, dict[str, Any]] = {}
        self.by_identifier: dict[tuple[str, str], dict[str, Any]] = {}
        for entry in entries:
            resource = entry["resource"]
            kind = resource.get("resourceType")
            if entry.get("fullUrl"):
                self.by_url[entry["fullUrl"]] = resource
            if resource.get("id"):
                self.by_url[f"{kind}/{resource['id']}"] = resource
            for ident in resource.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("value"):
                    value = str(ident["value"])
                    self.by_identifier[(kind, value)] = resource
                    self.by_identifier[(kind, f"{ident.get('system', '')}|{value}")] = resource

    def resolve(self, reference: str) -> dict[str, Any] | None:
        if reference in self.by_url:
            return self.by_url[reference]
        if "?" in reference:
            kind, _, query = reference.partition("?")
            for part in query.split("&"):
                name, _, value = part.partition("=")
                if name == "identifier":
                    return self.by_identifier.get((kind.rsplit("/", 1)[-1], value))
            return None
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 2:  # Type/id, possibly absolute or with /_history/n
            if len(parts) >= 4 and parts[-2] == "_history":
                parts = parts[:-2]
            return self.by_url.get(f"{parts[-2]}/{parts[-1]}")
        return None

    def references(self, value: Any) -> Iterator[dict[str, Any]]:
        """Every resource of this bundle that ``value`` references, in document order."""
        found: list[str] = []
        _reference_strings(value, found)
        for reference in found:
            target = self.resolve(reference)
            if target is not None:
                yield target


def _reference_strings(value: Any, into: list[str]) -> None:
    """Append every ``reference`` string inside ``value``, in document order. A plain
    recursion that skips scalars: a generator per level took ``ehr import`` twice the CPU
    (every resource of every bundle is walked to find its author)."""
    if type(value) is dict:
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                if key == "reference":
                    into.append(item)
            elif kind is dict or kind is list:
                _reference_strings(item, into)
    elif type(value) is list:
        for item in value:
            kind = type(item)
            if kind is dict or kind is list:
                _reference_strings(item, into)
