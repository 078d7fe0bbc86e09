"""The ``generate`` stage: class-conditional synthetic patients (proposal §3.6, task 2; issue 12).

For each class y, latents are sampled from the trained latent diffusion model with DDIM and
classifier-free guidance, then decoded to each modality (image decoder, tabular decoder in original
units, keyword decoder) and exported as a raw drop hospitals can load and ``meddiff ingest`` reads back:
a DICOM CT series, FHIR R4 NDJSON (Patient, Observation, Condition, DocumentReference with a templated
note) per patient (:mod:`.export`), with a data card (:mod:`.data_card`).

Quality is measured, not assumed:

* ``class_agreement``: how often the model's own classifier head (trained on real patients only)
  assigns the conditioning class to a sampled latent (conditional fidelity), next to
  ``class_agreement_real_per_class``: the same head's recall on real test patients, the agreement a
  perfect generator of that class's real latents would get;
* ``frechet_distance`` between synthetic and real test latents (the FID formula of Heusel et al.
  2017 on fused latents, :mod:`.quality`), next to ``frechet_distance_real_floor``, the same distance
  between the real validation and test splits. The synthetic sets it is measured on are drawn like the
  floor's: ``generate.n_quality_draws`` sets of as many patients as the validation split, classes at the
  training split's prevalence (mean and range over the draws). ``frechet_distance_class_balanced`` is
  the distance of the exported, class-balanced set (its class mix differs from the test split's);
* ``precision_recall`` (Kynkäänniemi et al. 2019) of the same sets in the latent space, with the real
  floor (validation against test);
* ``image_fid_25d``: 2.5-D FID of decoded volumes against real test volumes per slicing plane, on the
  project's image encoder and, when ``generate.fid_checkpoint`` names one, a user's TorchScript network;
* ``mmd`` (MONAI ``MMDMetric``) between equal-size sets of synthetic and real latents.

Privacy (:mod:`.privacy`: nearest-neighbour distance ratio, closeness to training patients,
membership-inference AUC) in the fused latent space and in image space (decoded channels against the
processed images), and usefulness (:mod:`.utility`: train on synthetic, test on real) are measured too.

Outputs: ``synthetic_dir`` (the drop, ``README.md`` = the data card), ``report_dir/metrics.json``,
``latents.npz``, ``privacy_pairs.json`` (closest synthetic→training pairs per space), ``data_card.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.generation.data_card import data_card
from meddiff.generation.export import (
    BRAIN_WINDOW_CHANNEL,
    DecodedPatient,
    ExportSettings,
    export_drop,
    latent_digest,
    patient_id,
    term_probabilities,
)
from meddiff.generation.privacy import privacy_report
from meddiff.generation.quality import (
    checkpoint_slice_features,
    encoder_slice_features,
    fid_25d,
    frechet_distance,
    load_checkpoint,
    precision_recall,
)
from meddiff.generation.utility import augmentation_report, tstr_report
from meddiff.io import atomic_dir, atomic_file, write_json
from meddiff.model.inference import encode_latents
from meddiff.model.multimodal import MedDiffModel

LOG = logging.getLogger(__name__)
#: latents decoded per batch (the image decoder's output is the largest tensor)
DECODE_BATCH = 32
DATA_CARD = "data_card.md"
DROP_README = "README.md"  # a provenance file name that ingest skips
#: a class with at most this share of the training split is rare (rare-class augmentation; the evaluate stage's
#: default threshold too)
RARE_PREVALENCE = 0.05


@dataclass
class GenerateResult:
    synthetic_dir: str
    n_patients: int
    class_agreement: float
    frechet_distance: float
    frechet_distance_real_floor: float
    tstr_over_trtr: float
    membership_inference_auc_latent: float


def mmd(a: np.ndarray, b: np.ndarray, seed: int) -> float:
    from monai.metrics import MMDMetric

    n = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    a_sub = a[rng.choice(len(a), n, replace=False)]
    b_sub = b[rng.choice(len(b), n, replace=False)]
    return float(MMDMetric()(torch.from_numpy(a_sub), torch.from_numpy(b_sub)))


@torch.no_grad()
def decode(model: MedDiffModel, z: np.ndarray, data: ProcessedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded modalities of latents ``z`` (B, d): image channels (B, C, X, Y, Z) in [0, 1], tabular features
    (B, F) in original units (the training-split scaler inverted) and keyword probabilities (B, V)."""
    model.eval()
    features = data.meta.get("tabular_features", [])
    mean = np.array([f.get("mean", 0.0) for f in features], dtype=np.float32)
    std = np.array([f.get("std", 1.0) for f in features], dtype=np.float32)
    images, tabular, keywords = [], [], []
    for start in range(0, len(z), DECODE_BATCH):
        latents = torch.from_numpy(z[start : start + DECODE_BATCH])
        images.append(model.image_decoder(latents).numpy())
        tabular.append(model.tabular_decoder(latents).numpy() * std + mean)
        keywords.append(torch.sigmoid(model.keyword_decoder(latents)).numpy())
    return np.concatenate(images), np.concatenate(tabular), np.concatenate(keywords)


def decoded_patients(
    z: np.ndarray, labels: np.ndarray, data: ProcessedDataset, images: np.ndarray, tabular: np.ndarray,
    keywords: np.ndarray,
) -> list[DecodedPatient]:
    names = [f["name"] for f in data.meta.get("tabular_features", [])]
    return [
        DecodedPatient(
            patient_id=patient_id(i),
            class_name=data.class_names[int(label)],
            channels=images[i],
            features={name: float(value) for name, value in zip(names, tabular[i], strict=True)},
            term_probabilities=term_probabilities(keywords[i], data.vocabulary),
            latent_digest=latent_digest(z[i]),
        )
        for i, label in enumerate(labels)
    ]


def _privacy(
    data: ProcessedDataset, z: np.ndarray, images: np.ndarray, real: dict[str, np.ndarray], n_pairs: int,
    n_bootstrap: int, seed: int,
) -> dict[str, Any]:
    """Privacy reports in the latent space and in image space (decoded channels against the processed images of
    the patients that have one; left out when the training or held-out split has no image)."""
    train, held_out = data.indices("train"), np.concatenate([data.indices("val"), data.indices("test")])
    synthetic_ids = [patient_id(i) for i in range(len(z))]
    patient_ids = data.arrays["patient_id"]
    reports = {
        "fused latent z": privacy_report(
            "fused latent z", z, real["train"], np.concatenate([real["val"], real["test"]]), synthetic_ids,
            list(patient_ids[train]), n_pairs, n_bootstrap, seed),
    }
    has_image = data.arrays["modality_present"][:, 0].astype(bool)
    image_train, image_held_out = train[has_image[train]], held_out[has_image[held_out]]
    if len(image_train) and len(image_held_out):
        reports["image"] = privacy_report(
            "image", images, data.arrays["image"][image_train], data.arrays["image"][image_held_out],
            synthetic_ids, list(patient_ids[image_train]), n_pairs, n_bootstrap, seed)
    return reports


def rare_classes(train_labels: np.ndarray, class_names: list[str], names: list[str] | None) -> list[int]:
    """The classes ``names`` (``generate.rare_classes``) or, when None, those with a training prevalence
    ≤ :data:`RARE_PREVALENCE` (and at least one patient).

    Raises:
        ValueError: ``names`` holds a class the model does not know.
    """
    if names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise ValueError(f"generate.rare_classes names unknown classes {unknown}")
        return [class_names.index(name) for name in names]
    prevalence = np.bincount(train_labels, minlength=len(class_names)) / max(1, len(train_labels))
    return [c for c in range(len(class_names)) if 0 < prevalence[c] <= RARE_PREVALENCE]


def rare_augmentation(
    data: ProcessedDataset, z: np.ndarray, labels: np.ndarray, real_train: np.ndarray, eval_x: np.ndarray,
    eval_y: np.ndarray, source: str, n_bootstrap: int, seed: int, names: list[str] | None = None,
) -> dict[str, Any]:
    """:func:`~meddiff.generation.utility.augmentation_report` for every rare class (:func:`rare_classes`): the real
    training latents ``real_train`` ± the synthetic patients of that class among ``z`` (S, d) / ``labels`` (S,),
    scored on real latents ``eval_x`` (E, d) with classes ``eval_y`` (E,), named ``source`` (the test split; or the
    labelled external drop admitted with this model's preprocessing and encoded by it). A rare class without a
    patient in the evaluation set is reported as not measured."""
    train_y = data.arrays["label"][data.indices("train")]
    report: dict[str, Any] = {}
    for c in rare_classes(train_y, data.class_names, names):
        name = data.class_names[c]
        if not (eval_y == c).any():
            report[name] = {"not_measured": f"no {name} patient in the {source}"}
            continue
        report[name] = {"evaluated_on": source, **augmentation_report(
            real_train, train_y, z[labels == c], c, eval_x, eval_y, data.n_classes, n_bootstrap, seed)}
    return report


def quality_draws(
    model: MedDiffModel, data: ProcessedDataset, n_draws: int, size: int, num_inference_steps: int,
    guidance_scale: float, generator: torch.Generator, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``n_draws`` synthetic sets of ``size`` latents z, classes drawn at the training split's prevalence:
    latents (n_draws, size, d) and labels (n_draws, size). The sets the quality measures compare with the real
    floor, which is measured between real splits of that mix and size."""
    train_labels = data.arrays["label"][data.indices("train")]
    prevalence = np.bincount(train_labels, minlength=data.n_classes) / len(train_labels)
    labels = np.random.default_rng(seed).choice(data.n_classes, size=(n_draws, size), p=prevalence)
    latents = np.stack([
        model.sample_latents(torch.from_numpy(row), num_inference_steps, guidance_scale, generator).z.numpy()
        for row in labels
    ])
    return latents, labels


def _dp_summary(model: MedDiffModel) -> dict[str, Any]:
    """ε, δ and the DP-SGD settings of the diffusion model's refinement, or that it was trained without DP."""
    accounting = model.diffusion.dp_accounting
    if accounting is None:
        return {"enabled": False}
    return {"enabled": True, **accounting, "accountant": "RDP (opacus)",
            "covers": "the latent-diffusion U-Net's refinement on the training latents; not the encoders or the "
                      "latent scaler, which saw the training patients without DP"}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def quality_report(
    model: MedDiffModel, data: ProcessedDataset, draws: np.ndarray, real: dict[str, np.ndarray], k: int,
    checkpoint: str | None,
) -> dict[str, Any]:
    """Latent Fréchet distance and precision/recall of the ``draws`` (n_draws, size, d) against the real test
    latents, and the 2.5-D image FID of their decoded volumes (module docstring), each with its real floor
    (validation split against test split)."""
    report: dict[str, Any] = {"frechet_distance": _spread([frechet_distance(z, real["test"]) for z in draws])}
    if min(len(real["val"]), len(real["test"])) > k:
        pr = [precision_recall(real["test"], z, k) for z in draws]
        floor_precision, floor_recall = precision_recall(real["test"], real["val"], k)
        report["precision_recall"] = {
            "k": k,
            "precision": _spread([p for p, _ in pr]),
            "recall": _spread([r for _, r in pr]),
            "real_floor": {"precision": floor_precision, "recall": floor_recall},
        }
    else:
        report["precision_recall"] = {"k": k, "not_measured": f"the validation and test splits need more than k = {k} "
                                                              "patients each"}
    has_image = data.arrays["modality_present"][:, 0].astype(bool)
    val, test = (index[has_image[index]] for index in (data.indices("val"), data.indices("test")))
    if len(val) < 2 or len(test) < 2:
        return report
    real_images = data.arrays["image"][test].astype(np.float32)
    floor_images = data.arrays["image"][val].astype(np.float32)
    synthetic = [decode(model, z[: len(val)], data)[0] for z in draws]
    spaces = {"meddiff image encoder": encoder_slice_features(model.image_encoder)}
    if checkpoint is not None:
        names = list(data.meta.get("image_channels", []))
        channel = names.index(BRAIN_WINDOW_CHANNEL) if BRAIN_WINDOW_CHANNEL in names else 0
        spaces[f"checkpoint {Path(checkpoint).name}"] = checkpoint_slice_features(load_checkpoint(checkpoint), channel)
    report["image_fid_25d"] = {name: fid_25d(features, synthetic, real_images, floor_images)
                               for name, features in spaces.items()}
    return report


def run_generate(
    params: Params, processed_dir: Path, model_dir: Path, synthetic_dir: Path, report_dir: Path
) -> GenerateResult:
    """Sample, decode, measure (quality, privacy, TSTR), export the drop and write the data card.

    Raises ``FileNotFoundError`` without processed data or model, ``ValueError`` when a class has no
    ICD-10 code in ``dataset.classes`` or a decoded lab's coding disagrees with ``dataset.features``.
    """
    config = params.generate
    data = load_processed(processed_dir)
    model = MedDiffModel.from_pretrained(model_dir)
    settings = ExportSettings.from_params(params, data.meta, model.spec.modalities)
    generator = torch.Generator().manual_seed(params.seed)
    labels = np.repeat(np.arange(data.n_classes), config.n_per_class)
    sampled = model.sample_latents(
        torch.from_numpy(labels), config.num_inference_steps, config.guidance_scale, generator
    )
    z = sampled.z.numpy()
    with torch.no_grad():
        predicted = model.classify_latent(torch.from_numpy(z)).argmax(dim=1).numpy()
    agreement = {
        name: float((predicted[labels == c] == c).mean()) for c, name in enumerate(data.class_names)
    }
    real = {split: encode_latents(model, data, data.indices(split)) for split in ("train", "val", "test")}
    draws, draw_labels = quality_draws(model, data, config.n_quality_draws, len(real["val"]),
                                       config.num_inference_steps, config.guidance_scale, generator, params.seed)
    quality = quality_report(model, data, draws, real, config.precision_recall_k, config.fid_checkpoint)
    with torch.no_grad():
        predicted_real = model.classify_latent(torch.from_numpy(real["test"])).argmax(dim=1).numpy()
    test_labels = data.arrays["label"][data.indices("test")]
    images, tabular, keywords = decode(model, z, data)
    privacy = _privacy(data, z, images, real, config.n_closest_pairs, config.n_bootstrap, params.seed)
    tstr = tstr_report(z, labels, real["train"], data.arrays["label"][data.indices("train")], real["test"],
                       data.arrays["label"][data.indices("test")], data.n_classes, config.n_bootstrap, params.seed)
    metrics: dict[str, Any] = {
        "n_synthetic": len(labels),
        "n_per_class": {name: int((labels == c).sum()) for c, name in enumerate(data.class_names)},
        "class_agreement": float((predicted == labels).mean()),
        "class_agreement_per_class": agreement,
        "class_agreement_real_per_class": {
            name: float((predicted_real[test_labels == c] == c).mean()) if (test_labels == c).any() else None
            for c, name in enumerate(data.class_names)
        },
        "frechet_distance": quality["frechet_distance"]["mean"],
        "frechet_distance_draws": {**quality["frechet_distance"], "n_draws": len(draws), "size": draws.shape[1]},
        "frechet_distance_real_floor": frechet_distance(real["val"], real["test"]),
        "frechet_distance_class_balanced": frechet_distance(z, real["test"]),
        "precision_recall": quality["precision_recall"],
        "image_fid_25d": quality.get("image_fid_25d", {}),
        "mmd": mmd(z, real["test"], params.seed),
        "mmd_real_floor": mmd(real["val"], real["test"], params.seed),
        "space": "fused patient latent z",
        "privacy": {space: report.summary() for space, report in privacy.items()},
        "tstr": tstr,
        "rare_augmentation": rare_augmentation(data, z, labels, real["train"], real["test"], test_labels, "test split",
                                               config.n_bootstrap, params.seed, config.rare_classes),
        "differential_privacy": _dp_summary(model),
    }
    pairs = {space: [dataclasses.asdict(p) for p in report.closest_pairs] for space, report in privacy.items()}
    how = {
        "model": f"meddiff latent diffusion from `{model_dir}`",
        "sampler": f"DDIM, {config.num_inference_steps} steps, classifier-free guidance scale {config.guidance_scale}, "
                   f"seed {params.seed}, {config.n_per_class} patients per class; the latent stack [z, h_image, "
                   "h_text, h_tabular] is sampled jointly in the scaled space (unit variance per dimension, scaler "
                   "fitted on the training latents) and z is read from it",
        "image": "the image decoder's brain-window channel mapped back to HU through preprocess.hu_window; air "
                 "outside the decoded brain mask; written as a DERIVED\\SECONDARY CT series",
        "labs and demographics": "tabular decoder, training-split scaler inverted; birth date = ingest.reference_date "
                                 "− decoded age",
        "note": "a fixed template listing the RadLex/clinical terms the keyword decoder gives probability ≥ 0.5",
        "diagnosis": "the class the sample was conditioned on, as a FHIR Condition (the class's own ICD-10 code, "
                     "the first of dataset.classes)",
    }
    with atomic_dir(synthetic_dir) as staging:
        summary = export_drop(decoded_patients(z, labels, data, images, tabular, keywords), settings, staging)
        metrics["export"] = dataclasses.asdict(summary)
        card = data_card(metrics, pairs, how)
        (staging / DROP_README).write_text(card, encoding="utf-8")
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "metrics.json", metrics)
    write_json(report_dir / "privacy_pairs.json", pairs)
    with atomic_file(report_dir / DATA_CARD, "w") as handle:
        handle.write(card)
    with atomic_file(report_dir / "latents.npz", "wb") as handle:
        np.savez(handle, synthetic=z, synthetic_labels=labels, real_test=real["test"], quality_draws=draws,
                 quality_draw_labels=draw_labels)
    LOG.info(
        "generated %d patients: class agreement %.3f, FD %.3f (real floor %.3f), TSTR/TRTR %.3f, MI AUC %.3f (latent)",
        len(labels), metrics["class_agreement"], metrics["frechet_distance"], metrics["frechet_distance_real_floor"],
        tstr["tstr_over_trtr"]["value"], privacy["fused latent z"].membership_inference_auc,
    )
    return GenerateResult(
        synthetic_dir=str(synthetic_dir),
        n_patients=len(labels),
        class_agreement=metrics["class_agreement"],
        frechet_distance=metrics["frechet_distance"],
        frechet_distance_real_floor=metrics["frechet_distance_real_floor"],
        tstr_over_trtr=tstr["tstr_over_trtr"]["value"],
        membership_inference_auc_latent=privacy["fused latent z"].membership_inference_auc,
    )
