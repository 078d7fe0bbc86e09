from pathlib import Path

import pytest

from meddiff.config import ParamsError, apply_overrides, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_validate() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.train.modality_dropout_p == 0.5
    assert params.evaluate.masking_rates == [0.0, 0.2, 0.4, 0.6, 0.8]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epoks: 3\n")
    with pytest.raises(ParamsError, match=r"train\.epoks"):
        load_params(path)


def test_bad_value_is_named() -> None:
    with pytest.raises(ParamsError, match=r"train\.modality_dropout_p"):
        params_from_dict({"train": {"modality_dropout_p": 1.5}})


def test_prevalence_must_match_classes() -> None:
    from meddiff.data.cohort import plan_cohort

    params = params_from_dict({"dataset": {"classes": {"a": {"icd10": ["A00"]}, "b": {"icd10": ["B00"]}}},
                               "cohort": {"class_prevalence": [1.0]}})
    with pytest.raises(ParamsError, match=r"cohort\.class_prevalence has 1 entries but dataset\.classes has 2"):
        plan_cohort(params.cohort, params.dataset.class_names, params.seed)


def test_overrides_parse_yaml_values() -> None:
    params = apply_overrides(params_from_dict({}), ["train.epochs=3", "evaluate.masking_rates=[0.0, 0.5]"])
    assert params.train.epochs == 3
    assert params.evaluate.masking_rates == [0.0, 0.5]
    with pytest.raises(ParamsError, match="unknown key"):
        apply_overrides(params, ["train.nope=1"])


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
