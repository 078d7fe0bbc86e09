"""Preprocess: the processed contract, stratified splits, no leakage, tokenizer on training notes only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from meddiff.data.brain import BRAIN_MASK_CHANNEL, IMAGE_CHANNELS
from meddiff.data.dataset import SPLITS, load_processed
from meddiff.data.preprocess import fit_tabular_scaler, tabular_frame
from meddiff.data.splits import assert_stratified, stratified_split
from meddiff.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

if TYPE_CHECKING:
    from tests.data.conftest import Pipeline


def test_output_validates_against_the_contract(pipeline: Pipeline) -> None:
    dataset = load_processed(pipeline.processed)
    arrays, meta = dataset.arrays, dataset.meta
    n = len(dataset)
    size = tuple(pipeline.params.preprocess.spatial_size)
    assert arrays["image"].shape == (n, len(IMAGE_CHANNELS), *size) and arrays["image"].dtype == np.float16
    assert meta["image_channels"] == list(IMAGE_CHANNELS)
    assert arrays["lesion_mask"].shape == (n, 1, *size) and arrays["lesion_mask"].dtype == np.uint8
    assert float(arrays["image"].min()) >= 0.0 and float(arrays["image"].max()) <= 1.0
    assert arrays["token_ids"].shape == (n, meta["max_note_tokens"]) and arrays["token_ids"].dtype == np.int32
    assert arrays["tabular"].dtype == np.float32 and not np.isnan(arrays["tabular"]).any()
    assert arrays["tabular_missing"].shape == arrays["tabular"].shape
    for key in ("class_names", "vocab_size", "max_note_tokens", "spatial_size", "tabular_features", "split_counts"):
        assert key in meta, key
    assert {"name", "unit", "mean", "std", "median"} <= set(meta["tabular_features"][0])
    assert sum(meta["split_counts"].values()) == n
    present = arrays["modality_present"]
    assert not arrays["image"][~present[:, 0]].any(), "no image -> zeros"
    assert not arrays["token_mask"][~present[:, 1]].any(), "no note -> all padding"
    with_note = arrays["token_ids"][present[:, 1]]
    assert (with_note[:, 0] == SPECIAL_TOKENS.index("[CLS]")).all()
    assert (arrays["token_ids"][~arrays["token_mask"]] == 0).all()
    assert arrays["lesion_mask"][arrays["has_lesion_mask"]].any()
    # lesion masks on the image grid, inside its brain mask
    assert not (arrays["lesion_mask"][:, 0].astype(bool) & (arrays["image"][:, BRAIN_MASK_CHANNEL] == 0)).any()
    contrast = arrays["lesion_contrast_hu"]
    assert contrast.dtype == np.float32 and contrast.shape == (n,)
    healthy = arrays["label"] == meta["class_names"].index("healthy")
    assert np.isnan(contrast[healthy]).all() and np.isfinite(contrast[~healthy & arrays["has_lesion_mask"]]).all()
    card = json.loads((pipeline.preprocess_report / "data_card.json").read_text())
    assert card["n_patients"] == n and (pipeline.preprocess_report / "data_card.md").is_file()


def test_splits_are_stratified_by_class_and_site(pipeline: Pipeline) -> None:
    dataset = load_processed(pipeline.processed)
    split, labels, sites = dataset.arrays["split"], dataset.arrays["label"], dataset.arrays["site"]
    for k in range(dataset.n_classes):
        assert set(split[labels == k]) == set(SPLITS), dataset.class_names[k]
    for site in set(sites):
        assert set(split[sites == site]) == set(SPLITS), site


def test_split_is_deterministic_and_near_the_fractions() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"label": rng.choice(["a", "b", "rare"], p=[0.6, 0.36, 0.04], size=400),
                          "site": rng.choice(["main", "minor"], p=[0.88, 0.12], size=400)})
    split = stratified_split(frame, 0.15, 0.2, seed=1)
    np.testing.assert_array_equal(split, stratified_split(frame, 0.15, 0.2, seed=1))
    assert_stratified(frame, split)
    assert abs((split == "test").mean() - 0.2) < 0.01 and abs((split == "val").mean() - 0.15) < 0.01
    tiny = pd.DataFrame({"label": ["a"] * 10 + ["rare"] * 3, "site": ["main"] * 9 + ["minor"] * 4})
    assert_stratified(tiny, stratified_split(tiny, 0.15, 0.2, seed=3))


def test_scaler_sees_the_training_split_only(pipeline: Pipeline) -> None:
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet").sort_values("patient_id").reset_index(drop=True)
    dataset = load_processed(pipeline.processed)
    assert list(dataset.arrays["patient_id"]) == list(manifest.patient_id)
    train = dataset.arrays["split"] == "train"
    labs = pipeline.params.dataset.feature_names
    raw = tabular_frame(manifest, labs)
    units = [f["unit"] for f in dataset.meta["tabular_features"]]
    scaler = fit_tabular_scaler(raw[train], units)
    np.testing.assert_allclose(scaler.mean, [f["mean"] for f in dataset.meta["tabular_features"]], rtol=1e-6)
    tampered = raw.copy()
    tampered.loc[~train, :] = tampered.loc[~train, :] * 100.0 + 1e4  # val/test values changed wildly
    again = fit_tabular_scaler(tampered[train], units)
    np.testing.assert_array_equal(again.mean, scaler.mean)
    np.testing.assert_array_equal(again.std, scaler.std)
    np.testing.assert_array_equal(again.median, scaler.median)
    features, missing = scaler.transform(raw.to_numpy(float))
    np.testing.assert_allclose(features, dataset.arrays["tabular"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(missing, dataset.arrays["tabular_missing"])


def test_tokenizer_is_fitted_on_training_notes_only(pipeline: Pipeline) -> None:
    tokenizer = load_tokenizer(pipeline.processed / "tokenizer.json")
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet").sort_values("patient_id").reset_index(drop=True)
    split = load_processed(pipeline.processed).arrays["split"]

    def words(notes: pd.Series) -> set[str]:
        found = set()
        for note in notes.dropna():
            normalised = tokenizer.normalizer.normalize_str(note)
            found |= {w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalised)}
        return found

    train_words = words(manifest.note[split == "train"])
    vocabulary = set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS)
    assert vocabulary <= train_words
    unseen = words(manifest.note[split != "train"]) - train_words
    if unseen:  # typos make held-out-only words likely; they must map to [UNK]
        word = sorted(unseen)[0]
        assert tokenizer.encode(word).ids[1] == SPECIAL_TOKENS.index("[UNK]")
    assert tokenizer.get_vocab_size() <= pipeline.params.preprocess.vocab_size


@pytest.mark.parametrize("key", ["val_fraction", "test_fraction"])
def test_split_fractions_are_validated(key: str) -> None:
    from meddiff.config import ParamsError, params_from_dict

    with pytest.raises(ParamsError, match=key):
        params_from_dict({"preprocess": {key: 0.6}})


def test_second_run_hits_the_monai_cache(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PersistentDataset keyed by file content: the second run loads every image, transforming none; a change
    of the transforms' code misses the cache."""
    from monai.transforms import Compose, Transform

    import meddiff.data.preprocess as preprocess

    calls = {"n": 0}
    original = preprocess.image_transforms

    class Count(Transform):  # a deterministic Transform: part of what PersistentDataset caches
        def __call__(self, data: dict) -> dict:
            calls["n"] += 1
            return data

    def counting(config, with_mask=True, modality="CT"):  # same signature as image_transforms
        return Compose([Count(), *original(config, with_mask=with_mask, modality=modality).transforms])

    monkeypatch.setattr(preprocess, "image_transforms", counting)
    cache = tmp_path / "cache"
    config = pipeline.params.preprocess.model_copy(update={"cache_dir": cache})
    params = pipeline.params.model_copy(update={"preprocess": config})
    preprocess.run_preprocess(params, pipeline.interim, tmp_path / "p1", tmp_path / "r1")
    n_images = int(pd.read_parquet(pipeline.interim / "manifest.parquet").has_image.sum())
    assert calls["n"] == n_images and len(list(cache.glob("*.pt"))) == n_images
    calls["n"] = 0
    # the second run also takes the first run's tokenizer as a pretrained one
    again = params.model_copy(update={"preprocess": config.model_copy(
        update={"pretrained_tokenizer": tmp_path / "p1" / "tokenizer.json"})})
    preprocess.run_preprocess(again, pipeline.interim, tmp_path / "p2", tmp_path / "r2")
    assert calls["n"] == 0, "cache miss on an unchanged input"
    first, second = load_processed(tmp_path / "p1"), load_processed(tmp_path / "p2")
    np.testing.assert_array_equal(first.arrays["image"], second.arrays["image"])
    np.testing.assert_array_equal(first.arrays["token_ids"], second.arrays["token_ids"])
    reference = load_processed(pipeline.processed)  # the uncached run gives the same tensors
    np.testing.assert_array_equal(first.arrays["image"], reference.arrays["image"])
    # changed transform code (same params): every image misses the cache instead of reusing the old output
    monkeypatch.setattr(preprocess, "_transform_code_digest", lambda: "edited transforms.py")
    preprocess.run_preprocess(again, pipeline.interim, tmp_path / "p3", tmp_path / "r3")
    assert calls["n"] == n_images and len(list(cache.glob("*.pt"))) == 2 * n_images


def test_a_pretrained_tokenizer_needs_the_special_tokens_first(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    from meddiff.data.tokenizer import load_pretrained_tokenizer

    bad = Tokenizer(models.WordLevel({"hello": 0, "[PAD]": 1, "[UNK]": 2, "[CLS]": 3, "[SEP]": 4}, unk_token="[UNK]"))
    bad.save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="special tokens must have ids"):
        load_pretrained_tokenizer(tmp_path / "bad.json", 16)
    with pytest.raises(FileNotFoundError):
        load_pretrained_tokenizer(tmp_path / "missing.json", 16)
