import json

import numpy as np
import torch

from meddiff.explain.attribution import attention_rollout, dice
from meddiff.explain.report import run_explain


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == 0.5
    assert dice(a, a) == 1.0


def test_rollout_rows_are_distributions() -> None:
    layers = tuple(torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(2))
    rollout = attention_rollout(layers)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))


def test_explain_report(trained_tiny, tmp_path) -> None:
    result = run_explain(trained_tiny["params"], trained_tiny["processed"], trained_tiny["models"], tmp_path / "x")
    html = (tmp_path / "x" / "index.html").read_text()
    metrics = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert result.n_patients == metrics["n_patients"] > 0
    assert set(metrics["by_method"]) == {"attention", "grad_attention"}
    for patient in metrics["patients"]:
        assert (tmp_path / "x" / patient["figure"]).is_file()
        assert patient["figure"] in html
        assert 0.0 <= patient["dice"] <= 1.0
        assert isinstance(patient["pointing_hit"], bool)


def test_grad_attention_points_at_the_evidence() -> None:
    """A hand-built case: only token 1 carries the evidence, so its gradient-weighted relevance wins."""
    from meddiff.explain.attribution import token_relevance
    from meddiff.model.multimodal import ModelOutput

    attention = torch.softmax(torch.zeros(1, 1, 1, 3), dim=-1).requires_grad_()
    values = torch.tensor([0.0, 5.0, 0.0])
    logit = (attention * values).sum()
    out = ModelOutput(logits=logit.view(1, 1), z=torch.zeros(1, 1), attention=attention,
                      token_slices={}, modality_latents=torch.zeros(1, 3, 1))
    attention.retain_grad()
    logit.backward()
    relevance = token_relevance(out, "grad_attention")
    assert int(relevance.argmax()) == 1
    assert torch.allclose(token_relevance(out, "attention"), torch.full((1, 3), 1 / 3))
