"""The exported drop on constructed decoded patients: DICOM (values, geometry, synthetic marking, dciodvfy),
FHIR R4 (codes, units, every resource valid under fhir.resources) and the templated note."""

import base64
import datetime
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from meddiff.config import Params
from meddiff.data.brain import AIR_HU, IMAGE_CHANNELS
from meddiff.generation.export import (
    MAX_NOTE_TERMS,
    SYNTHETIC_TAG,
    DecodedPatient,
    ExportSettings,
    ct_volume_hu,
    export_drop,
    note_terms,
    note_text,
    term_probabilities,
)

META = {"pixdim_mm": [4.0, 4.0, 6.0], "hu_window": [0.0, 80.0], "image_channels": list(IMAGE_CHANNELS)}
SHAPE = (6, 5, 4)  # X, Y, Z (RAS voxel order)


def channels(rng: np.random.Generator) -> np.ndarray:
    image = rng.random((len(IMAGE_CHANNELS), *SHAPE)).astype(np.float32)
    image[IMAGE_CHANNELS.index("brain_mask")] = 1.0
    image[IMAGE_CHANNELS.index("brain_mask"), 0] = 0.0  # the first x plane is outside the brain
    return image


def decoded(index: int, class_name: str, features: dict[str, float], rng: np.random.Generator) -> DecodedPatient:
    return DecodedPatient(f"synthetic-{index:05d}", class_name, channels(rng), features,
                          [("hemorrhage", 0.9), ("edema", 0.6), ("mass", 0.2)], f"{index:064x}")


@pytest.fixture(scope="module")
def drop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DecodedPatient], ExportSettings]:
    rng = np.random.default_rng(0)
    settings = ExportSettings.from_params(Params(), META)
    labs = {"wbc": 9.1234, "crp": -3.0, "glucose": 6.2, "systolic_bp": 141.0, "inr": 1.1, "temperature": 37.2}
    patients = [
        decoded(0, "intracerebral_hemorrhage", {**labs, "age": 67.4, "sex_male": 0.9}, rng),
        decoded(1, "brain_abscess", {**labs, "crp": 900.0, "age": 41.0, "sex_male": 0.1}, rng),
        decoded(2, "healthy", {"wbc": 7.0}, rng),  # no age, no sex: unknown, not invented
    ]
    out = tmp_path_factory.mktemp("drop")
    summary = export_drop(patients, settings, out)
    assert summary.n_patients == 3 and summary.n_dicom_files == 3 * SHAPE[2]
    assert summary.resources == {"Patient": 3, "Observation": 13, "Condition": 3, "DocumentReference": 3}
    assert summary.n_lab_values_clipped == 2  # crp −3 → 0, crp 900 → 500 (the dataset.features range)
    return out, patients, settings


def resources(out: Path, kind: str) -> list[dict]:
    return [json.loads(line) for line in (out / "ehr" / f"{kind}.ndjson").read_text().splitlines()]


def test_every_fhir_resource_validates_and_is_tagged_synthetic(drop, fhir_model) -> None:
    out, _, _ = drop
    for kind in ("Patient", "Observation", "Condition", "DocumentReference"):
        for resource in resources(out, kind):
            fhir_model(kind).model_validate(resource)
            assert SYNTHETIC_TAG in resource["meta"]["tag"]
            assert resource["meta"]["security"][0]["code"] == "HTEST"


def test_patients_have_decoded_gender_and_birth_date(drop) -> None:
    out, _, settings = drop
    patients = {p["id"]: p for p in resources(out, "Patient")}
    first = patients["synthetic-00000"]
    assert first["gender"] == "male" and patients["synthetic-00001"]["gender"] == "female"
    assert first["birthDate"] == (settings.reference_date - datetime.timedelta(days=round(67.4 * 365.25))).isoformat()
    assert "gender" not in patients["synthetic-00002"] and "birthDate" not in patients["synthetic-00002"]
    assert first["managingOrganization"] == {"reference": "Organization/meddiff-synthetic"}
    assert "name" not in first and "address" not in first and "telecom" not in first


def test_observations_carry_loinc_and_ucum_in_range(drop) -> None:
    out, _, settings = drop
    params = Params()
    observations = [o for o in resources(out, "Observation") if o["subject"]["reference"] == "Patient/synthetic-00000"]
    by_lab = {o["id"].removeprefix("synthetic-00000-").replace("-", "_"): o for o in observations}
    assert set(by_lab) == set(params.dataset.feature_units)
    for lab, observation in by_lab.items():
        (coding,) = observation["code"]["coding"]
        assert coding["system"] == "http://loinc.org" and coding["code"] in params.dataset.features[lab].loinc
        quantity = observation["valueQuantity"]
        assert quantity["system"] == "http://unitsofmeasure.org"
        assert quantity["unit"] == quantity["code"] == params.dataset.features[lab].unit
    assert by_lab["wbc"]["valueQuantity"]["value"] == 9.12
    assert by_lab["crp"]["valueQuantity"]["value"] == 0.0
    clipped = next(o for o in resources(out, "Observation") if o["id"] == "synthetic-00001-crp")
    assert clipped["valueQuantity"]["value"] == settings.lab_ranges["crp"][1]


def test_condition_codes_the_sampled_class(drop) -> None:
    out, patients, _ = drop
    icd10 = Params().dataset.class_icd10
    conditions = resources(out, "Condition")
    assert [c["code"]["coding"][0]["code"] for c in conditions] == [icd10[p.class_name] for p in patients]
    assert conditions[0]["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10"


def test_document_reference_holds_the_templated_note(drop) -> None:
    out, _, _ = drop
    reference = resources(out, "DocumentReference")[0]
    attachment = reference["content"][0]["attachment"]
    assert attachment["contentType"].startswith("text/plain")
    text = base64.b64decode(attachment["data"]).decode("utf-8")
    assert text == note_text(["hemorrhage", "edema"])
    assert "Generated findings: hemorrhage and edema." in text and "SYNTHETIC" in text


def test_note_terms_come_from_the_ontology_only() -> None:
    vocabulary = {0: "[PAD]", 1: ".", 2: "].", 3: "[NAME]", 4: "mrn", 5: "hemorrhage", 6: "bleed", 7: "edema",
                  8: "the", 9: "abscess"}
    probs = np.array([0.99, 0.99, 0.99, 0.99, 0.99, 0.6, 0.9, 0.7, 0.99, 0.3])
    ranked = term_probabilities(probs, vocabulary)
    assert ranked == [("hemorrhage", pytest.approx(0.9)), ("edema", pytest.approx(0.7)),
                      ("abscess", pytest.approx(0.3))]
    assert note_terms(ranked) == ["hemorrhage", "edema"]
    assert note_terms([("abscess", 0.3), ("mass", 0.1)]) == ["abscess"]  # at least the likeliest
    assert len(note_terms([(f"t{i}", 0.9) for i in range(10)])) == MAX_NOTE_TERMS
    assert "none" in note_text([])


def test_ct_volume_is_the_brain_window_channel_in_hu_with_air_outside_the_brain() -> None:
    image = channels(np.random.default_rng(1))
    volume = ct_volume_hu(image, list(IMAGE_CHANNELS), (0.0, 80.0))
    np.testing.assert_allclose(volume[1:], 80.0 * image[0, 1:].astype(float))
    assert (volume[0] == AIR_HU).all()
    # a single-channel decoder (no names): channel 0 is the window, no mask
    np.testing.assert_allclose(ct_volume_hu(image[:1], [], (-10.0, 90.0)), -10.0 + 100.0 * image[0].astype(float))
    with pytest.raises(ValueError, match="C, X, Y, Z"):
        ct_volume_hu(image[0], [], (0.0, 80.0))


def series_files(out: Path, patient_id: str) -> list[Path]:
    return sorted((out / "imaging" / patient_id).rglob("*.dcm"), key=lambda p: int(p.stem))


def test_dicom_series_is_derived_marked_synthetic_and_holds_the_volume_in_lps(drop) -> None:
    out, patients, settings = drop
    files = series_files(out, "synthetic-00000")
    datasets = [pydicom.dcmread(path) for path in files]
    first = datasets[0]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert first.BurnedInAnnotation == "NO" and first.PatientIdentityRemoved == "YES"
    assert "SYNTHETIC" in first.SeriesDescription and "not for clinical use" in first.ImageComments
    assert first.PatientID == "synthetic-00000" and first.PatientSex == "M" and first.PatientAge == "067Y"
    assert first.AccessionNumber == "" and first.InstitutionName == "SYNTHETIC"
    others = [pydicom.dcmread(series_files(out, p.patient_id)[0]) for p in patients[1:]]
    assert len({d.StudyInstanceUID for d in [first, *others]}) == 3
    assert len({d.SeriesInstanceUID for d in [first, *others]}) == 3
    expected = ct_volume_hu(patients[0].channels, settings.channel_names, settings.hu_window)[::-1, ::-1, :]
    for k, ds in enumerate(datasets):
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(hu, np.rint(expected[:, :, k].T + 1024) - 1024)
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-0.5 * (SHAPE[2] - 1) * 6.0 + 6.0 * k)
    assert [float(v) for v in first.PixelSpacing] == [4.0, 4.0]


def test_dciodvfy_reports_no_errors_on_a_sample(drop, dciodvfy) -> None:
    out, patients, _ = drop
    for patient in patients:
        files = series_files(out, patient.patient_id)
        for path in (files[0], files[-1]):
            completed = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
            output = completed.stdout + completed.stderr
            assert "Error" not in output and "Warning" not in output, output
            assert "CTImage" in output, output


def test_a_class_without_icd10_code_is_refused(tmp_path) -> None:
    patient = decoded(0, "unknown_class", {}, np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"dataset\.classes has no ICD-10 code"):
        export_drop([patient], ExportSettings.from_params(Params(), META), tmp_path)


def test_non_square_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        ExportSettings.from_params(Params(), {**META, "pixdim_mm": [4.0, 3.0, 6.0]})
