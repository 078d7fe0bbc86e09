import json

from meddiff.generation.generate import run_generate


def test_generate_writes_records_and_quality(trained_tiny, tmp_path) -> None:
    params = trained_tiny["params"]
    result = run_generate(
        params, trained_tiny["processed"], trained_tiny["models"], tmp_path / "synthetic", tmp_path / "report"
    )
    n_classes = trained_tiny["data"].n_classes
    assert result.n_patients == n_classes * params.generate.n_per_class
    assert len(list((tmp_path / "synthetic" / "imaging").glob("*.nii.gz"))) == result.n_patients
    observations = (tmp_path / "synthetic" / "Observation.ndjson").read_text().splitlines()
    assert json.loads(observations[0])["resourceType"] == "Observation"
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert 0.0 <= metrics["class_agreement"] <= 1.0
    assert metrics["frechet_distance"] >= 0.0 and metrics["frechet_distance_real_floor"] >= 0.0
