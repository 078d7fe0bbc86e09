"""The processed layout: per-patient arrays, volumes per shard read row by row, the earlier arrays.npz."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from meddiff.data.batches import to_batch
from meddiff.data.dataset import (
    ARRAYS_FILE,
    META_FILE,
    RowWriter,
    ShardedArray,
    has_processed,
    load_processed,
    processed_digest,
)
from meddiff.io import write_json
from tests.conftest import make_tiny_processed


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[ShardedArray, np.ndarray]:
    """(7, 2, 3) int16 rows spread over three files in a scrambled order, and the same array in memory."""
    whole = np.arange(7 * 2 * 3, dtype=np.int16).reshape(7, 2, 3)
    rows = [np.array([6, 0, 3]), np.array([1]), np.array([5, 2, 4])]
    files = []
    for k, global_rows in enumerate(rows):
        with RowWriter(tmp_path / f"part{k}.npy", len(global_rows), (2, 3), np.int16) as writer:
            for local, row in reversed(list(enumerate(global_rows))):  # any write order
                writer.write(local, whole[row])
        files.append(tmp_path / f"part{k}.npy")
    return ShardedArray(files, rows), whole


@pytest.mark.parametrize("key", [
    3, -1, slice(None), slice(1, 6, 2), [5, 0, 5, 2], np.array([True, False, True, True, False, False, True]),
    (slice(None), 1), ([4, 1], 0, 2), (2, slice(0, 2)), Ellipsis,
])
def test_sharded_rows_index_like_the_array_in_memory(sharded: tuple[ShardedArray, np.ndarray], key: object) -> None:
    array, whole = sharded
    np.testing.assert_array_equal(array[key], whole[key])


def test_sharded_array_shape_materialisation_and_pickle(sharded: tuple[ShardedArray, np.ndarray]) -> None:
    array, whole = sharded
    assert array.shape == whole.shape and array.dtype == whole.dtype and len(array) == 7 and array.ndim == 3
    np.testing.assert_array_equal(np.asarray(array), whole)
    assert array.max() == whole.max() and array.astype(np.float32).dtype == np.float32
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(array))[[6, 1]], whole[[6, 1]])
    with pytest.raises(IndexError):
        array[7]
    with pytest.raises(AttributeError):
        array.no_such_method  # noqa: B018


def test_row_writer_files_are_plain_npy_with_unwritten_rows_zero(tmp_path: Path) -> None:
    with RowWriter(tmp_path / "a.npy", 3, (2,), np.float16) as writer:
        writer.write(1, np.array([0.5, 2.0]))
        with pytest.raises(ValueError, match="shape"):
            writer.write(0, np.zeros(3))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.array([[0, 0], [0.5, 2.0], [0, 0]], np.float16))


def test_rows_that_are_not_a_permutation_are_refused(tmp_path: Path) -> None:
    for k in range(2):
        with RowWriter(tmp_path / f"p{k}.npy", 2, (1,), np.uint8):
            pass
    with pytest.raises(ValueError, match="permutation"):
        ShardedArray([tmp_path / "p0.npy", tmp_path / "p1.npy"], [np.array([0, 1]), np.array([1, 2])])


def test_saved_set_loads_equal_and_batches_gather_from_the_shards(tmp_path: Path) -> None:
    written = make_tiny_processed(tmp_path / "p", n=20)
    loaded = load_processed(tmp_path / "p")
    assert isinstance(loaded.arrays["image"], ShardedArray) and isinstance(loaded.arrays["label"], np.ndarray)
    for name, values in written.arrays.items():
        np.testing.assert_array_equal(np.asarray(loaded.arrays[name]), values, err_msg=name)
    index = np.array([7, 2, 19])
    for name, tensor in to_batch(loaded, index).items():
        np.testing.assert_array_equal(tensor.numpy(), to_batch(written, index)[name].numpy(), err_msg=name)
    subset = loaded.subset(index)
    assert isinstance(subset.arrays["image"], ShardedArray), "a subset reads no volume"
    np.testing.assert_array_equal(subset.arrays["image"][[2, 0]], written.arrays["image"][index[[2, 0]]])
    np.testing.assert_array_equal(subset.arrays["label"], written.arrays["label"][index])
    assert has_processed(tmp_path / "p") and not has_processed(tmp_path / "nothing")


def test_the_digest_follows_the_content(tmp_path: Path) -> None:
    make_tiny_processed(tmp_path / "a", seed=0)
    make_tiny_processed(tmp_path / "b", seed=0)
    make_tiny_processed(tmp_path / "c", seed=1)
    assert processed_digest(tmp_path / "a") == processed_digest(tmp_path / "b") != processed_digest(tmp_path / "c")


def test_a_folder_of_the_earlier_arrays_npz_layout_still_loads(tmp_path: Path) -> None:
    written = make_tiny_processed(tmp_path / "new", n=12)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    np.savez(legacy / ARRAYS_FILE, **written.arrays)
    write_json(legacy / META_FILE, written.meta)
    loaded = load_processed(legacy)
    for name, values in written.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], values, err_msg=name)
    assert has_processed(legacy) and len(processed_digest(legacy)) == 32
