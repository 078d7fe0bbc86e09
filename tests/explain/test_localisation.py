import numpy as np

from meddiff.explain.localisation import (
    centre_map,
    dice,
    fraction_mask,
    iou,
    otsu_mask,
    otsu_threshold,
    pointing_hit,
    random_map,
    score_map,
    spread,
    support_mask,
    top_k_mask,
)


def _lesion(shape=(10, 12, 8), block=(slice(2, 4), slice(3, 6), slice(1, 3))) -> np.ndarray:
    lesion = np.zeros(shape, bool)
    lesion[block] = True
    return lesion


def test_dice_and_iou() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == 0.5 and iou(a, b) == 4 / 12
    assert dice(a, a) == iou(a, a) == 1.0
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_otsu_splits_two_levels() -> None:
    values = np.r_[np.full(900, 0.1), np.full(100, 0.8)] + np.random.default_rng(0).normal(0, 0.01, 1000)
    threshold = otsu_threshold(values)
    assert values[:900].max() < threshold < values[900:].min()
    assert ((values > threshold) == (np.arange(1000) >= 900)).all()
    assert otsu_threshold(np.full(5, 0.3)) == 0.3  # constant: no cut, nothing above it


def test_thresholds_on_a_constructed_map() -> None:
    lesion = _lesion()
    attribution = np.where(lesion, 1.0, 0.0) + 0.2 * _lesion(block=(slice(5, 9), slice(0, 4), slice(0, 8)))
    support = np.ones(lesion.shape, bool)
    # ≥ 0.5 max: only the lesion (value 1.0); ≥ 0.1 max: the lesion and the 0.2 plateau.
    assert (fraction_mask(attribution, 0.5) == lesion).all()
    assert fraction_mask(attribution, 0.1).sum() == lesion.sum() + 4 * 4 * 8
    # Otsu over 820 voxels at 0, 128 at 0.2 and 12 at 1: the between-class variance is 948·12·0.973² ≈ 10 770
    # for the cut above 0.2 against 820·140·0.269² ≈ 8 280 below it, so the lesion alone is above the cut.
    assert (otsu_mask(attribution, support) == lesion).all()
    top = top_k_mask(attribution, int(lesion.sum()))
    assert (top == lesion).all()
    assert top_k_mask(np.zeros(lesion.shape), 5).sum() == 0  # nothing relevant: nothing selected
    scores = score_map(attribution, lesion, support, 0.5, 0)
    assert scores["pointing"] == 1.0
    assert scores["dice_fraction"] == scores["iou_fraction"] == scores["dice_topk"] == scores["iou_topk"] == 1.0
    assert scores["voxels_topk"] == lesion.sum()


def test_pointing_with_tolerance() -> None:
    lesion = _lesion()
    beside = np.zeros(lesion.shape)
    beside[4, 4, 1] = 1.0  # one voxel past the lesion's edge along x
    assert not pointing_hit(beside, lesion, 0) and pointing_hit(beside, lesion, 1)
    far = np.zeros(lesion.shape)
    far[9, 11, 7] = 1.0
    assert not pointing_hit(far, lesion, 1)
    assert not pointing_hit(np.zeros(lesion.shape), lesion, 1)  # an empty map points nowhere


def test_priors_live_in_the_support() -> None:
    support = np.zeros((9, 11, 7), bool)
    support[2:7, 3:10, 1:6] = True  # centroid (4, 6, 3)
    centre = centre_map(support)
    assert np.unravel_index(np.argmax(centre), centre.shape) == (4, 6, 3)
    assert (centre[~support] == 0).all() and (centre[support] > 0).all()
    noise = random_map(support, np.random.default_rng(0))
    assert (noise[~support] == 0).all() and (noise[support] > 0).all()
    # a uniform random map has about half of the support at ≥ half its maximum
    assert abs(spread(noise, support, 0.5) - 0.5) < 0.1


def test_support_prefers_the_brain_channel() -> None:
    image = np.zeros((1, 2, 4, 4, 4), np.float32)
    image[0, 0] = 0.3  # density everywhere
    image[0, 1, 1:3, 1:3, 1:3] = 1.0  # brain mask channel
    arrays = {"image": image}
    assert support_mask(arrays, 0).all()  # no brain channel: the head (any channel > 0)
    assert support_mask(arrays, 0, brain_channel=1).sum() == 8
    arrays["brain_mask"] = np.zeros((1, 1, 4, 4, 4), bool)
    arrays["brain_mask"][0, 0, 0, 0, 0] = True
    assert support_mask(arrays, 0).sum() == 1
