"""Figures of the report, as PNG bytes to embed in the page (the report is one self-contained file).

Per patient, axial, coronal and sagittal slices through one point (the lesion's centroid,
or the map's peak when there is no lesion), the image in grey, the attribution (scaled to its own
maximum, faint values left out) in colour, and the lesion mask's outline in cyan. The processed arrays
are (x, y, z) in RAS order: sagittal fixes x, coronal fixes y, axial fixes z.
"""

from __future__ import annotations

import base64
import io

import numpy as np

#: Attribution below this fraction of its maximum is not drawn (the anatomy stays visible).
OVERLAY_FLOOR = 0.15
#: The three planes: name, the array axis they fix.
PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))
#: Grey window of the image: percentiles of its nonzero voxels.
WINDOW_PERCENTILES = (1.0, 99.0)
FIGURE_DPI = 90


def slice_point(lesion: np.ndarray | None, attribution: np.ndarray) -> tuple[int, int, int]:
    """The (x, y, z) voxel the planes go through: the lesion's centroid, else the map's peak."""
    if lesion is not None and lesion.any():
        return tuple(round(float(c)) for c in np.argwhere(lesion).mean(axis=0))
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(attribution)), attribution.shape))


def _plane(volume: np.ndarray, axis: int, position: int) -> np.ndarray:
    """The slice of ``volume`` (x, y, z) at ``position`` along ``axis``, oriented for display (first
    remaining axis left → right, second bottom → top)."""
    return np.rot90(np.take(volume, position, axis=axis))


def plane_pngs(
    image: np.ndarray,
    attribution: np.ndarray,
    lesion: np.ndarray | None,
    spacing_mm: tuple[float, float, float] | None,
) -> dict[str, bytes]:
    """One PNG per plane (axial, coronal, sagittal) through :func:`slice_point` of ``image`` (x, y, z),
    ``attribution`` (x, y, z) and ``lesion`` (x, y, z, or None); ``spacing_mm`` sets the aspect ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    point = slice_point(lesion, attribution)
    spacing = spacing_mm or (1.0, 1.0, 1.0)
    tissue = image[image > 0]
    low, high = np.percentile(tissue, WINDOW_PERCENTILES) if tissue.size else (0.0, 1.0)
    peak = attribution.max()
    scaled = attribution / peak if peak > 0 else np.zeros_like(attribution)
    pngs = {}
    for name, fixed in PLANES:
        shown = [a for a in range(3) if a != fixed]
        aspect = spacing[shown[1]] / spacing[shown[0]]
        figure, axis = plt.subplots(figsize=(3.2, 3.4), dpi=FIGURE_DPI)
        axis.imshow(_plane(image, fixed, point[fixed]), cmap="gray", vmin=low, vmax=max(high, low + 1e-6),
                    aspect=aspect, interpolation="nearest")
        overlay = _plane(scaled, fixed, point[fixed])
        axis.imshow(np.ma.masked_less(overlay, OVERLAY_FLOOR), cmap="inferno", vmin=0, vmax=1, alpha=0.6,
                    aspect=aspect, interpolation="nearest")
        if lesion is not None:
            outline = _plane(lesion.astype(float), fixed, point[fixed])
            if outline.any():
                axis.contour(outline, levels=[0.5], colors="cyan", linewidths=1.2)
        axis.set_title(f"{name} ({'xyz'[fixed]} = {point[fixed]})", fontsize=9)
        axis.axis("off")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        pngs[name] = buffer.getvalue()
    return pngs


def data_uri(png: bytes) -> str:
    """``data:`` URI of PNG bytes (an image that travels inside the HTML)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
