import json

import numpy as np
import torch

from meddiff.config import apply_overrides
from meddiff.training.batches import MODEL_INPUTS, to_batch
from meddiff.training.checkpoint import load_model
from meddiff.training.objective import compute_losses
from meddiff.training.train import build_model


def test_model_overfits_a_tiny_batch(tiny_processed, tiny_params) -> None:
    _, data = tiny_processed
    params = apply_overrides(tiny_params, ["train.model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(data, params)
    batch = to_batch(data, np.arange(8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        output = model({k: batch[k] for k in MODEL_INPUTS}, batch["present"])
        losses = compute_losses(model, batch, output, params.train, None)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model({k: batch[k] for k in MODEL_INPUTS}, batch["present"]).logits.argmax(1)
    assert torch.equal(predicted, batch["label"])


def test_run_train_writes_model_and_registers(trained_tiny) -> None:
    from mlflow.tracking import MlflowClient

    models = trained_tiny["models"]
    run = json.loads((models / "run.json").read_text())
    history = json.loads((models / "history.json").read_text())
    assert len(history) == trained_tiny["result"].epochs_run
    assert {"train_loss_total", "val_auc_macro"} <= set(history[0])
    model = load_model(models)
    assert sum(p.numel() for p in model.parameters()) > 0
    client = MlflowClient(tracking_uri=trained_tiny["params"].tracking.tracking_uri)
    name = trained_tiny["params"].tracking.registered_model
    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == run["registered_version"]
    assert client.get_run(run["mlflow_run_id"]).data.tags["meddiff.params_hash"] == trained_tiny["params"].digest()


def test_registered_model_predicts(trained_tiny) -> None:
    import mlflow

    mlflow.set_tracking_uri(trained_tiny["params"].tracking.tracking_uri)
    name = trained_tiny["params"].tracking.registered_model
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    data = trained_tiny["data"]
    batch = to_batch(data, np.arange(3))
    inputs = {k: batch[k].numpy() for k in MODEL_INPUTS}
    inputs["modality_present"] = batch["present"].numpy()
    probs = pyfunc.predict(inputs)
    assert probs.shape == (3, data.n_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_resume_after_interruption_matches_uninterrupted(tiny_processed, tiny_params, tmp_path) -> None:
    import pytest

    from meddiff.training.checkpoint import load_training_state
    from meddiff.training.train import STATE_FILE, TrainingInterruptedError, train_model

    _, data = tiny_processed
    params = apply_overrides(
        tiny_params, ["train.epochs=3", "train.checkpoint_every_steps=2", "train.early_stopping_patience=10"]
    )
    best_a, state_a, resumed_a = train_model(params, data, tmp_path / "a")
    with pytest.raises(TrainingInterruptedError):
        train_model(params, data, tmp_path / "b", stop_after_steps=5)
    best_b, state_b, resumed_b = train_model(params, data, tmp_path / "b")
    assert resumed_a == 0 and resumed_b == 4  # the last checkpoint before the stop, mid-epoch
    assert state_a.global_step == state_b.global_step
    final_a = load_training_state(tmp_path / "a" / STATE_FILE)["model"]
    final_b = load_training_state(tmp_path / "b" / STATE_FILE)["model"]
    for name, tensor in final_a.items():
        torch.testing.assert_close(tensor, final_b[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    for (name, a), b in zip(best_a.state_dict().items(), best_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["val_auc_macro"] for h in state_a.history] == [h["val_auc_macro"] for h in state_b.history]


def test_masking_curriculum_ramps() -> None:
    from meddiff.config import TrainConfig
    from meddiff.training.train import masking_probability

    config = TrainConfig(masking_curriculum="linear_warmup", masking_warmup_epochs=4, modality_dropout_p=0.5)
    assert [masking_probability(config, e) for e in range(6)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert masking_probability(TrainConfig(), 0) == 0.5
