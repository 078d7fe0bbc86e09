"""One entry point for every attribution method (``explain.methods`` in ``params.yaml``)."""

from __future__ import annotations

import numpy as np
import torch

from meddiff.config import ExplainConfig, ExplainMethod
from meddiff.data.batches import model_inputs, to_batch
from meddiff.data.dataset import ProcessedDataset
from meddiff.explain.attention import explain_attention
from meddiff.explain.attribution import Attributions
from meddiff.explain.grad_cam import explain_grad_cam
from meddiff.explain.integrated_gradients import explain_integrated_gradients
from meddiff.explain.occlusion import explain_occlusion
from meddiff.model.multimodal import MedDiffModel

#: Patients explained per call (bounds the memory of Integrated Gradients' path batches).
EXPLAIN_BATCH = 8


def explain_batch(
    model: MedDiffModel,
    inputs: dict[str, torch.Tensor],
    present: torch.Tensor,
    method: ExplainMethod,
    config: ExplainConfig,
) -> Attributions:
    """Attributions of ``method`` for a batch of patients (``inputs`` as the model reads them,
    ``present`` (B, 3)), explaining each patient's predicted class.

    Raises:
        ValueError: an unknown method.
    """
    if method in ("attention", "grad_attention"):
        return explain_attention(model, inputs, present, method)
    if method == "integrated_gradients":
        return explain_integrated_gradients(model, inputs, present, config.ig_steps)
    if method == "grad_cam":
        return explain_grad_cam(model, inputs, present, config.grad_cam_layer)
    if method == "occlusion":
        return explain_occlusion(model, inputs, present, config.occlusion_mask_voxels, config.occlusion_overlap)
    raise ValueError(f"unknown attribution method {method!r}")


def explain_patients(
    model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, method: ExplainMethod, config: ExplainConfig
) -> Attributions:
    """Attributions of ``method`` for the patients ``index`` of ``data``, with their own modalities."""
    parts = []
    for start in range(0, len(index), EXPLAIN_BATCH):
        batch = to_batch(data, index[start : start + EXPLAIN_BATCH])
        parts.append(explain_batch(model, model_inputs(batch), batch["modality_present"], method, config))
    return Attributions.concatenate(parts)
