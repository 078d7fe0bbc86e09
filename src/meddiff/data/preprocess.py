"""``meddiff preprocess``: interim manifest + NIfTI -> the processed-data contract (:mod:`.dataset`).

1. patient-level stratified splits (label × site, :mod:`.splits`);
2. images through MONAI dictionary transforms (:mod:`.transforms`; CT skull-stripped, calibrated and
   split into density channels (:mod:`.brain`), MR by per-scan body percentiles, after the manifest's
   ``image_modality``), cropped around the brain, (N, C, D, H, W) with C = ``len(IMAGE_CHANNELS)``;
   the lesion mask resampled and cropped the same way, cached by a MONAI
   ``PersistentDataset`` in ``preprocess.cache_dir`` keyed by the files' content and the transform
   parameters (a later run loads instead of recomputing); no image → zeros, absent flag;
3. note tokenizer fitted on the training split's notes only (:mod:`.tokenizer`), or a pretrained one
   from ``preprocess.pretrained_tokenizer``;
4. tabular features (canonical labs, age, sex): training-split median imputation and training-split
   mean/std standardisation, with ``tabular_missing`` flags;
5. ``arrays.npz`` + ``meta.json`` via :func:`meddiff.data.dataset.save_processed`, ``tokenizer.json``,
   and a data card in ``report_dir``.

Apply mode (:func:`run_preprocess_apply`; new patients, an external drop) runs steps 2-5 on every patient
with the artefacts saved with a model (``<model>/preprocessing/``) and fits nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from meddiff import MODALITIES
from meddiff.config import Params
from meddiff.data.brain import IMAGE_CHANNELS
from meddiff.data.dataset import (
    APPLY_SPLIT,
    META_FILE,
    PREPROCESSING_DIR,
    PREPROCESSING_FILES,
    SPLITS,
    TOKENIZER_FILE,
    UNKNOWN_LABEL,
    save_processed,
)
from meddiff.data.ingest import MANIFEST_FILE
from meddiff.data.ingest.manifest import LESION_CONTRAST
from meddiff.data.splits import assert_stratified, stratified_split
from meddiff.data.tokenizer import (
    SPECIAL_TOKENS,
    encode_notes,
    load_pretrained_tokenizer,
    load_tokenizer,
    train_note_tokenizer,
)
from meddiff.data.transforms import CT, IMAGE_KEY, MASK_KEY, image_transforms
from meddiff.io import atomic_dir, atomic_file, read_json, write_json

LOG = logging.getLogger(__name__)

#: non-lab tabular features and their UCUM units
DEMOGRAPHIC_FEATURES: dict[str, str] = {"age": "a", "sex_male": "{indicator}"}


@dataclass
class TabularScaler:
    """Training-split statistics per feature: median (imputation), mean and std (standardisation)."""

    names: list[str]
    units: list[str]
    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def transform(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Impute with the median, standardise; return ``(features float32, missing bool)``."""
        missing = np.isnan(raw)
        filled = np.where(missing, self.median, raw)
        return ((filled - self.mean) / self.std).astype(np.float32), missing

    @classmethod
    def from_description(cls, features: list[dict[str, Any]]) -> TabularScaler:
        """The scaler :meth:`describe` wrote (``meta.json`` ``tabular_features``); exact (JSON keeps float64)."""
        return cls([str(f["name"]) for f in features], [str(f["unit"]) for f in features],
                   *(np.array([float(f[key]) for f in features]) for key in ("median", "mean", "std")))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "unit": u, "mean": float(m), "std": float(s), "median": float(md)}
            for n, u, m, s, md in zip(self.names, self.units, self.mean, self.std, self.median, strict=True)
        ]


@dataclass
class PreprocessResult:
    """Summary of ``meddiff preprocess``."""

    processed_dir: Path
    n_patients: int
    split_counts: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0
    n_tabular: int = 0
    seconds: float = 0.0


def tabular_frame(manifest: pd.DataFrame, labs: list[str]) -> pd.DataFrame:
    """Raw tabular features (NaN where missing): canonical labs, age, sex as a male indicator."""
    frame = manifest[labs].astype(float).copy()
    frame["age"] = manifest["age"].astype(float)
    sex = manifest["sex"].map({"male": 1.0, "female": 0.0})
    frame["sex_male"] = sex.astype(float)
    return frame


def fit_tabular_scaler(train: pd.DataFrame, units: list[str]) -> TabularScaler:
    """Fit on the training rows only (NaN-aware); a constant feature gets std 1."""
    values = train.to_numpy(dtype=float)
    observed = ~np.isnan(values)
    if not observed.any(axis=0).all():
        empty = [name for name, ok in zip(train.columns, observed.any(axis=0), strict=True) if not ok]
        raise ValueError(f"tabular features {empty} have no value in the training split")
    median = np.nanmedian(values, axis=0)
    mean = np.nanmean(values, axis=0)
    std = np.nanstd(values, axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return TabularScaler(list(train.columns), units, median, mean, std)


CACHE_KEY = "cache_key"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _transform_digest(params: Params, with_mask: bool, modality: str = CT) -> str:
    """What the cached output depends on besides the input files: transform params, modality, MONAI version."""
    import monai

    payload: dict[str, Any] = {**_image_params(params), "with_mask": with_mask, "modality": modality,
                               "monai": monai.__version__, "transforms": 3}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


#: the preprocess params the image arrays depend on (cache key and ``meta.json``)
IMAGE_PARAMS: tuple[str, ...] = (
    "spatial_size", "pixdim_mm", "hu_window", "skull_hu", "reference_brain_hu", "hyperdense_ramp_hu",
    "hyperdense_sigma_voxels", "hypodense_ramp_hu", "hypodense_floor_hu", "csf_ramp_hu", "density_sigma_voxels",
)


def _image_params(params: Params) -> dict[str, Any]:
    dumped = params.preprocess.model_dump(mode="json")
    return {name: dumped[name] for name in IMAGE_PARAMS}


def _cache_hash(item: dict[str, Any]) -> bytes:
    return item[CACHE_KEY].encode()


def _images(manifest: pd.DataFrame, interim_dir: Path, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    config = params.preprocess
    n = len(manifest)
    images = np.zeros((n, len(IMAGE_CHANNELS), *config.spatial_size), dtype=np.float16)
    masks = np.zeros((n, 1, *config.spatial_size), dtype=np.uint8)
    has_mask = np.zeros(n, dtype=bool)
    modalities = (manifest["image_modality"] if "image_modality" in manifest.columns
                  else pd.Series([CT] * n, index=manifest.index))
    groups: dict[tuple[bool, str], tuple[list[int], list[dict[str, Any]]]] = {}
    rows_of = manifest[["image_path", "mask_path"]].assign(modality=modalities.to_numpy())
    for i, (image_path, mask_path, modality) in enumerate(rows_of.itertuples(index=False)):
        if not isinstance(image_path, str):
            continue
        with_mask = isinstance(mask_path, str)
        modality = modality if isinstance(modality, str) and modality else CT
        item = {IMAGE_KEY: str(interim_dir / image_path)}
        if with_mask:
            item[MASK_KEY] = str(interim_dir / mask_path)
        if config.cache_dir is not None:  # content, not path: interim files are rewritten by every ingest
            parts = [_file_digest(Path(item[k])) for k in (IMAGE_KEY, MASK_KEY) if k in item]
            item[CACHE_KEY] = hashlib.sha256("|".join([*parts, _transform_digest(params, with_mask, modality)]
                                                      ).encode()).hexdigest()
        rows, items = groups.setdefault((with_mask, modality), ([], []))
        rows.append(i)
        items.append(item)
    progress = tqdm(total=sum(len(rows) for rows, _ in groups.values()), desc="preprocess images",
                    disable=not sys.stderr.isatty())
    for (with_mask, modality), (rows, items) in sorted(groups.items()):
        transform = image_transforms(config, with_mask=with_mask, modality=modality)
        from monai.data import Dataset, PersistentDataset

        if config.cache_dir is not None:
            Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
            dataset: Any = PersistentDataset(items, transform, cache_dir=config.cache_dir, hash_func=_cache_hash)
        else:
            dataset = Dataset(items, transform)  # lazy: one item transformed per index
        for i, index in enumerate(rows):
            out = dataset[i]
            images[index] = np.asarray(out[IMAGE_KEY], dtype=np.float16)
            if with_mask:
                masks[index] = np.asarray(out[MASK_KEY]).astype(np.uint8)
                has_mask[index] = True
            progress.update()
    progress.close()
    return images, masks, has_mask


def _data_card(manifest: pd.DataFrame, split: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    frame = manifest.assign(split=split)

    def counts(column: str) -> dict[str, int]:
        return {str(k): int(v) for k, v in frame[column].value_counts().sort_index().items()}

    return {
        "n_patients": len(frame),
        "classes": class_names,
        "per_class": {c: int((frame.label == c).sum()) for c in class_names},
        "per_site": counts("site"),
        "per_split": {s: int((frame.split == s).sum()) for s in SPLITS},
        "class_by_split": {s: {c: int(((frame.split == s) & (frame.label == c)).sum()) for c in class_names}
                           for s in SPLITS},
        "site_by_split": {s: {str(site): int(((frame.split == s) & (frame.site == site)).sum())
                              for site in sorted(frame.site.unique())} for s in SPLITS},
        "modality_availability": {
            "image": int(frame.has_image.sum()), "text": int(frame.has_note.sum()),
            "tabular": int(frame.has_labs.sum()),
            "all_three": int((frame.has_image & frame.has_note & frame.has_labs).sum()),
        },
        "lesion_masks": int(frame.mask_path.notna().sum()),
    }


def _data_card_markdown(card: dict[str, Any]) -> str:
    lines = ["# Data card: processed meddiff cohort", "", f"Patients: {card['n_patients']}", "",
             "| class | " + " | ".join(SPLITS) + " | total |", "|---|" + "---|" * (len(SPLITS) + 1)]
    for name in card["classes"]:
        per = [str(card["class_by_split"][s][name]) for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(per) + f" | {card['per_class'][name]} |")
    lines += ["", "| site | " + " | ".join(SPLITS) + " | total |", "|---|" + "---|" * (len(SPLITS) + 1)]
    for site, total in card["per_site"].items():
        per = [str(card["site_by_split"][s].get(site, 0)) for s in SPLITS]
        lines.append(f"| {site} | " + " | ".join(per) + f" | {total} |")
    lines += ["", "Modality availability: " + ", ".join(f"{k} {v}" for k, v in card["modality_availability"].items()),
              f"Lesion masks: {card['lesion_masks']}", ""]
    return "\n".join(lines)


def _read_manifest(interim_dir: Path) -> pd.DataFrame:
    manifest_path = Path(interim_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found; run `meddiff ingest` first")
    manifest = pd.read_parquet(manifest_path).sort_values("patient_id").reset_index(drop=True)
    if manifest.empty:
        raise ValueError(f"{manifest_path}: no patients to preprocess")
    return manifest


def _label_indices(manifest: pd.DataFrame, class_names: list[str], source: Path, allow_unknown: bool) -> np.ndarray:
    """(N,) int64 class indices; a missing label is :data:`UNKNOWN_LABEL` when ``allow_unknown`` (apply mode).

    Raises:
        ValueError: a label outside ``class_names``, or a missing one in fit mode.
    """
    labels = manifest["label"]
    known = labels.notna() & (labels.astype(str) != "")
    if not allow_unknown and not known.all():
        raise ValueError(f"{source}: {int((~known).sum())} patients have no label; fitting needs labelled patients")
    unknown = sorted(set(labels[known]) - set(class_names))
    if unknown:
        raise ValueError(f"{source}: labels {unknown} are not in cohort.classes {class_names}")
    return np.array([class_names.index(label) if ok else UNKNOWN_LABEL
                     for label, ok in zip(labels, known, strict=True)], dtype=np.int64)


def _patient_arrays(
    manifest: pd.DataFrame, interim_dir: Path, params: Params, tokenizer: Any, scaler: TabularScaler,
    labels: np.ndarray, split: np.ndarray, started: float,
) -> dict[str, np.ndarray]:
    """The processed arrays (:data:`meddiff.data.dataset.ARRAY_SPEC`) of ``manifest`` with *given* (already
    fitted) tokenizer and scaler; ``params.preprocess`` sets the image transforms. Shared by fit and apply mode."""
    images, masks, has_mask = _images(manifest, interim_dir, params)
    LOG.info("preprocess: %d images through MONAI (%.1f s)", int(manifest.has_image.sum()),
             time.perf_counter() - started)
    notes = _notes(manifest)
    token_ids, token_mask = encode_notes(tokenizer, notes, params.preprocess.max_note_tokens)
    labs = scaler.names[: len(scaler.names) - len(DEMOGRAPHIC_FEATURES)]
    tabular, tabular_missing = scaler.transform(tabular_frame(manifest, labs).to_numpy(dtype=float))
    modality_present = np.stack([
        manifest["has_image"].to_numpy(bool),
        np.array([n is not None for n in notes]),
        manifest["has_labs"].to_numpy(bool),
    ], axis=1)
    return {
        "patient_id": manifest["patient_id"].to_numpy(str),
        "label": labels,
        "split": split.astype(str),
        "site": manifest["site"].to_numpy(str),
        "image": images,
        "lesion_mask": masks,
        "has_lesion_mask": has_mask,
        LESION_CONTRAST: (manifest[LESION_CONTRAST].to_numpy(dtype=np.float32) if LESION_CONTRAST in manifest
                          else np.full(len(manifest), np.nan, dtype=np.float32)),
        "token_ids": token_ids,
        "token_mask": token_mask,
        "tabular": tabular,
        "tabular_missing": tabular_missing,
        "modality_present": modality_present,
    }


def _notes(manifest: pd.DataFrame) -> list[str | None]:
    return [n if isinstance(n, str) and n else None for n in manifest["note"]]


def run_preprocess(params: Params, interim_dir: Path, processed_dir: Path, report_dir: Path) -> PreprocessResult:
    """Build the processed dataset of the whole cohort; fit everything on the training split only."""
    started = time.perf_counter()
    interim_dir = Path(interim_dir)
    config = params.preprocess
    class_names = list(params.cohort.classes)
    manifest = _read_manifest(interim_dir)
    labels = _label_indices(manifest, class_names, interim_dir / MANIFEST_FILE, allow_unknown=False)

    split = stratified_split(manifest, config.val_fraction, config.test_fraction, params.seed)
    assert_stratified(manifest, split)
    train = split == "train"

    train_notes = [n for n, t in zip(_notes(manifest), train, strict=True) if t and n]
    if config.pretrained_tokenizer is not None:
        tokenizer = load_pretrained_tokenizer(config.pretrained_tokenizer, config.max_note_tokens)
    else:
        tokenizer = train_note_tokenizer(train_notes, config.vocab_size, config.max_note_tokens)

    labs = list(params.ingest.lab_units)
    units = [params.ingest.lab_units[lab] for lab in labs] + list(DEMOGRAPHIC_FEATURES.values())
    scaler = fit_tabular_scaler(tabular_frame(manifest, labs)[train], units)
    arrays = _patient_arrays(manifest, interim_dir, params, tokenizer, scaler, labels, split, started)

    split_counts = {s: int((split == s).sum()) for s in SPLITS}
    meta = {
        "class_names": class_names,
        "modalities": list(MODALITIES),
        "vocab_size": int(tokenizer.get_vocab_size()),
        "special_tokens": {token: int(tokenizer.token_to_id(token)) for token in SPECIAL_TOKENS},
        "tokenizer": str(config.pretrained_tokenizer) if config.pretrained_tokenizer else "fitted on training notes",
        "max_note_tokens": config.max_note_tokens,
        **_image_params(params),
        "image_channels": list(IMAGE_CHANNELS),
        "tabular_features": scaler.describe(),
        "split_counts": split_counts,
        "n_patients": len(manifest),
        "sites": sorted(manifest["site"].unique().tolist()),
        "seed": params.seed,
        "params_digest": params.digest(),
    }
    card = _data_card(manifest, split, class_names)
    with atomic_dir(processed_dir) as staging, atomic_dir(report_dir) as report:
        save_processed(staging, arrays, meta)
        with atomic_file(staging / TOKENIZER_FILE) as handle:
            handle.write(tokenizer.to_str(pretty=True))
        write_json(report / "data_card.json", card)
        (report / "data_card.md").write_text(_data_card_markdown(card), encoding="utf-8")
    seconds = time.perf_counter() - started
    LOG.info("preprocess: %d patients, splits %s, vocab %d (%.1f s)", len(manifest), split_counts,
             meta["vocab_size"], seconds)
    return PreprocessResult(
        processed_dir=Path(processed_dir), n_patients=len(manifest), split_counts=split_counts,
        vocab_size=meta["vocab_size"], n_tabular=len(scaler.names), seconds=round(seconds, 2),
    )


def params_for_artefacts(params: Params, meta: dict[str, Any]) -> Params:
    """``params`` with the image parameters and note length the artefacts (``meta.json``) were fitted with,
    so apply mode transforms new data exactly as the training data were, whatever ``params.yaml`` says now.

    Raises:
        ValueError: the artefacts were made with other image channels than this code produces.
    """
    if list(meta.get("image_channels", IMAGE_CHANNELS)) != list(IMAGE_CHANNELS):
        raise ValueError(f"preprocessing artefacts have image channels {meta['image_channels']}, this code "
                         f"produces {list(IMAGE_CHANNELS)}: the model needs the meddiff version it was trained with")
    fitted = {name: meta[name] for name in (*IMAGE_PARAMS, "max_note_tokens") if name in meta}
    return Params.model_validate({**params.to_dict(), "preprocess": {**params.preprocess.model_dump(mode="json"),
                                                                      **fitted}})


def run_preprocess_apply(
    params: Params, interim_dir: Path, artefacts_dir: Path, processed_dir: Path, report_dir: Path | None = None,
) -> PreprocessResult:
    """Apply mode: the processed arrays of *every* patient of ``interim_dir`` (split :data:`APPLY_SPLIT`),
    made with the preprocessing artefacts in ``artefacts_dir`` (``meta.json`` + ``tokenizer.json``, as saved
    in ``<model>/preprocessing/``): the same tokenizer, tabular medians/means/stds, class names, image
    parameters and note length. Nothing is fitted or written into ``artefacts_dir``.

    A patient without a diagnosis gets :data:`UNKNOWN_LABEL`; a lab the model uses but the manifest lacks
    is missing for every patient (imputed with the training median, flagged in ``tabular_missing``).
    ``processed_dir`` holds ``arrays.npz``, ``meta.json`` (the artefacts' meta with this drop's counts) and
    ``tokenizer.json``; ``report_dir``, if given, the data card. Both are written atomically.

    Raises:
        FileNotFoundError: no manifest, or an artefact file is missing.
        ValueError: a label outside the artefacts' classes; mismatching image channels.
    """
    started = time.perf_counter()
    interim_dir, artefacts_dir = Path(interim_dir), Path(artefacts_dir)
    missing = [name for name in PREPROCESSING_FILES if not (artefacts_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{artefacts_dir}: preprocessing artefacts {missing} not found (a model folder's "
                                f"{PREPROCESSING_DIR}/ is written by `meddiff train`)")
    fitted_meta = read_json(artefacts_dir / META_FILE)
    applied = params_for_artefacts(params, fitted_meta)
    class_names = list(fitted_meta["class_names"])
    tokenizer = load_tokenizer(artefacts_dir / TOKENIZER_FILE)
    scaler = TabularScaler.from_description(fitted_meta["tabular_features"])
    manifest = _read_manifest(interim_dir)
    labels = _label_indices(manifest, class_names, interim_dir / MANIFEST_FILE, allow_unknown=True)
    labs = scaler.names[: len(scaler.names) - len(DEMOGRAPHIC_FEATURES)]
    manifest = manifest.assign(**{lab: np.nan for lab in labs if lab not in manifest.columns})
    split = np.full(len(manifest), APPLY_SPLIT)
    arrays = _patient_arrays(manifest, interim_dir, applied, tokenizer, scaler, labels, split, started)
    meta = {**fitted_meta, "split_counts": {APPLY_SPLIT: len(manifest)}, "n_patients": len(manifest),
            "sites": sorted(manifest["site"].unique().tolist()), "mode": "apply",
            "n_labelled": int((labels != UNKNOWN_LABEL).sum())}
    with atomic_dir(processed_dir) as staging:
        save_processed(staging, arrays, meta)
        shutil.copyfile(artefacts_dir / TOKENIZER_FILE, staging / TOKENIZER_FILE)
    if report_dir is not None:
        card = {"n_patients": len(manifest), "mode": "apply", "artefacts": str(artefacts_dir),
                "per_site": {str(k): int(v) for k, v in manifest["site"].value_counts().sort_index().items()},
                "n_labelled": meta["n_labelled"],
                "modality_availability": {name: int(arrays["modality_present"][:, i].sum())
                                          for i, name in enumerate(MODALITIES)}}
        with atomic_dir(report_dir) as report:
            write_json(report / "data_card.json", card)
    seconds = time.perf_counter() - started
    LOG.info("preprocess (apply): %d patients with the artefacts of %s (%.1f s)", len(manifest), artefacts_dir,
             seconds)
    return PreprocessResult(processed_dir=Path(processed_dir), n_patients=len(manifest),
                            split_counts={APPLY_SPLIT: len(manifest)}, vocab_size=int(fitted_meta["vocab_size"]),
                            n_tabular=len(scaler.names), seconds=round(seconds, 2))
