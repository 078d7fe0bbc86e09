"""The data card of a synthetic drop (issue 12): what it holds, how it was made, how good, how private,
how useful; in the spirit of "Datasheets for Datasets" (Gebru et al. 2021), one Markdown page.

Written as ``reports/generate/data_card.md`` and as ``README.md`` in the synthetic folder (a provenance
file that ``meddiff ingest`` skips).
"""

from __future__ import annotations

from typing import Any

NOT_FOR_CLINICAL_USE = "**Synthetic — not for clinical use.** No record in this drop describes a real patient."


def _interval(value: dict[str, float]) -> str:
    return f"{value['value']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"


def _spread(value: dict[str, float], spec: str) -> str:
    return f"{value['mean']:{spec}} [{value['min']:{spec}}, {value['max']:{spec}}]"


def _optional(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _attack_interval(report: dict[str, Any]) -> str:
    interval = report.get("membership_inference_auc_interval")
    return "" if not interval else f" [{interval['ci_low']:.3f}, {interval['ci_high']:.3f}]"


def _privacy_rows(privacy: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| space | NN distance ratio (synthetic→train / held-out→train, medians) | synthetic closer than held-out "
            "p1 | membership-inference AUC |", "|---|---|---|---|"]
    for space, report in privacy.items():
        rows.append(f"| {space} | {report['distance_ratio']:.3f} ({report['median_synthetic_to_train']:.3g} / "
                    f"{report['median_held_out_to_train']:.3g}) | {report['n_closer_than_p1']} of "
                    f"{report['n_synthetic']} ({report['fraction_closer_than_p1']:.1%}) | "
                    f"{report['membership_inference_auc']:.3f}{_attack_interval(report)} |")
    return rows


def _pair_rows(pairs: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = ["| space | synthetic | nearest training patient | distance | held-out patients nearer to train |",
            "|---|---|---|---|---|"]
    for space, listed in pairs.items():
        rows += [f"| {space} | {p['synthetic_id']} | {p['train_id']} | {p['distance']:.3g} | "
                 f"{p['held_out_percentile']:.1f} % |" for p in listed]
    return rows


def _dp_lines(dp: dict[str, Any]) -> list[str]:
    if not dp.get("enabled"):
        return ["Differential privacy: none (train.diffusion.dp.enabled is false); the figures above are empirical, "
                "not a guarantee."]
    return [f"Differential privacy: the latent-diffusion refinement was trained with DP-SGD ({dp['accountant']}): "
            f"**ε = {dp['epsilon']:.2f} at δ = {dp['delta']:.2g}** (noise multiplier {dp['noise_multiplier']:.3f}, "
            f"per-patient clipping norm {dp['max_grad_norm']:g}, sampling rate {dp['sample_rate']:.3f}, "
            f"{int(dp['steps'])} steps). It covers {dp['covers']}."]


def _augmentation_lines(report: dict[str, dict[str, Any]]) -> list[str]:
    if not report:
        return []
    lines = ["## Rare-class augmentation", "",
             "The same classifier trained on the real training split alone and with the synthetic patients of a rare "
             "class added; differences augmented − real only, paired 95 % bootstrap intervals.", "",
             "| rare class | evaluated on (rare / all) | synthetic added | measure | real only | augmented "
             "| difference |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in report.items():
        if "not_measured" in entry:
            lines.append(f"| {name} | {entry['not_measured']} | | | | | |")
            continue
        for measure in ("rare_auc", "rare_sensitivity", "auc_macro"):
            lines.append(f"| {name} | {entry['evaluated_on']} ({entry['n_eval_rare']} / {entry['n_eval']}) | "
                         f"{entry['n_synthetic_added']} | {measure} | {_interval(entry[measure]['real_only'])} | "
                         f"{_interval(entry[measure]['augmented'])} | {_interval(entry[measure]['difference'])} |")
    return [*lines, ""]


def data_card(metrics: dict[str, Any], pairs: dict[str, list[dict[str, Any]]], how: dict[str, Any]) -> str:
    """The card as Markdown, from ``metrics.json``'s content, the closest pairs per space and ``how`` (model,
    sampler, seed, export settings as strings)."""
    per_class = metrics["n_per_class"]
    export = metrics["export"]
    tstr = metrics["tstr"]
    draws = metrics["frechet_distance_draws"]
    pr = metrics["precision_recall"]
    quality_rows = [
        "| measure | synthetic | real floor |", "|---|---|---|",
        f"| Fréchet distance, fused latent z ({draws['n_draws']} synthetic sets of {draws['size']} at the training "
        f"class mix vs real test: mean [min, max]; floor: real val vs real test) | {_spread(draws, '.2f')} | "
        f"{metrics['frechet_distance_real_floor']:.2f} |",
        f"| Fréchet distance, fused latent z, the exported class-balanced set vs real test | "
        f"{metrics['frechet_distance_class_balanced']:.2f} | — |",
    ]
    if "not_measured" in pr:
        quality_rows.append(f"| precision/recall, fused latent z (k = {pr['k']}) | not measured: {pr['not_measured']} "
                            "| — |")
    else:
        quality_rows += [
            f"| precision, fused latent z (k-NN manifold, k = {pr['k']}) | {_spread(pr['precision'], '.3f')} | "
            f"{pr['real_floor']['precision']:.3f} |",
            f"| recall, fused latent z | {_spread(pr['recall'], '.3f')} | {pr['real_floor']['recall']:.3f} |",
        ]
    quality_rows.append(f"| MMD, fused latent z | {metrics['mmd']:.4f} | {metrics['mmd_real_floor']:.4f} |")
    for space, planes in metrics.get("image_fid_25d", {}).items():
        for plane, value in planes.items():
            spread = {"mean": value["fid"], "min": value["fid_range"][0], "max": value["fid_range"][1]}
            quality_rows.append(f"| 2.5-D FID, {plane} slices, {space} features | {_spread(spread, '.3g')} | "
                                f"{value['real_floor']:.3g} |")
    quality_rows.append(f"| class agreement (the model's classifier head, trained on real patients only, calls the "
                        f"sampled class; floor column: its recall on real test patients) | "
                        f"{metrics['class_agreement']:.3f} | — |")
    real_agreement = metrics.get("class_agreement_real_per_class", {})
    quality_rows += [f"| class agreement, {name} | {value:.3f} | {_optional(real_agreement.get(name))} |"
                     for name, value in metrics["class_agreement_per_class"].items()]
    lines = [
        "# Data card: meddiff synthetic patients", "", NOT_FOR_CLINICAL_USE, "",
        "## Contents", "",
        f"{metrics['n_synthetic']} synthetic patients (head CT, labs, note, diagnosis), "
        f"{export['n_dicom_files']} DICOM files, FHIR R4 resources: "
        + ", ".join(f"{count} {kind}" for kind, count in export["resources"].items()) + ".", "",
        "| class | patients |", "|---|---|",
        *(f"| {name} | {count} |" for name, count in per_class.items()), "",
        "Layout (the raw layout `meddiff ingest` reads, docs/data.md): `imaging/<patient>/<study>/<series>/<n>.dcm` "
        "(CT Image Storage, DERIVED\\SECONDARY, marked SYNTHETIC), `ehr/{Patient,Observation,Condition,"
        "DocumentReference}.ndjson` (FHIR R4; every resource tagged synthetic in `meta.tag` and HTEST in "
        "`meta.security`). Notes are in the DocumentReferences.", "",
        "## How it was generated", "",
        *(f"- {key}: {value}" for key, value in how.items()), "",
        f"- lab values clipped to their `dataset.features` range: {export['n_lab_values_clipped']}", "",
        "## Quality", "", *quality_rows, "",
        "## Privacy", "",
        "Training = the model's training split; held-out = validation + test (never seen in training). "
        "Targets (issue 12): no synthetic patient closer to a training patient than the 1st percentile of "
        "held-out→train distances; membership-inference AUC ≤ 0.6.", "",
        *_privacy_rows(metrics["privacy"]), "",
        "Closest synthetic→training pairs:", "", *_pair_rows(pairs), "",
        *_dp_lines(metrics.get("differential_privacy", {"enabled": False})), "",
        "## Usefulness (train on synthetic, test on real)", "",
        f"{tstr['classifier']}; real test split (n = {tstr['n_test']}); macro AUC with 95 % bootstrap intervals.", "",
        "| trained on | n | macro AUC on real test |", "|---|---|---|",
        f"| synthetic (TSTR) | {tstr['n_synthetic_train']} | {_interval(tstr['tstr_auc_macro'])} |",
        f"| real training split (TRTR) | {tstr['n_real_train']} | {_interval(tstr['trtr_auc_macro'])} |",
        f"| ratio TSTR / TRTR (target ≥ 0.9) | | {_interval(tstr['tstr_over_trtr'])} |", "",
        *_augmentation_lines(metrics.get("rare_augmentation", {})),
        NOT_FOR_CLINICAL_USE, "",
    ]
    return "\n".join(lines)
