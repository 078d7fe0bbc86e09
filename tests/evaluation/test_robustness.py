"""The robustness sweep on drops of every shape: every modality subset, and sweeps that cannot mask."""

from __future__ import annotations

import numpy as np

from meddiff.evaluation.robustness import modality_subsets, robustness_sweep


class Drop:
    """The part of a processed dataset the sweep reads: labels and which modalities each patient has."""

    def __init__(self, present: np.ndarray, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.arrays = {"label": np.arange(len(present)) % 2, "modality_present": present.astype(bool)}
        self.noise = rng.normal(size=len(present))


def shown_count_predictor(calls: list[tuple[np.ndarray, np.ndarray]]):
    """Probabilities that depend on the label and on how many modalities are shown (more → surer)."""

    def predict(data: Drop, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        calls.append((index.copy(), present.copy()))
        y = data.arrays["label"][index]
        strength = present.sum(axis=1) + 0.5 * data.noise[index]
        p = 1 / (1 + np.exp(-(2 * y - 1) * strength))
        return np.stack([1 - p, p], axis=1)

    return predict


def test_seven_subsets_each_score_the_patients_who_have_them() -> None:
    assert len(modality_subsets()) == 7
    present = np.array([[1, 1, 1]] * 20 + [[0, 1, 1]] * 10 + [[1, 0, 0]] * 10, bool)
    calls: list = []
    rows = robustness_sweep(shown_count_predictor(calls), Drop(present), np.arange(40), [0.0], 1, [False], [], 20, 0)
    by_name = {r["scenario"]: r for r in rows}
    assert by_name["subset_image"]["n_patients"] == 30  # 20 with everything + 10 with the image only
    assert by_name["subset_text+tabular"]["n_patients"] == 30
    assert by_name["subset_image+text+tabular"]["n_patients"] == 40
    assert by_name["subset_image+text+tabular"]["masked_fraction"] == 0.0
    # image only: of the 20·3 + 10·2 + 10·1 = 90 present slots, 20·2 + 0 removed from those scored (30 patients)
    assert by_name["subset_image"]["masked_fraction"] == round(40 / 70, 4)
    for index, shown in calls:
        assert shown.any(axis=1).all(), "a patient was scored with no modality shown"
        assert not (shown & ~present[index]).any(), "a modality the patient lacks was shown"


def test_a_sweep_that_cannot_mask_says_so() -> None:
    present = np.array([[0, 0, 1]] * 30, bool)  # an EHR-only drop
    rows = robustness_sweep(shown_count_predictor([]), Drop(present), np.arange(30), [0.0, 0.4], 1, [False], [],
                            20, 0)
    by_name = {(r["scenario"], r["masking_rate"]): r for r in rows}
    assert by_name[("random", 0.4)]["note"].startswith("nothing to mask")
    assert by_name[("random", 0.0)]["note"] == ""
    absent_tabular = next(r for r in rows if r["scenario"] == "absent_tabular")
    assert absent_tabular["masked_fraction"] == 0.0 and absent_tabular["note"].startswith("nothing removed")
    image_only = next(r for r in rows if r["scenario"] == "subset_image")
    assert image_only["n_patients"] == 0 and np.isnan(image_only["auc_macro"])
    assert image_only["note"] == "no test patient has any of these modalities"
