import json
import math

import numpy as np
import pytest
import torch

from meddiff.config import TrainConfig, apply_overrides, load_params
from meddiff.data.batches import model_inputs, to_batch
from meddiff.model.calibration import calibrated, load_temperature, log_probabilities
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel
from meddiff.training.loop import BEST_DIR, build_model, validation_auc, warmup_cosine
from meddiff.training.objective import LOSS_TERMS, TrainingObjective, compute_losses, segmentation_loss


def test_model_overfits_a_tiny_batch(tiny_processed, tiny_params) -> None:
    _, data = tiny_processed
    params = apply_overrides(tiny_params, ["train.model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(data, params)
    batch = to_batch(data, np.arange(8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        output = model(model_inputs(batch), batch["modality_present"])
        losses = compute_losses(model, batch, output, params.train, None)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(model_inputs(batch), batch["modality_present"]).logits.argmax(1)
    assert torch.equal(predicted, batch["label"])


def test_objective_total_is_the_weighted_sum_of_its_terms(tiny_processed, tiny_params) -> None:
    _, data = tiny_processed
    params = apply_overrides(tiny_params, ["train.lambda_diff=0.5", "train.lambda_cls=2.0", "train.lambda_recon=0.25",
                                           "train.lambda_seg=3.0"])
    torch.manual_seed(0)
    model = build_model(data, params)
    objective = TrainingObjective(model, params.train, None, torch.Generator().manual_seed(0))
    batch = to_batch(data, np.arange(6), lesion_masks=True)
    losses = objective(batch, batch["modality_present"])
    assert tuple(losses) == LOSS_TERMS == ("total", "cls", "diff", "recon", "seg")
    assert losses["seg"] > 0
    expected = 0.5 * losses["diff"] + 2.0 * losses["cls"] + 0.25 * losses["recon"] + 3.0 * losses["seg"]
    torch.testing.assert_close(losses["total"], expected)


def test_segmentation_loss_on_a_known_case() -> None:
    logits = torch.zeros(1, 1, 2, 2, 2)  # p = 0.5 everywhere
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1.0  # 2 lesion voxels of 8
    region = torch.ones_like(target)
    # BCE ln 2 per voxel; Dice 1 − (2·0.5·2 + 1) / (0.5·8 + 2 + 1) = 4/7
    expected = math.log(2.0) + 4.0 / 7.0
    loss = segmentation_loss(logits, target, region, torch.ones(1))
    torch.testing.assert_close(loss, torch.tensor(expected))
    # voxels outside the region (the brain) count for nothing, whatever their logit or label
    wider = torch.zeros(1, 1, 2, 2, 4)
    wider[..., :2] = logits
    wider[..., 2:] = 9.0
    wide_target = torch.ones(1, 1, 2, 2, 4)
    wide_target[..., :2] = target
    wide_region = torch.zeros_like(wide_target)
    wide_region[..., :2] = 1.0
    torch.testing.assert_close(segmentation_loss(wider, wide_target, wide_region, torch.ones(1)), loss)
    # a scan without a mask has weight 0: the loss is 0 and sends no gradient
    logits.requires_grad_(True)
    none = segmentation_loss(logits, target, region, torch.zeros(1))
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().max() == 0.0


def test_seg_loss_counts_masked_images_and_skips_patients_without_a_mask(tiny_processed, tiny_params) -> None:
    _, data = tiny_processed
    params = apply_overrides(tiny_params, ["train.lambda_seg=1.0", "train.model.image_pooling=lesion"])
    torch.manual_seed(0)
    model = build_model(data, params)
    assert model.image_encoder.segmentation_head is not None
    objective = TrainingObjective(model, params.train, None, torch.Generator().manual_seed(0))
    index = np.arange(8)
    batch = to_batch(data, index, lesion_masks=True)
    image_hidden = batch["modality_present"].clone()
    image_hidden[:, 0] = False  # modality masking hides every image from the fusion
    seen, hidden = objective(batch, batch["modality_present"]), objective(batch, image_hidden)
    torch.testing.assert_close(hidden["seg"], seen["seg"])
    assert seen["seg"] > 0
    without = dict(batch, has_lesion_mask=torch.zeros_like(batch["has_lesion_mask"]))  # a dataset without masks
    assert objective(without, batch["modality_present"])["seg"].item() == 0.0
    # no seg head without the loss: the model and its batches are as before
    assert build_model(data, tiny_params).image_encoder.segmentation_head is None


def test_lesion_pooling_without_the_seg_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="lambda_seg"):
        TrainConfig.model_validate({"model": {"image_pooling": "lesion"}})


def test_warmup_then_cosine_schedule() -> None:
    factor = warmup_cosine(total_steps=100, warmup_fraction=0.05)
    assert [factor(step) for step in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5) == pytest.approx(1.0)  # the cosine starts at its peak
    assert factor(5 + 95 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert factor(100) == pytest.approx(0.0) and factor(200) == pytest.approx(0.0)
    assert warmup_cosine(10, 0.0)(0) == 1.0  # at least one warm-up step


def test_warmup_fraction_is_a_train_param() -> None:
    from pathlib import Path

    repository = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert TrainConfig().lr_warmup_fraction == repository.train.lr_warmup_fraction == 0.05


def test_fit_refines_only_the_diffusion_model(tiny_processed, tiny_params, tmp_path) -> None:
    from meddiff.training.fit import fit

    _, data = tiny_processed
    result = fit(tiny_params, data, tmp_path / "checkpoints")
    assert len(result.refine_losses) == tiny_params.train.diffusion.refine_epochs
    assert result.resumed_from_step == 0
    best = MedDiffModel.from_pretrained(tmp_path / "checkpoints" / BEST_DIR)
    refined = result.model.state_dict()
    changed = {name for name, tensor in best.state_dict().items() if not torch.equal(tensor, refined[name])}
    assert changed and all(name.startswith("diffusion.") for name in changed), sorted(changed)
    # Diagnosis is untouched by the refinement: the best epoch's validation AUC, exactly.
    assert validation_auc(result.model, data)["auc_macro"] == result.state.best_auc


def test_run_train_writes_the_best_model_and_registers(trained_tiny) -> None:
    from mlflow.tracking import MlflowClient

    models = trained_tiny["models"]
    params = trained_tiny["params"]
    run = json.loads((models / "run.json").read_text())
    history = json.loads((models / "history.json").read_text())
    refine = json.loads((models / "diffusion_refine_history.json").read_text())
    assert len(history) == trained_tiny["result"].epochs_run
    assert len(refine) == params.train.diffusion.refine_epochs
    val_aucs = [h["val_auc_macro"] for h in history]
    assert run["best_epoch"] == int(np.argmax(val_aucs)) and run["best_val_auc"] == max(val_aucs)
    model = MedDiffModel.from_pretrained(models)
    # The saved weights are the best epoch's: they reproduce its validation AUC exactly.
    assert validation_auc(model, trained_tiny["data"])["auc_macro"] == run["best_val_auc"]
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    name = params.tracking.registered_model
    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == run["registered_version"]
    assert client.get_run(run["mlflow_run_id"]).data.tags["meddiff.params_hash"] == params.digest()


def test_registered_model_predicts_like_the_saved_one(trained_tiny) -> None:
    import mlflow

    mlflow.set_tracking_uri(trained_tiny["params"].tracking.tracking_uri)
    name = trained_tiny["params"].tracking.registered_model
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    data = trained_tiny["data"]
    index = np.arange(5)
    batch = to_batch(data, index)
    inputs = {k: v.numpy() for k, v in model_inputs(batch).items()}
    inputs["modality_present"] = batch["modality_present"].numpy()
    probs = pyfunc.predict(inputs)
    # the served probabilities are the saved model's, calibrated with the temperature train fitted
    temperature = load_temperature(trained_tiny["models"])
    assert temperature is not None
    softmax = predict_proba(MedDiffModel.from_pretrained(trained_tiny["models"]), data, index)
    np.testing.assert_allclose(probs, calibrated(log_probabilities(softmax), temperature), rtol=0, atol=1e-6)
    assert probs.argmax(axis=1).tolist() == softmax.argmax(axis=1).tolist()


def test_resume_after_interruption_matches_uninterrupted(tiny_processed, tiny_params, tmp_path) -> None:
    from meddiff.training.checkpoint import load_training_state
    from meddiff.training.loop import STATE_FILE, TrainingInterruptedError, train_model

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
    from meddiff.training.loop import masking_probability

    config = TrainConfig(masking_curriculum="linear_warmup", masking_warmup_epochs=4, modality_dropout_p=0.5)
    assert [masking_probability(config, e) for e in range(6)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert masking_probability(TrainConfig(), 0) == 0.5


def test_class_weight_power_interpolates_between_uniform_and_inverse_frequency() -> None:
    from meddiff.training.objective import class_weights

    labels = np.array([0] * 8 + [1] * 2 + [3] * 1)  # class 2 absent
    inverse = class_weights(labels, 4)
    # inverse frequency 1/8 : 1/2 : 1/1 over the seen classes, mean 1, 0 for the absent class
    torch.testing.assert_close(inverse, torch.tensor([1 / 8, 1 / 2, 0.0, 1.0]) * 3 / (1 / 8 + 1 / 2 + 1))
    root = class_weights(labels, 4, power=0.5)
    expected = torch.tensor([8 ** -0.5, 2 ** -0.5, 0.0, 1.0])
    torch.testing.assert_close(root, expected * 3 / expected.sum())
    assert torch.equal(class_weights(labels, 4, power=1.0), inverse)
    with pytest.raises(ValueError, match="power"):
        class_weights(labels, 4, power=0.0)


def test_image_lr_multiplier_puts_the_image_encoder_in_its_own_group(tiny_processed, tiny_params) -> None:
    from meddiff.training.loop import parameter_groups

    _, data = tiny_processed
    model = build_model(data, tiny_params)
    assert len(parameter_groups(model, tiny_params.train)) == 1  # multiplier 1: one group, as before
    config = tiny_params.train.model_copy(update={"image_lr_multiplier": 3.0})
    groups = parameter_groups(model, config)
    image = {id(p) for p in model.image_encoder.parameters()}
    assert {id(p) for p in groups[1]["params"]} == image
    assert not image & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    lr = config.learning_rate
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, 3.0 * lr])


def test_training_setup_params_default_to_the_previous_behaviour() -> None:
    from pathlib import Path

    repository = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    for config in (TrainConfig(), repository.train):
        assert config.class_weight_power == 1.0 and config.image_lr_multiplier == 1.0
