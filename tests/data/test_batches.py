"""The data → model adapter: processed arrays to tensors, the same at training and at serving time."""

import numpy as np
import pytest
import torch

from meddiff.data.batches import BATCH_DTYPES, MODEL_INPUTS, iterate_batches, model_inputs, to_batch, to_tensors


def test_to_batch_holds_the_rows_of_index_as_batch_dtypes(tiny_processed) -> None:
    _, data = tiny_processed
    index = np.array([5, 0, 9])
    batch = to_batch(data, index)
    assert list(batch) == list(BATCH_DTYPES)
    for name, tensor in batch.items():
        expected = data.arrays[name][index].astype(BATCH_DTYPES[name])
        assert tensor.dtype == torch.from_numpy(expected).dtype, name
        np.testing.assert_array_equal(tensor.numpy(), expected, err_msg=name)
    batch["image"].zero_()  # a batch is a copy: writing to it leaves the data alone
    assert data.arrays["image"][index].any()


def test_model_inputs_are_what_the_model_reads(tiny_processed) -> None:
    _, data = tiny_processed
    batch = to_batch(data, np.arange(2))
    inputs = model_inputs(batch)
    assert tuple(inputs) == MODEL_INPUTS
    assert all(inputs[name] is batch[name] for name in MODEL_INPUTS)


def test_serving_arrays_convert_like_a_batch(tiny_processed) -> None:
    _, data = tiny_processed
    index = np.arange(3)
    served = to_tensors({name: data.arrays[name][index].tolist() for name in (*MODEL_INPUTS, "modality_present")})
    batch = to_batch(data, index)
    for name, tensor in served.items():
        torch.testing.assert_close(tensor, batch[name], rtol=0, atol=0, msg=name)
    with pytest.raises(KeyError, match="patient_id"):
        to_tensors({"patient_id": np.array(["p0"])})


def test_iterate_batches_covers_index_in_order(tiny_processed) -> None:
    _, data = tiny_processed
    index = np.array([7, 3, 11, 2, 8])
    batches = list(iterate_batches(data, index, batch_size=2, shuffle=False))
    assert [len(b["label"]) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(torch.cat([b["label"] for b in batches]).numpy(), data.arrays["label"][index])
    shuffled = list(iterate_batches(data, index, 2, shuffle=True, rng=np.random.default_rng(0)))
    order = np.random.default_rng(0).permutation(index)
    np.testing.assert_array_equal(torch.cat([b["label"] for b in shuffled]).numpy(), data.arrays["label"][order])
