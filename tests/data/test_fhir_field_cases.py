"""FHIR as servers write it and BraTS as it ships (issue 15): the right values for each shape, and
property-based checks that no resource shape makes a reader raise."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meddiff.config import DatasetConfig
from meddiff.data.deid import deidentify_text, identifiers_from_patient
from meddiff.data.fhir import (
    age_at,
    condition_row,
    document_note,
    icd10_class,
    observation_row,
    patient_row,
    read_bundle,
    reference_id,
)
from meddiff.data.nifti import CaseError, load_brats_case
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import TableValidator, patient_rules

REFERENCE_DATE = datetime.date(2024, 6, 30)
DATASET = DatasetConfig()
LAB_BY_LOINC = DATASET.feature_by_loinc
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"


def bp_panel(systolic: float, diastolic: float, pid: str = "P1") -> dict[str, Any]:
    def quantity(v: float) -> dict[str, Any]:
        return {"value": v, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}

    return {"resourceType": "Observation", "id": "bp", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": quantity(diastolic)},
                {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": quantity(systolic)}]}


def test_blood_pressure_panel_gives_systolic_from_its_component() -> None:
    row = observation_row(bp_panel(182.0, 104.0), LAB_BY_LOINC, DATASET.feature_units)
    assert (row["lab"], row["loinc"], row["value"], row["patient_id"]) == ("systolic_bp", "8480-6", 182.0, "P1")
    kpa = bp_panel(0, 0)
    kpa["component"][1]["valueQuantity"] = {"value": 24.0, "unit": "kPa", "code": "kPa"}
    assert observation_row(kpa, LAB_BY_LOINC, DATASET.feature_units)["value"] == pytest.approx(24.0 * 7.50062)
    display_unit = bp_panel(0, 0)
    display_unit["component"][1]["valueQuantity"] = {"value": 131, "unit": "mmHg"}  # display string, no code
    assert observation_row(display_unit, LAB_BY_LOINC, DATASET.feature_units)["value"] == 131.0


def test_transaction_bundle_urn_uuid_references_resolve_through_full_url(tmp_path: Path) -> None:
    patient_url = "urn:uuid:7f3c7a1e-1b7a-4b8e-9a55-0c3b1a2d4e5f"
    org_url = "urn:uuid:0b1c2d3e-aaaa-bbbb-cccc-000000000001"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": org_url, "resource": {"resourceType": "Organization", "id": "site_x"},
         "request": {"method": "POST", "url": "Organization"}},
        {"fullUrl": patient_url, "resource": {"resourceType": "Patient", "gender": "female", "birthDate": "1957",
                                              "managingOrganization": {"reference": org_url}},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:c0ffee00-0000-0000-0000-000000000002",
         "resource": {"resourceType": "Condition", "subject": {"reference": patient_url},
                      "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I639"}]}}},
        {"fullUrl": "https://fhir.example.org/Observation/o1",
         "resource": {**bp_panel(150.0, 90.0), "subject": {"reference": patient_url}}},
    ]}
    (tmp_path / "b.json").write_text(json.dumps(bundle))
    entries, error = read_bundle(tmp_path / "b.json")
    assert error is None
    resources = {r["resourceType"]: r for _, r, _ in entries}
    uuid = patient_url.removeprefix("urn:uuid:")
    assert resources["Patient"]["id"] == uuid
    assert patient_row(resources["Patient"], REFERENCE_DATE)["site"] == "site_x"
    condition = condition_row(resources["Condition"], DATASET.icd10_to_class)
    assert (condition["patient_id"], condition["icd10"], condition["label"]) == (uuid, "I63.9", "ischemic_stroke")
    observation = observation_row(resources["Observation"], LAB_BY_LOINC, DATASET.feature_units)
    assert (observation["patient_id"], observation["value"]) == (uuid, 150.0)


@pytest.mark.parametrize(("reference", "expected"), [
    ({"reference": "Patient/P1"}, "P1"), ({"reference": "https://h.example/fhir/Patient/P1"}, "P1"),
    ({"reference": "Patient/P1/_history/3"}, "P1"), ({"reference": "Group/P1"}, None),
    ({"display": "Jane"}, None), ("Patient/P1", None), (None, None),
])
def test_reference_forms(reference: object, expected: str | None) -> None:
    assert reference_id(reference) == expected


@pytest.mark.parametrize("name", [
    [{"family": ["Vandersloot"], "given": "Perpetua"}],               # DSTU2: family a list, given a string
    [{"family": "Vandersloot", "given": ["Perpetua", "Maria"]}],      # R4
    {"family": "Vandersloot", "given": ["Perpetua"]},                  # one HumanName where a list belongs
    [{"text": "Perpetua Vandersloot"}],                                # text only
    ["Perpetua Vandersloot"],                                          # a bare string
])
def test_every_human_name_shape_is_scrubbed_from_the_note(name: object) -> None:
    who = identifiers_from_patient({"resourceType": "Patient", "id": "FX10", "name": name,
                                    "contact": [{"name": {"family": "Okonkwo", "given": ["Ada"]},
                                                 "telecom": [{"value": "555-404-1212"}]}]})
    note = deidentify_text("Patient: Perpetua Vandersloot, brought by Ada Okonkwo (555-404-1212). "
                           "Signed out as Vandersloot, Perpetua.", who)
    for secret in ("Perpetua", "Vandersloot", "Okonkwo", "Ada", "555-404-1212"):
        assert secret not in note, (secret, note)
    assert note.count("[NAME]") >= 5


@pytest.mark.parametrize(("code", "label"), [("I639", "ischemic_stroke"), ("I63.9", "ischemic_stroke"),
                                             ("Z0389", "healthy"), ("G060", "brain_abscess"),
                                             ("g06.0", "brain_abscess"), ("I619", "intracerebral_hemorrhage"),
                                             ("G061", None), ("Z038", None)])
def test_icd10_with_or_without_the_dot(code: str, label: str | None) -> None:
    assert icd10_class(code, DATASET.icd10_to_class) == label


@pytest.mark.parametrize(("birth", "age"), [("1957", 66.0), ("1957-07", 66.0), ("1957-06", 67.0),
                                            ("1957-06-30", 67.0), ("1957-07-01", 66.0),
                                            ("1957-06-29T23:00:00+01:00", 67.0), ("1957-13", None),
                                            ("07/12/1957", None), (None, None)])
def test_partial_birth_dates(birth: str | None, age: float | None) -> None:
    assert age_at(birth, REFERENCE_DATE) == age


def test_optional_patient_fields_absent_are_unknown_and_a_bad_date_is_quarantined_quoting_it() -> None:
    bare = patient_row({"resourceType": "Patient", "id": "P1"}, REFERENCE_DATE)
    assert bare == {"patient_id": "P1", "sex": None, "birth_date": None, "birth_date_invalid": None, "age": None,
                    "site": None}
    bad = patient_row({"resourceType": "Patient", "id": "P2", "birthDate": "12/07/1957"}, REFERENCE_DATE)
    assert bad["birth_date_invalid"] == "12/07/1957" and bad["age"] is None
    import pandas as pd

    frame = pd.DataFrame([{"record_id": "a", **bare}, {"record_id": "b", **bad},
                          {"record_id": "c", **patient_row({"id": "BraTS2021_00012", "birthDate": "1957-07"},
                                                           REFERENCE_DATE)}])
    failures = TableValidator().validate("patient", frame, patient_rules((0, 120))).failures
    assert set(failures) == {"b"} and failures["b"][0] == "invalid_value" and "12/07/1957" in failures["b"][1]


# ------------------------------------------------------------------------------------------- BraTS


def _brats(folder: Path, case: str, names: dict[str, str], separator: str, *, singleton: bool = False,
           nan_background: bool = False) -> np.ndarray:
    folder.mkdir(parents=True)
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    brain = np.zeros((6, 6, 4), np.float32)
    brain[1:5, 1:5, 1:3] = 400.0
    seg = np.zeros((6, 6, 4), np.uint8)
    seg[2, 2, 1] = 2
    flair = brain + 450.0 * seg
    for role, name in names.items():
        data = seg if role == "seg" else (flair if role == "flair" else brain)
        if role == "flair" and nan_background:
            data = np.where(brain > 0, data, np.nan).astype(np.float32)
        nib.save(nib.Nifti1Image(data[..., None] if singleton else data, affine),
                 folder / f"{case}{separator}{name}.nii.gz")
    return flair


BRATS_2021 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
BRATS_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


@pytest.mark.parametrize(("case", "names", "separator"), [("BraTS2021_00012", BRATS_2021, "_"),
                                                          ("BraTS-GLI-00012-000", BRATS_2023, "-")])
def test_brats_2021_and_2023_naming(tmp_path: Path, case: str, names: dict[str, str], separator: str) -> None:
    flair = _brats(tmp_path / case, case, names, separator)
    loaded = load_brats_case(case, sorted((tmp_path / case).iterdir()), "flair")
    np.testing.assert_array_equal(loaded.image, flair)
    assert loaded.mask.sum() == 1 and loaded.mask[2, 2, 1] == 1


def test_brats_trailing_singleton_axis_and_nan_background(tmp_path: Path) -> None:
    flair = _brats(tmp_path / "a", "BraTS21-00077", BRATS_2021, "_", singleton=True)
    loaded = load_brats_case("BraTS21-00077", sorted((tmp_path / "a").iterdir()), "flair")
    assert loaded.image.shape == (6, 6, 4)
    np.testing.assert_array_equal(loaded.image, flair)
    flair = _brats(tmp_path / "b", "BraTS21-00078", BRATS_2021, "_", nan_background=True)
    loaded = load_brats_case("BraTS21-00078", sorted((tmp_path / "b").iterdir()), "flair")
    assert np.isfinite(loaded.image).all()
    np.testing.assert_array_equal(loaded.image, flair)  # the background was 0 before it became NaN
    with pytest.raises(CaseError) as caught:
        load_brats_case("BraTS21-00077", [*sorted((tmp_path / "a").iterdir()), tmp_path / "a" / "x_t1.nii.gz"],
                        "flair")
    assert caught.value.reason == "unexpected_file"


# ------------------------------------------------------------------------------- property-based

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=12,
)
_keys = st.sampled_from(["id", "gender", "birthDate", "managingOrganization", "name", "subject", "code",
                         "valueQuantity", "component", "content", "telecom", "address", "contact", "identifier"])


@settings(max_examples=150, deadline=1000)
@given(resource=st.dictionaries(_keys, _json, max_size=8))
def test_no_resource_shape_makes_a_reader_raise(resource: dict[str, Any]) -> None:
    """Any JSON in any field: the rows come back (values typed or None), never an exception."""
    patient = patient_row(resource, REFERENCE_DATE)
    assert patient["age"] is None or isinstance(patient["age"], float)
    assert patient["site"] is None or isinstance(patient["site"], str)
    observation = observation_row(resource, LAB_BY_LOINC, DATASET.feature_units)
    assert observation["value"] is None or observation["lab"] in DATASET.feature_units
    condition = condition_row(resource, DATASET.icd10_to_class)
    assert condition["label"] is None or condition["label"] in DATASET.icd10_to_class.values()
    document_note(resource)
    who = identifiers_from_patient(resource)
    assert all(isinstance(n, str) and n for n in who.names)


@settings(max_examples=60, deadline=1000)
@given(systolic=st.floats(50.0, 260.0), diastolic=st.floats(30.0, 140.0), as_panel=st.booleans(),
       unit=st.sampled_from(["mm[Hg]", "mmHg", "kPa"]), dotted=st.booleans(),
       birth=st.dates(datetime.date(1905, 1, 1), datetime.date(2023, 12, 31)),
       precision=st.sampled_from(["year", "month", "day"]), drop=st.sets(st.sampled_from(["gender", "site"])))
def test_well_formed_resources_in_any_server_shape_give_the_right_values(
        systolic: float, diastolic: float, as_panel: bool, unit: str, dotted: bool, birth: datetime.date,
        precision: str, drop: set[str]) -> None:
    value = systolic / 7.50062 if unit == "kPa" else systolic
    if as_panel:
        observation = bp_panel(value, diastolic)
        observation["component"][1]["valueQuantity"] = {"value": value, "unit": unit}
    else:
        observation = {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/P1"},
                       "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                       "valueQuantity": {"value": value, "unit": unit}}
    value = observation_row(observation, LAB_BY_LOINC, DATASET.feature_units)["value"]
    assert value == pytest.approx(systolic, rel=1e-6)
    code = "I63.9" if dotted else "I639"
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/P1"},
                 "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}]}}
    assert condition_row(condition, DATASET.icd10_to_class)["label"] == "ischemic_stroke"
    text = {"year": f"{birth.year:04d}", "month": f"{birth.year:04d}-{birth.month:02d}", "day": birth.isoformat()}
    patient: dict[str, Any] = {"resourceType": "Patient", "id": "P1", "gender": "male", "birthDate": text[precision],
                               "managingOrganization": {"reference": "Organization/site_a"}}
    for field in drop:
        patient.pop({"gender": "gender", "site": "managingOrganization"}[field])
    row = patient_row(patient, REFERENCE_DATE)
    dated = {"year": birth.replace(month=7, day=1), "month": birth.replace(day=15), "day": birth}[precision]
    before_birthday = (REFERENCE_DATE.month, REFERENCE_DATE.day) < (dated.month, dated.day)
    expected = REFERENCE_DATE.year - dated.year - before_birthday
    assert row["age"] == expected and row["birth_date_invalid"] is None
    assert row["site"] == (None if "site" in drop else "site_a")
    assert row["sex"] == (None if "gender" in drop else "male")


def test_an_unreadable_resource_is_quarantined_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff.data.ingest import tables

    def exploding(*_: object) -> dict[str, Any]:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(tables, "observation_row", exploding)
    ledger = Ledger()
    record = ledger.add(Record("observation", "o1", "ehr/Observation.ndjson:1"))
    frame = tables.observation_table([(record, {"id": "o1"}, "fhir")], DATASET, ledger)
    assert frame.empty and record.reason == "invalid_resource" and "unhashable" in str(record.message)
