"""A logistic regression on hand-made image features: the bar an image model must clear (issue 10).

If a linear model on a few density statistics of the same processed volumes beats the CNN, the CNN has
not learned the image. The features (per patient, from the brain-window channel inside the brain mask,
HU smoothed with σ :data:`SMOOTHING_SIGMA_VOXELS` by normalised convolution, ``S``):

* the histogram of ``S`` over :data:`HISTOGRAM_EDGES_HU` (fractions of the brain);
* the extremes: max ``S`` (a bleed), min ``S`` above the CSF level (an infarct);
* voxel counts of ``S`` above :data:`HYPERDENSE_THRESHOLDS_HU` and within :data:`HYPODENSE_BANDS_HU`;
* the CSF fraction (``S`` < :data:`CSF_BELOW_HU`).

Signed ``log1p`` of each, standardised on the training split; multinomial logistic regression with
balanced class weights, its inverse regularisation ``C`` chosen on the validation split's macro AUC
among :data:`C_GRID` (never on test). A patient without an image gets the training-split class prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meddiff import MODALITIES
from meddiff.data.brain import BRAIN_MASK_CHANNEL, IMAGE_CHANNELS, smooth_inside
from meddiff.data.dataset import ProcessedDataset
from meddiff.metrics import classification_metrics

#: smoothing of the brain-window HU before the statistics (voxels): the noise (4-9 HU sd) is as large
#: as a faint infarct's contrast
SMOOTHING_SIGMA_VOXELS = 1.0
#: histogram bins (HU): CSF-free brain from infarct (~10) to bleed (~60) densities
HISTOGRAM_EDGES_HU = np.linspace(2.0, 60.0, 9)
#: counts above these (HU): hemorrhage and abscess rim
HYPERDENSE_THRESHOLDS_HU = (45.0, 50.0, 60.0)
#: counts within these bands (HU): infarcts between CSF and normal white matter (~28 HU)
HYPODENSE_BANDS_HU = ((12.0, 22.0), (12.0, 25.0))
#: CSF (HU)
CSF_BELOW_HU = 12.0
#: inverse regularisation strengths tried, the best on validation kept
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: iterations of the solver (the features are few, it converges well before)
MAX_ITERATIONS = 5000


def image_features(image: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """(N, F) float64 features of processed images (N, C, D, H, W) with the :data:`IMAGE_CHANNELS` layout.

    ``hu_window`` is the preprocess window that scaled the brain-window channel to [0, 1]. An image without
    brain voxels (absent) gives zeros.

    Raises:
        ValueError: the images do not have the :data:`IMAGE_CHANNELS` channels.
    """
    if image.ndim != 5 or image.shape[1] != len(IMAGE_CHANNELS):
        raise ValueError(f"expected (N, {len(IMAGE_CHANNELS)}, D, H, W) images ({IMAGE_CHANNELS}), got {image.shape}")
    low, high = hu_window
    window = IMAGE_CHANNELS.index("brain_window")
    n_features = len(HISTOGRAM_EDGES_HU) - 1 + 2 + len(HYPERDENSE_THRESHOLDS_HU) + len(HYPODENSE_BANDS_HU) + 1
    features = np.zeros((len(image), n_features))
    for i in range(len(image)):
        brain = image[i, BRAIN_MASK_CHANNEL].astype(np.float64) > 0.5
        if not brain.any():
            continue
        hu = low + image[i, window].astype(np.float64) * (high - low)
        values = smooth_inside(hu, brain, SMOOTHING_SIGMA_VOXELS)[brain]
        above_csf = values[values > CSF_BELOW_HU]
        features[i] = np.r_[
            np.histogram(values, bins=HISTOGRAM_EDGES_HU)[0] / values.size,
            values.max(), above_csf.min() if above_csf.size else CSF_BELOW_HU,
            [(values > t).sum() for t in HYPERDENSE_THRESHOLDS_HU],
            [((values > a) & (values < b)).sum() for a, b in HYPODENSE_BANDS_HU],
            (values < CSF_BELOW_HU).mean(),
        ]
    return np.sign(features) * np.log1p(np.abs(features))


@dataclass
class FeatureLogisticRegression:
    """The fitted baseline: scaler, classifier, the ``C`` chosen and its validation macro AUC."""

    scaler: Any
    classifier: Any
    c: float
    val_auc: float
    prior: np.ndarray  # (classes,) training-split class frequencies, for patients without an image
    hu_window: tuple[float, float]

    def predict_proba(self, data: ProcessedDataset, index: np.ndarray, present: np.ndarray) -> np.ndarray:
        """(len(index), classes): the regression's probabilities where ``present`` (N, 3) has the image,
        the prior elsewhere."""
        probs = np.tile(self.prior, (len(index), 1))
        with_image = present[:, MODALITIES.index("image")]
        if with_image.any():
            x = image_features(data.arrays["image"][index[with_image]], self.hu_window)
            fitted = np.zeros((len(x), probs.shape[1]))
            fitted[:, self.classifier.classes_] = self.classifier.predict_proba(self.scaler.transform(x))
            probs[with_image] = fitted
        return probs


def fit_feature_baseline(data: ProcessedDataset, seed: int) -> FeatureLogisticRegression:
    """Fit on the training patients with an image; choose ``C`` on the validation patients with one.

    Raises:
        ValueError: no training or validation patient has an image.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    hu_window = tuple(float(v) for v in data.meta.get("hu_window", (0.0, 1.0)))
    has_image = data.arrays["modality_present"][:, MODALITIES.index("image")]
    train, val = (np.intersect1d(data.indices(s), np.flatnonzero(has_image)) for s in ("train", "val"))
    if len(train) == 0 or len(val) == 0:
        raise ValueError("the feature baseline needs training and validation patients with an image")
    labels = data.arrays["label"]
    x_train = image_features(data.arrays["image"][train], hu_window)
    x_val = image_features(data.arrays["image"][val], hu_window)
    scaler = StandardScaler().fit(x_train)
    best: FeatureLogisticRegression | None = None
    all_train = labels[data.indices("train")]
    prior = np.bincount(all_train, minlength=data.n_classes) / len(all_train)
    for c in C_GRID:
        classifier = LogisticRegression(C=c, max_iter=MAX_ITERATIONS, class_weight="balanced", random_state=seed)
        classifier.fit(scaler.transform(x_train), labels[train])
        probs = np.zeros((len(val), data.n_classes))
        probs[:, classifier.classes_] = classifier.predict_proba(scaler.transform(x_val))
        auc = float(classification_metrics(labels[val], probs)["auc_macro"])
        if best is None or auc > best.val_auc:
            best = FeatureLogisticRegression(scaler, classifier, c, auc, prior, hu_window)
    if best is None:  # C_GRID is not empty
        raise RuntimeError("no regularisation strength was tried")
    return best
