"""FHIR R4 validation on the client: each bad resource gets an error naming the problem,
and the plaintext form of a resource is canonical JSON that reads back equal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from ehrnode.client import fhir
from ehrnode.client.bundles import load_bundle
from ehrnode.client.errors import InvalidResource
from ehrnode.core.errors import EhrError, InvalidEncoding

DATA = Path(__file__).parent / "data"
# Element names of the sample bundle's resources, for generated documents.
_SAMPLE = json.loads((DATA / "1480536-bundle.json").read_text())
_KEYS = {key for entry in _SAMPLE["entry"] for key in entry["resource"]}
_ELEMENTS = sorted(_KEYS | {"_birthDate", "value"})

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
    "valueQuantity": {"value": 72.5, "unit": "/min"},
}


def test_a_valid_resource_passes_and_names_its_type() -> None:
    assert fhir.validate(OBSERVATION) == "Observation"


def test_every_resource_of_the_sample_bundle_validates() -> None:
    kinds = {fhir.validate(entry["resource"]) for entry in _SAMPLE["entry"]}
    assert {"Patient", "Observation", "Encounter", "Claim"} <= kinds


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"status": "final"}, "no resourceType"),
        ([1, 2], "JSON object"),
        ("Patient", "JSON object"),
        ({"resourceType": 5}, "not a FHIR resource type name"),
        ({"resourceType": "observation"}, "not a FHIR resource type name"),
        ({"resourceType": "Nonsense"}, "'Nonsense' is not a FHIR R4 resource type"),
        ({"resourceType": "HumanName"}, "'HumanName' is not a FHIR R4 resource type"),
        ({"resourceType": "Observation", "status": "final"}, "Observation.code: required element"),
        ({**OBSERVATION, "valueQuantity": {"value": "lots"}}, "valueQuantity.value"),
        ({"resourceType": "Patient", "favouriteColour": "blue"}, "favouriteColour"),
        ({"resourceType": "Patient", "gender": 7}, "gender"),
        ({"resourceType": "Patient", "birthDate": "yesterday"}, "Patient.birthDate"),
        ({"resourceType": "Patient", "active": "true"}, "Patient.active"),
        ({"resourceType": "Patient", "name": {"given": ["a"]}}, "Patient.name: expected an array"),
        ({"resourceType": "Patient", "name": [None]}, "Patient.name[0]: null"),
        ({"resourceType": "Patient", "name": [{"given": [None]}]}, "Patient.name[0].given[0]"),
        ({"resourceType": "Patient", "multipleBirthInteger": 1.5}, "Patient.multipleBirthInteger"),
        ({"resourceType": "Patient", "meta": {"lastUpdated": "2020"}}, "Patient.meta.lastUpdated"),
        ({**OBSERVATION, "valueString": "72"}, "Observation.value[x]: only one type"),
        (
            {"resourceType": "Patient", "contained": [{"resourceType": "Patient", "zz": 1}]},
            "Patient.contained[0].zz",
        ),
        (
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {"resourceType": "Nope"}}],
            },
            "Bundle.entry[0].resource",
        ),
    ],
)
def test_invalid_resources_are_refused_naming_the_problem(resource: Any, expected: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        fhir.validate(resource)
    assert expected in str(caught.value)
    assert caught.value.code == "invalid_resource"
    assert isinstance(caught.value, InvalidEncoding) and isinstance(caught.value, EhrError)
    assert "\n" not in str(caught.value)


def test_many_problems_are_summarised() -> None:
    bad = {"resourceType": "Patient", **{f"extra{i}": i for i in range(9)}}
    with pytest.raises(InvalidResource, match="and 4 more"):
        fhir.validate(bad)


def test_canonical_json_is_sorted_compact_and_reads_back_equal() -> None:
    resource = {"resourceType": "Patient", "name": [{"given": ["Zoë"]}], "active": True}
    encoded = fhir.encode(resource)
    assert encoded == '{"active":true,"name":[{"given":["Zoë"]}],"resourceType":"Patient"}'.encode()
    assert fhir.encode(dict(reversed(list(resource.items())))) == encoded
    assert fhir.decode(encoded) == resource
    float_resource = {**OBSERVATION, "valueQuantity": {"value": 0.0805149386188746}}
    assert fhir.decode(fhir.encode(float_resource)) == float_resource


def test_values_json_cannot_hold_are_refused() -> None:
    with pytest.raises(InvalidResource):
        fhir.encode({"resourceType": "Observation", "value": float("nan")})
    with pytest.raises(InvalidResource):
        fhir.decode(b"[1]")
    with pytest.raises(InvalidResource):
        fhir.decode(b"\xff")


def test_text_json_or_utf8_cannot_hold_is_refused_not_raised(tmp_path: Path) -> None:
    lone_surrogate = json.loads('{"resourceType": "Patient", "name": [{"text": "\\ud800"}]}')
    with pytest.raises(InvalidResource, match="cannot be written as JSON"):
        fhir.prepare(lone_surrogate)
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidResource, match="cannot be written as JSON"):
        fhir.prepare({"resourceType": "Patient", "extension": deep})
    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidResource, match="not JSON"):
        fhir.decode(nested)  # what a hostile writer's record could decrypt to
    bundle = tmp_path / "deep.json"
    bundle.write_bytes(nested)
    with pytest.raises(InvalidResource, match="not a readable JSON file"):
        load_bundle(bundle)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_ELEMENTS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["Patient", "Observation", "Bundle", "Encounter", "Claim"]),
    body=st.dictionaries(st.sampled_from(_ELEMENTS), _JSON, max_size=6),
)
def test_any_json_object_is_either_valid_or_refused_by_name(kind: str, body: Any) -> None:
    """The validator is compiled code: whatever a resource holds, the outcome is a type or
    an InvalidResource, never another exception."""
    try:
        assert fhir.validate({**body, "resourceType": kind}) == kind
    except InvalidResource as err:
        assert str(err) and "\n" not in str(err)


def test_messages_leave_out_the_values_found_and_stay_short() -> None:
    patient = {
        "resourceType": "Patient",
        "birthDate": "1974-13-25",
        "gender": "fe male ",
        "multipleBirthInteger": 1.5,
    }
    with pytest.raises(InvalidResource) as caught:
        fhir.validate(patient)
    message = str(caught.value)
    assert "Patient.birthDate: the value is not a valid date" in message
    assert "Patient.multipleBirthInteger: the value is not a FHIR integer" in message
    assert "1974" not in message and "fe male" not in message and "1.5" not in message
    attachment = {"data": "QUJD" * 250_000 + "!"}  # 1 MB of base64 with one bad character
    document = {"resourceType": "DocumentReference", "status": "current"}
    with pytest.raises(InvalidResource) as caught:
        fhir.validate({**document, "content": [{"attachment": attachment}]})
    assert "attachment.data: the value is not a valid base64Binary" in str(caught.value)
    assert len(str(caught.value)) < 300


def test_the_type_given_with_the_bytes_must_be_theirs() -> None:
    plaintext = fhir.encode({"resourceType": "Patient"})
    assert fhir.validated("Patient", plaintext).kind == "Patient"
    with pytest.raises(InvalidResource, match="resourceType is Patient, not Observation"):
        fhir.validated("Observation", plaintext)


def test_the_importers_encoder_writes_the_same_bytes_for_every_sample_resource() -> None:
    entries = load_bundle(Path(__file__).parent / "data" / "1480536-bundle.json")
    assert len(entries) > 100
    for entry in entries:
        assert fhir.encode_parsed(entry["resource"]) == fhir.encode(entry["resource"])


@settings(max_examples=500, deadline=None)
@given(body=st.dictionaries(st.text(max_size=8), _JSON, max_size=6))
def test_the_importers_encoder_agrees_with_encode_on_any_parsed_json(body: Any) -> None:
    """Numbers orjson writes in another form (1e-05, 1e-07), nulls and ints beyond 64 bits
    included: ``encode_parsed`` must give ``encode``'s bytes or its refusal."""
    resource = {"resourceType": "Observation", **body}
    parsed = json.loads(json.dumps(resource))
    assert fhir.encode_parsed(parsed) == fhir.encode(parsed)


@pytest.mark.parametrize(
    "value", [1e-05, 1.5e-07, -8.261964784007407e-07, 1e-300, 5e-324, 1e16, 0.1, -0.0, 2**64, None]
)
def test_the_importers_encoder_handles_numbers_orjson_writes_differently(value: Any) -> None:
    resource = {"resourceType": "Observation", "valueQuantity": {"value": value}}
    assert fhir.encode_parsed(resource) == fhir.encode(resource)


def test_the_importers_encoder_refuses_what_encode_refuses() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InvalidResource, match="cannot be written as JSON"):
            fhir.encode_parsed({"resourceType": "Observation", "value": bad})
    lone_surrogate = json.loads('{"resourceType": "Patient", "name": [{"text": "\\ud800"}]}')
    with pytest.raises(InvalidResource, match="cannot be written as JSON"):
        fhir.encode_parsed(lone_surrogate)


def test_the_installed_orjson_writes_numbers_as_json_does() -> None:
    """orjson before 3.11.7 wrote ``1e16`` where Python writes ``1e+16``: such a version
    is found at import and every resource goes through ``encode`` instead."""
    assert fhir._ORJSON_AGREES  # the pinned version: the fast path is taken
    assert fhir.encode_parsed({"resourceType": "Observation", "v": 1e16}).endswith(b'"v":1e+16}')
