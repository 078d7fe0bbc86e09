"""How informative is each modality of the synthetic cohort alone, and all three together?

Logistic regression on simple per-modality features of ``data/processed`` (run ``meddiff cohort``,
``ingest`` and ``preprocess`` first), 5-fold stratified cross-validation over all patients, macro
one-vs-rest ROC AUC (and per class). A missing modality stays missing (zeros / imputed), as the
model will see it.

* image: the hand-made brain-density features of the suite's ``feature_lr`` baseline
  (:func:`meddiff.evaluation.feature_baseline.image_features`: smoothed-HU histogram, extremes,
  hyperdense/hypodense counts, CSF fraction) for the density-channel images of issue 10; for older
  single-channel arrays the normalised histogram of windowed intensities (24 bins over (0, 1), clipped
  voxels dropped) plus the 1st/5th/50th/95th/99th percentiles;
* text: binary bag of token ids (the fitted WordLevel vocabulary);
* tabular: the standardised labs, age, sex and the missing flags.

Usage: ``python bench/cohort_separability.py [--processed data/processed] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from meddiff.data.dataset import load_processed


def image_features(images: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Brain-density features of density-channel images, else histogram + percentiles of in-window voxels."""
    from meddiff.data.brain import IMAGE_CHANNELS
    from meddiff.evaluation.feature_baseline import image_features as brain_features

    if images.shape[1] == len(IMAGE_CHANNELS):
        return brain_features(images, hu_window)
    flat = images.reshape(len(images), -1).astype(np.float32)
    features = []
    for row in flat:
        inside = row[(row > 0.0) & (row < 1.0)]
        if inside.size == 0:
            features.append(np.zeros(29))
            continue
        histogram, _ = np.histogram(inside, bins=24, range=(0.0, 1.0))
        features.append(np.concatenate([histogram / inside.size, np.percentile(inside, [1, 5, 50, 95, 99])]))
    return np.asarray(features)


def text_features(token_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Binary bag of token ids, special tokens dropped."""
    bag = np.zeros((len(token_ids), vocab_size), dtype=np.float32)
    for i, row in enumerate(token_ids):
        bag[i, row[row > 3]] = 1.0
    return bag


def cross_validated_auc(features: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int) -> dict:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=3000, class_weight="balanced"))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(model, features, labels, cv=folds, method="predict_proba")
    per_class = {
        name: float(roc_auc_score(labels == k, probabilities[:, k])) for k, name in enumerate(class_names)
    }
    return {"macro_auc": float(np.mean(list(per_class.values()))), "per_class_auc": per_class}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", default="data/processed")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = load_processed(Path(args.processed))
    arrays, labels = dataset.arrays, dataset.arrays["label"]
    blocks = {
        "image": image_features(arrays["image"], tuple(dataset.meta.get("hu_window", (0.0, 1.0)))),
        "text": text_features(arrays["token_ids"], dataset.vocab_size),
        "tabular": np.concatenate([arrays["tabular"], arrays["tabular_missing"]], axis=1),
    }
    blocks["all_three"] = np.concatenate(list(blocks.values()), axis=1)
    results = {name: cross_validated_auc(x, labels, dataset.class_names, args.seed) for name, x in blocks.items()}
    header = "| features | macro AUC | " + " | ".join(dataset.class_names) + " |"
    print(header)
    print("|---" * (len(dataset.class_names) + 2) + "|")
    for name, result in results.items():
        per = " | ".join(f"{result['per_class_auc'][c]:.3f}" for c in dataset.class_names)
        print(f"| {name} | {result['macro_auc']:.3f} | {per} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_patients": len(labels), "results": results}, indent=2))


if __name__ == "__main__":
    main()
