"""Anatomy-like head CT volumes in Hounsfield units, with disease lesions, for the synthetic cohort.

A head is an ellipsoid in patient coordinates (LPS, millimetres, origin at the field-of-view centre):
scalp (~ +40 HU), skull (~ +700..1000 HU), cortex (~ +38 HU), white matter (~ +28 HU), lateral
ventricles (CSF, ~ +5 HU), air (-1000 HU). Lesions follow the CT appearance of each disease:

* ischemic stroke: hypodense region (~ +10..25 HU); hyperacute strokes are often invisible on CT;
* intracerebral hemorrhage: hyperdense blob (~ +55..80 HU);
* brain abscess: ring-enhancing lesion, a bright rim around a dark core, with perilesional oedema.

Healthy heads sometimes carry lesion mimics (a small calcification or an old lacune), so that image
intensity alone does not separate the classes. Everything is sampled at the voxel centres of the
acquisition grid, so thicker slices (the minority site) see the same head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0
SCALP_HU = 40.0
CORTEX_HU = 38.0
WHITE_MATTER_HU = 28.0
CSF_HU = 5.0


#: the shell around a lesion whose tissue is its "surroundings", in units of the lesion's own ellipsoidal
#: radius: from where the soft lesion edge (:func:`_soft_inside`, edge 0.12) has fallen below ~8 %
#: to the next lesion-sized ring, so the value is the tissue a reader compares the lesion against
SURROUNDING_SHELL = (1.3, 1.8)


@dataclass(frozen=True)
class Lesion:
    """One lesion, for the data card and the mask: kind, centre (LPS mm), radius (mm), ``target_hu`` (its
    density: the core for stroke and hemorrhage, the enhancing rim for an abscess) and ``contrast_hu``
    (|target − median density of the surrounding brain|, before scanner noise and calibration: what
    decides whether the lesion is visible at all; the cohort makes ~30 % of strokes nearly invisible)."""

    kind: str
    center_mm: tuple[float, float, float]
    radius_mm: float
    target_hu: float
    contrast_hu: float


def surrounding_contrast(volume: np.ndarray, lesion_radius: np.ndarray, brain: np.ndarray, target_hu: float) -> float:
    """|``target_hu`` − median HU of the brain in the :data:`SURROUNDING_SHELL` of the lesion| (HU).

    ``lesion_radius`` is the normalised ellipsoidal radius of every voxel (< 1 inside the lesion); a lesion
    with no brain voxel in its shell (too small for the grid) is compared with the whole brain outside it.
    """
    shell = brain & (lesion_radius >= SURROUNDING_SHELL[0]) & (lesion_radius < SURROUNDING_SHELL[1])
    if not shell.any():
        shell = brain & (lesion_radius >= 1.0)
    return float(abs(target_hu - np.median(volume[shell])))


def voxel_centres(shape_ijk: tuple[int, int, int], spacing_ijk: tuple[float, float, float]) -> np.ndarray:
    """LPS coordinates (mm) of every voxel centre of a grid centred on the origin: ``(3, I, J, K)``."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape_ijk, spacing_ijk, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _ellipsoid_radius(points: np.ndarray, center: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside, 1 on the surface."""
    offset = (points - center[:, None, None, None]) / semi_axes[:, None, None, None]
    return np.sqrt(np.sum(offset**2, axis=0))


def _soft_inside(radius: np.ndarray, edge: float = 0.12) -> np.ndarray:
    """A smooth indicator of ``radius < 1`` (partial-volume edge)."""
    return 1.0 / (1.0 + np.exp((radius - 1.0) / edge))


def head_volume(
    rng: np.random.Generator, points: np.ndarray, age_years: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Background anatomy in HU plus the brain mask, the head centre and semi-axes (mm)."""
    scale = rng.uniform(0.92, 1.04)
    semi_axes = np.array([68.0, 84.0, 66.0]) * scale
    center = np.array([rng.normal(0, 3), rng.normal(0, 3), rng.normal(0, 4)])
    radius = _ellipsoid_radius(points, center, semi_axes)
    skull_thickness = rng.uniform(5.0, 8.0) / semi_axes.mean()
    inner = 1.0 - skull_thickness
    scalp = 1.0 + 4.0 / semi_axes.mean()

    volume = np.full(points.shape[1:], AIR_HU)
    volume[radius < scalp] = SCALP_HU
    skull_density = rng.uniform(700.0, 1000.0)
    skull = (radius < 1.0) & (radius >= inner)
    volume[skull] = skull_density + rng.normal(0.0, 40.0, size=int(skull.sum()))
    brain = radius < inner
    # grey matter rim over white matter, a smooth transition
    grey_weight = np.clip((radius - 0.72 * inner) / (0.18 * inner), 0.0, 1.0)
    volume[brain] = (WHITE_MATTER_HU + (CORTEX_HU - WHITE_MATTER_HU) * grey_weight)[brain]
    # lateral ventricles widen with age (atrophy); the cohort passes an "atrophy age" that does not depend
    # on the diagnosis (cohort.ATROPHY_AGE_MODEL), so ventricle size is no shortcut to the label
    ventricle_scale = 1.0 + max(age_years - 40.0, 0.0) / 60.0
    for side in (-1.0, 1.0):
        v_center = center + np.array([side * 9.0, 4.0, 12.0])
        v_axes = np.array([5.0, 20.0, 9.0]) * ventricle_scale * scale
        weight = _soft_inside(_ellipsoid_radius(points, v_center, v_axes), edge=0.15) * brain
        volume = volume * (1 - weight) + CSF_HU * weight
    return volume, brain, center, semi_axes


def _random_brain_point(
    rng: np.random.Generator, center: np.ndarray, semi_axes: np.ndarray, depth: tuple[float, float]
) -> np.ndarray:
    """A random point at normalised ellipsoidal depth ``depth`` (0 centre, 1 skull) inside the brain."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return center + direction * semi_axes * rng.uniform(*depth)


def add_lesion(
    rng: np.random.Generator,
    volume: np.ndarray,
    points: np.ndarray,
    brain: np.ndarray,
    head_center: np.ndarray,
    semi_axes: np.ndarray,
    diagnosis: str,
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Add the lesion of ``diagnosis`` (or a mimic for a healthy head); return volume, mask, lesions."""
    mask = np.zeros(volume.shape, dtype=np.uint8)
    lesions: list[Lesion] = []
    if diagnosis == "healthy":
        draw = rng.random()
        if draw < 0.12:  # physiological calcification: tiny and very bright
            kind, radius, target = "calcification_mimic", rng.uniform(2.5, 4.0), rng.uniform(70.0, 140.0)
        elif draw < 0.24:  # old lacune: tiny and dark
            kind, radius, target = "lacune_mimic", rng.uniform(3.0, 6.0), rng.uniform(8.0, 18.0)
        else:
            return volume, mask, lesions
        centre = _random_brain_point(rng, head_center, semi_axes, (0.2, 0.6))
        weight = _soft_inside(_ellipsoid_radius(points, centre, np.full(3, radius))) * brain
        volume = volume * (1 - weight) + target * weight
        mimic_radius = _ellipsoid_radius(points, centre, np.full(3, radius))
        contrast = surrounding_contrast(volume, mimic_radius, brain, target)
        lesions.append(Lesion(kind, tuple(centre.round(1)), round(radius, 1), round(target, 1), round(contrast, 1)))
        return volume, mask, lesions

    axes_ratio = rng.uniform(0.7, 1.3, size=3)
    if diagnosis == "ischemic_stroke":
        radius = rng.uniform(7.0, 20.0)
        # hyperacute strokes (~ 30 %) are barely visible on non-contrast CT
        target = rng.uniform(24.0, 29.0) if rng.random() < 0.3 else rng.uniform(10.0, 24.0)
        centre = _random_brain_point(rng, head_center, semi_axes, (0.35, 0.7))
    elif diagnosis == "intracerebral_hemorrhage":
        small = rng.random() < 0.25
        radius = rng.uniform(3.0, 5.0) if small else rng.uniform(6.0, 16.0)
        target = rng.uniform(45.0, 60.0) if small else rng.uniform(55.0, 80.0)
        centre = _random_brain_point(rng, head_center, semi_axes, (0.1, 0.55))
    elif diagnosis == "brain_abscess":
        radius = rng.uniform(7.0, 15.0)
        target = rng.uniform(45.0, 60.0)  # enhancing rim
        centre = _random_brain_point(rng, head_center, semi_axes, (0.2, 0.6))
    else:
        raise ValueError(
            f"unknown diagnosis {diagnosis!r}: lesion models exist for healthy, ischemic_stroke, "
            "intracerebral_hemorrhage, brain_abscess"
        )
    lesion_axes = radius * axes_ratio
    lesion_radius = _ellipsoid_radius(points, centre, lesion_axes)
    weight = _soft_inside(lesion_radius) * brain
    if diagnosis == "brain_abscess":
        oedema = _soft_inside(lesion_radius / 1.7) * brain
        volume = volume * (1 - oedema) + rng.uniform(18.0, 24.0) * oedema
        rim_width = rng.uniform(0.25, 0.4)
        core = _soft_inside(lesion_radius / (1.0 - rim_width), edge=0.08) * brain
        rim = np.clip(weight - core, 0.0, 1.0)
        volume = volume * (1 - rim) + target * rim
        volume = volume * (1 - core) + rng.uniform(8.0, 16.0) * core
    else:
        volume = volume * (1 - weight) + target * weight
    mask[(lesion_radius < 1.0) & brain] = 1
    contrast = surrounding_contrast(volume, lesion_radius, brain, target)
    lesions.append(Lesion(diagnosis, tuple(centre.round(1)), round(radius, 1), round(target, 1), round(contrast, 1)))
    return volume, mask, lesions
