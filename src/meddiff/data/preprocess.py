"""``meddiff preprocess``: interim manifest + NIfTI -> the processed-data contract (:mod:`.dataset`).

1. patient-level stratified splits (label × site, :mod:`.splits`);
2. images through MONAI dictionary transforms (:mod:`.transforms`; CT skull-stripped, calibrated and
   split into density channels (:mod:`.brain`), MR by per-scan body percentiles, after the manifest's
   ``image_modality``), cropped around the brain, (N, C, D, H, W) with C = ``len(IMAGE_CHANNELS)``;
   the lesion mask resampled and cropped the same way, cached by a MONAI
   ``PersistentDataset`` in ``preprocess.cache_dir`` keyed by the files' content, the transform
   parameters and the transforms' source (a later run loads instead of recomputing); no image → zeros, absent flag;
3. note tokenizer fitted on the training split's notes only (:mod:`.tokenizer`), or a pretrained one
   from ``preprocess.pretrained_tokenizer``;
4. tabular features (canonical labs, age, sex): training-split median imputation and training-split
   mean/std standardisation, with ``tabular_missing`` flags;
5. the processed layout of :mod:`.dataset` (per-patient ``arrays/*.npy``, the volumes per shard under
   ``shards/``, ``meta.json`` with the storage index) via :func:`meddiff.data.dataset.write_processed`,
   ``tokenizer.json``, and a data card in ``report_dir``.

The volumes are written one patient at a time (:class:`meddiff.data.dataset.RowWriter`), so memory does not
grow with the cohort. Sharded (issue 14): ``preprocess --shard i/n`` runs the images of one shard
(:func:`run_preprocess_shard`, patients by :func:`meddiff.data.ingest.shard.shard_of` of the manifest's
pseudonymised ``patient_id``: the rule ``ingest --shard`` applies to raw ids),
``preprocess --merge <shard folders>`` fits splits, tokenizer and scaler on the whole manifest as above and
links the shards' volumes in (:func:`merge_image_shards`): the same arrays as one unsharded run.

Apply mode (:func:`run_preprocess_apply`; new patients, an external drop) runs steps 2-5 on every patient
with the artefacts saved with a model (``<model>/preprocessing/``) and fits nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
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
    ROWS_FILE,
    SHARDED_ARRAYS,
    SPLITS,
    STORAGE_KEY,
    TOKENIZER_FILE,
    UNKNOWN_LABEL,
    RowWriter,
    save_array,
    shard_folder,
    write_processed,
)
from meddiff.data.ingest import MANIFEST_FILE
from meddiff.data.ingest.manifest import LESION_CONTRAST
from meddiff.data.ingest.shard import Shard
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
IMAGE_ARRAY, MASK_ARRAY = SHARDED_ARRAYS  # the volumes, written per shard

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


#: the modules whose code makes the cached image arrays: a change to them must miss the cache, not reuse an
#: entry the old code wrote (same params, other output)
TRANSFORM_MODULES: tuple[str, ...] = ("transforms.py", "brain.py")


@functools.cache
def _transform_code_digest() -> str:
    """SHA-256 of the source of :data:`TRANSFORM_MODULES` (this package's files)."""
    digest = hashlib.sha256()
    for name in TRANSFORM_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def _transform_digest(params: Params, with_mask: bool, modality: str = CT) -> str:
    """What the cached output depends on besides the input files: transform params, modality, MONAI version
    and the transforms' source code."""
    import monai

    payload: dict[str, Any] = {**_image_params(params), "with_mask": with_mask, "modality": modality,
                               "monai": monai.__version__, "transform_code": _transform_code_digest()}
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


def _image_shard(manifest: pd.DataFrame, interim_dir: Path, params: Params, shard_dir: Path) -> np.ndarray:
    """Every image (and lesion mask) of ``manifest`` through the transforms, written row by row into
    ``shard_dir/image.npy`` (n, C, D, H, W) float16 and ``lesion_mask.npy`` (n, 1, D, H, W) uint8 in manifest
    order (zeros without an image or mask), so memory holds one patient at a time; returns ``has_lesion_mask``
    (n,) bool."""
    config = params.preprocess
    n = len(manifest)
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
    size = tuple(config.spatial_size)
    with (RowWriter(shard_dir / f"{IMAGE_ARRAY}.npy", n, (len(IMAGE_CHANNELS), *size), np.float16) as images,
          RowWriter(shard_dir / f"{MASK_ARRAY}.npy", n, (1, *size), np.uint8) as masks):
        for (with_mask, modality), (rows, items) in sorted(groups.items()):
            transform = image_transforms(config, with_mask=with_mask, modality=modality)
            from monai.data import Dataset, PersistentDataset

            if config.cache_dir is not None:
                Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
                dataset: Any = PersistentDataset(items, transform, cache_dir=config.cache_dir,
                                                 hash_func=_cache_hash)
            else:
                dataset = Dataset(items, transform)  # lazy: one item transformed per index
            for i, index in enumerate(rows):
                out = dataset[i]
                images.write(index, np.asarray(out[IMAGE_KEY], dtype=np.float16))
                if with_mask:
                    masks.write(index, np.asarray(out[MASK_KEY]).astype(np.uint8))
                    has_mask[index] = True
                progress.update()
    progress.close()
    return has_mask


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
        raise ValueError(f"{source}: labels {unknown} are not in dataset.classes {class_names}")
    return np.array([class_names.index(label) if ok else UNKNOWN_LABEL
                     for label, ok in zip(labels, known, strict=True)], dtype=np.int64)


def _patient_arrays(
    manifest: pd.DataFrame, tokenizer: Any, scaler: TabularScaler, labels: np.ndarray, split: np.ndarray,
    max_note_tokens: int, has_lesion_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """The per-patient arrays of :data:`meddiff.data.dataset.ARRAY_SPEC` other than the volumes (written per
    shard by :func:`_image_shard`), with *given* (already fitted) tokenizer and scaler. Shared by fit and apply
    mode."""
    notes = _notes(manifest)
    token_ids, token_mask = encode_notes(tokenizer, notes, max_note_tokens)
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
        "has_lesion_mask": has_lesion_mask,
        LESION_CONTRAST: (manifest[LESION_CONTRAST].to_numpy(dtype=np.float32) if LESION_CONTRAST in manifest
                          else np.full(len(manifest), np.nan, dtype=np.float32)),
        "token_ids": token_ids,
        "token_mask": token_mask,
        "tabular": tabular,
        "tabular_missing": tabular_missing,
        "modality_present": modality_present,
    }


def _whole_shard(manifest: pd.DataFrame, interim_dir: Path, params: Params, staging: Path, started: float,
                 ) -> tuple[list[str], np.ndarray]:
    """The volumes of every patient as the one shard of ``staging``: (shard folders, has_lesion_mask)."""
    shard = shard_folder(staging, _shard_name(Shard(0, 1)))
    has_mask = _image_shard(manifest, interim_dir, params, shard)
    save_array(shard / ROWS_FILE, np.arange(len(manifest), dtype=np.int64))
    LOG.info("preprocess: %d images through MONAI (%.1f s)", int(manifest.has_image.sum()),
             time.perf_counter() - started)
    return [shard.relative_to(staging).as_posix()], has_mask


def _notes(manifest: pd.DataFrame) -> list[str | None]:
    return [n if isinstance(n, str) and n else None for n in manifest["note"]]


def run_preprocess(
    params: Params, interim_dir: Path, processed_dir: Path, report_dir: Path, shard: str | Shard | None = None,
    merge: Sequence[Path] = (),
) -> PreprocessResult:
    """Build the processed dataset of the whole cohort; fit everything on the training split only.

    Args:
        shard: ``"i/n"``: only run the images of shard ``i`` of ``n`` (:func:`meddiff.data.ingest.shard.shard_of`
            of the manifest's ``patient_id``) into ``processed_dir`` (:func:`run_preprocess_shard`); ``report_dir`` is
            not written.
        merge: folders written with ``shard`` (every shard ``0..n-1`` once): their volumes become the processed
            set's instead of running the images here (:func:`merge_image_shards`). The result equals an
            unsharded run's, array for array.

    Raises:
        ValueError: both ``shard`` and ``merge``; see also :func:`merge_image_shards`.
    """
    if shard is not None and merge:
        raise ValueError("preprocess takes --shard (one shard's images) or --merge (the shards), not both")
    if shard is not None:
        return run_preprocess_shard(params, interim_dir, Shard.parse(shard) if isinstance(shard, str) else shard,
                                    processed_dir)
    started = time.perf_counter()
    interim_dir = Path(interim_dir)
    config = params.preprocess
    class_names = params.dataset.class_names
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

    labs = params.dataset.feature_names
    units = [params.dataset.feature_units[lab] for lab in labs] + list(DEMOGRAPHIC_FEATURES.values())
    scaler = fit_tabular_scaler(tabular_frame(manifest, labs)[train], units)

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
        if merge:
            shards, has_mask = merge_image_shards(params, manifest, [Path(m) for m in merge], staging)
        else:
            shards, has_mask = _whole_shard(manifest, interim_dir, params, staging, started)
        arrays = _patient_arrays(manifest, tokenizer, scaler, labels, split, config.max_note_tokens, has_mask)
        write_processed(staging, arrays, meta, shards)
        with atomic_file(staging / TOKENIZER_FILE) as handle:
            handle.write(tokenizer.to_str(pretty=True))
        write_json(report / "data_card.json", card)
        (report / "data_card.md").write_text(_data_card_markdown(card), encoding="utf-8")
    seconds = time.perf_counter() - started
    LOG.info("preprocess: %d patients, splits %s, vocab %d, %d image shard(s) (%.1f s)", len(manifest),
             split_counts, meta["vocab_size"], len(shards), seconds)
    return PreprocessResult(
        processed_dir=Path(processed_dir), n_patients=len(manifest), split_counts=split_counts,
        vocab_size=meta["vocab_size"], n_tabular=len(scaler.names), seconds=round(seconds, 2),
    )


#: in a folder written by ``preprocess --shard``: which shard, of how many patients, with which image params
SHARD_FILE = "shard.json"
#: in a shard folder: the ``patient_id`` (n_shard,) of each row, and whether it has a lesion mask
SHARD_PATIENTS_FILE = "patient_id.npy"
SHARD_HAS_MASK_FILE = "has_lesion_mask.npy"


def run_preprocess_shard(params: Params, interim_dir: Path, shard: Shard, shard_dir: Path) -> PreprocessResult:
    """``preprocess --shard i/n``: the volumes of the manifest's patients of ``shard`` (in ``patient_id``
    order), one patient at a time, into ``shard_dir`` (atomically): ``image.npy``, ``lesion_mask.npy``,
    :data:`SHARD_PATIENTS_FILE`, :data:`SHARD_HAS_MASK_FILE` and :data:`SHARD_FILE`. Fits nothing: splits,
    tokenizer and scaler need the whole cohort and are made by the merge (``preprocess --merge``).

    Raises:
        FileNotFoundError: no manifest.
    """
    started = time.perf_counter()
    interim_dir = Path(interim_dir)
    manifest = _read_manifest(interim_dir)
    mine = manifest[[shard.owns(pid) for pid in manifest["patient_id"]]].reset_index(drop=True)
    with atomic_dir(shard_dir) as staging:
        has_mask = _image_shard(mine, interim_dir, params, staging)
        save_array(staging / SHARD_PATIENTS_FILE, mine["patient_id"].to_numpy(str))
        save_array(staging / SHARD_HAS_MASK_FILE, has_mask)
        write_json(staging / SHARD_FILE, {"shard": f"{shard.index}/{shard.count}", "n_patients": len(mine),
                                          "image_params": _image_params(params),
                                          "image_channels": list(IMAGE_CHANNELS)})
    seconds = time.perf_counter() - started
    LOG.info("preprocess: shard %s, %d of %d patients (%.1f s)", shard.label, len(mine), len(manifest), seconds)
    return PreprocessResult(processed_dir=Path(shard_dir), n_patients=len(mine), seconds=round(seconds, 2))


def merge_image_shards(
    params: Params, manifest: pd.DataFrame, shard_dirs: list[Path], staging: Path,
) -> tuple[list[str], np.ndarray]:
    """Put the volumes of the ``shard_dirs`` (written by :func:`run_preprocess_shard`) under ``staging``'s
    ``shards/`` with each row's row in ``manifest`` (``rows.npy``); return (shard folders relative to
    ``staging``, has_lesion_mask (N,) bool in manifest order). The volume files are hard-linked (copied in
    blocks where the file system cannot link), never read into memory.

    Raises:
        FileNotFoundError: a folder without :data:`SHARD_FILE`.
        ValueError: the shards are not each of ``0..n-1`` exactly once, were made with other image parameters,
            or their patients are not exactly the manifest's.
    """
    infos = []
    for folder in shard_dirs:
        if not (folder / SHARD_FILE).is_file():
            raise FileNotFoundError(f"{folder / SHARD_FILE}: not found; write shards with `meddiff preprocess "
                                    f"--shard i/n --processed-dir {folder}`")
        infos.append((Shard.parse(read_json(folder / SHARD_FILE)["shard"]), folder))
    counts = {shard.count for shard, _ in infos}
    found = sorted(shard.index for shard, _ in infos)
    if len(counts) != 1 or found != list(range(counts.pop())):
        raise ValueError(f"merge needs shards 0..n-1 of one n exactly once, got {[s.label for s, _ in infos]}")
    position = pd.Series(np.arange(len(manifest)), index=manifest["patient_id"].to_numpy(str))
    has_mask = np.zeros(len(manifest), dtype=bool)
    seen = np.zeros(len(manifest), dtype=bool)
    shards = []
    for shard, folder in sorted(infos, key=lambda info: info[0].index):
        recorded = read_json(folder / SHARD_FILE)
        if recorded["image_params"] != _image_params(params) or recorded["image_channels"] != list(IMAGE_CHANNELS):
            raise ValueError(f"{folder}: shard {shard.label} was made with image parameters "
                             f"{recorded['image_params']}, this merge uses {_image_params(params)}")
        patients = np.load(folder / SHARD_PATIENTS_FILE, allow_pickle=False)
        unknown = sorted(set(patients.tolist()) - set(position.index))
        if unknown or any(not shard.owns(pid) for pid in patients):
            raise ValueError(f"{folder}: shard {shard.label} holds patients not of this manifest's shard "
                             f"(e.g. {(unknown or patients.tolist())[:3]}); preprocess the shards from this interim")
        rows = position.loc[patients].to_numpy(np.int64)
        seen[rows] = True
        has_mask[rows] = np.load(folder / SHARD_HAS_MASK_FILE, allow_pickle=False)
        target = shard_folder(staging, _shard_name(shard))
        target.mkdir(parents=True)
        for name in SHARDED_ARRAYS:
            _link_or_copy(folder / f"{name}.npy", target / f"{name}.npy")
        save_array(target / ROWS_FILE, rows)
        shards.append(target.relative_to(staging).as_posix())
    if not seen.all():
        missing = manifest["patient_id"][~seen].tolist()
        raise ValueError(f"{len(missing)} manifest patients are in no shard (e.g. {missing[:3]}); the shards were "
                         f"made from another interim")
    return shards, has_mask


def _shard_name(shard: Shard) -> str:
    """The shard's folder under ``shards/``, sorting in shard order: ``00002-of-00004``."""
    return f"{shard.index:05d}-of-{shard.count:05d}"


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


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
    ``processed_dir`` holds the processed arrays, ``meta.json`` (the artefacts' meta with this drop's counts) and
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
    meta = {**fitted_meta, "split_counts": {APPLY_SPLIT: len(manifest)}, "n_patients": len(manifest),
            "sites": sorted(manifest["site"].unique().tolist()), "mode": "apply",
            "n_labelled": int((labels != UNKNOWN_LABEL).sum())}
    with atomic_dir(processed_dir) as staging:
        shards, has_mask = _whole_shard(manifest, interim_dir, applied, staging, started)
        arrays = _patient_arrays(manifest, tokenizer, scaler, labels, split, applied.preprocess.max_note_tokens,
                                 has_mask)
        write_processed(staging, arrays, {k: v for k, v in meta.items() if k != STORAGE_KEY}, shards)
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
