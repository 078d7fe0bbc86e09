"""The processed-data contract between ``preprocess`` and every later stage.

``data/processed/`` holds:

* ``meta.json``: class names, tabular feature names/units/scaler statistics, shapes, split counts, and
  under :data:`STORAGE_KEY` the index of the array files below;
* ``arrays/<name>.npy``: the per-patient arrays of :data:`ARRAY_SPEC` except the volumes, one row per
  patient in ``patient_id`` order (small: O(N) bytes each);
* ``shards/<i>-of-<n>/{image,lesion_mask,rows}.npy``: the volumes (:data:`SHARDED_ARRAYS`) of the patients
  of one shard (:mod:`.sharding`), ``rows.npy`` giving each shard row's row in the whole set. Nothing
  reads them whole: :class:`ShardedArray` gathers the rows asked for with positioned reads (``os.pread``),
  so a stage's memory does not grow with the cohort (a mapped file's touched pages would count in the
  process's resident set, hence reads, not ``mmap``);
* ``tokenizer.json``: the note tokenizer (Hugging Face ``tokenizers`` format), fitted on training notes.

A folder written before this layout (one ``arrays.npz``, :data:`ARRAYS_FILE`) is still read.

``meta.json`` and ``tokenizer.json`` are the *preprocessing artefacts*: everything preprocess fitted
(tokenizer, tabular scaler statistics, class names, image parameters and channels, note length).
``train`` copies them into ``<model>/preprocessing/`` (:func:`copy_preprocessing_artefacts`), so a
registered model carries them and new data are preprocessed in *apply mode* without refitting
(``meddiff.data.preprocess.run_preprocess_apply``); apply mode puts every patient in split
:data:`APPLY_SPLIT` and an unknown diagnosis as :data:`UNKNOWN_LABEL`.

Only numpy is imported here, so readers stay cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import MODALITIES
from meddiff.io import atomic_file, read_json, write_json

#: the single-file layout of earlier versions (still read by :func:`load_processed`)
ARRAYS_FILE = "arrays.npz"
#: folder of the per-patient arrays other than the volumes, one ``<name>.npy`` each
ARRAYS_DIR = "arrays"
#: folder of the shards' volume arrays, one sub-folder per shard
SHARDS_DIR = "shards"
#: in a shard folder: the row of the whole set of each shard row, (n_shard,) int64
ROWS_FILE = "rows.npy"
#: the arrays stored per shard (the volumes: nearly all the bytes)
SHARDED_ARRAYS: tuple[str, ...] = ("image", "lesion_mask")
#: ``meta.json`` key of the storage index: ``{"format", "arrays": {name: file}, "shards": [folder, ...]}``
STORAGE_KEY = "storage"
#: version of the layout under :data:`STORAGE_KEY`
STORAGE_FORMAT = 2
#: bytes read at a time when hashing a file
_READ_BLOCK = 1 << 20
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: the split of every patient preprocessed in apply mode (new patients, an external drop)
APPLY_SPLIT = "predict"
#: ``label`` of a patient whose diagnosis is not known (an unlabelled drop of new patients)
UNKNOWN_LABEL = -1
#: sub-folder of a model folder holding the preprocessing artefacts it was trained with
PREPROCESSING_DIR = "preprocessing"
#: the files that make up the preprocessing artefacts
PREPROCESSING_FILES: tuple[str, ...] = (META_FILE, TOKENIZER_FILE)

#: name -> (dtype, shape description). N patients, D/H/W voxels, L note tokens, F tabular features.
ARRAY_SPEC: dict[str, tuple[str, str]] = {
    "patient_id": ("str", "(N,) pseudonymous patient id"),
    "label": ("int64", "(N,) index into meta['class_names'], UNKNOWN_LABEL (-1) when not known"),
    "split": ("str", "(N,) one of train/val/test, or APPLY_SPLIT (predict) in apply mode"),
    "site": ("str", "(N,) acquisition site"),
    "image": ("float16", "(N, C, D, H, W) channels in [0, 1] (meta['image_channels'], data.brain.IMAGE_CHANNELS), "
              "RAS, cropped around the brain"),
    "lesion_mask": ("uint8", "(N, 1, D, H, W) ground-truth lesion mask on the image's grid, 0 where none"),
    "has_lesion_mask": ("bool", "(N,) whether a ground-truth mask exists"),
    "token_ids": ("int32", "(N, L) note token ids, 0 = [PAD]"),
    "token_mask": ("bool", "(N, L) True for real tokens"),
    "tabular": ("float32", "(N, F) standardised with training-split statistics, imputed"),
    "tabular_missing": ("bool", "(N, F) True where the raw value was missing"),
    "modality_present": ("bool", "(N, 3) availability of image, text, tabular in the data"),
}
#: arrays a processed set may hold besides :data:`ARRAY_SPEC` (aligned on N when present)
OPTIONAL_ARRAY_SPEC: dict[str, tuple[str, str]] = {
    "lesion_contrast_hu": ("float32", "(N,) contrast of the masked lesion to the surrounding brain (HU, from the "
                           "cohort's lesion ledger), NaN without a lesion or a ledger"),
}


class ShardedArray:
    """A read-only (N, ...) array whose rows live in ``.npy`` files of several shards.

    Indexing reads only the rows asked for (``os.pread``, one read per run of consecutive rows of a file) and
    returns an ``np.ndarray``; the files are never mapped or read whole. Anything that needs the whole array
    (``np.asarray(a)``, ``a.max()``) gets it materialised, as from the ``arrays.npz`` of earlier versions.

    Args:
        files: one ``.npy`` file per shard, all with the same row shape and dtype.
        rows: per file, the row of the whole array of each of its rows; together a permutation of ``0..N-1``.

    Raises:
        ValueError: the files disagree on row shape or dtype, or the rows are not a permutation.
    """

    #: ``np.ndarray`` methods answered on the materialised array
    MATERIALISING: tuple[str, ...] = ("min", "max", "any", "all", "sum", "mean", "astype", "copy", "reshape",
                                      "tolist", "flatten", "ravel")

    def __init__(self, files: Sequence[str | Path], rows: Sequence[np.ndarray]) -> None:
        if len(files) != len(rows) or not files:
            raise ValueError(f"need one rows array per file, got {len(files)} files and {len(rows)} rows arrays")
        self.files = [Path(f) for f in files]
        headers = [_npy_header(f) for f in self.files]
        row_shapes = {h[0][1:] for h in headers}
        dtypes = {h[1] for h in headers}
        if len(row_shapes) != 1 or len(dtypes) != 1:
            raise ValueError(f"{self.files}: row shapes {row_shapes} / dtypes {dtypes} differ between shards")
        self._offsets = [h[2] for h in headers]
        self._row_shape: tuple[int, ...] = row_shapes.pop()
        self._dtype = dtypes.pop()
        n = sum(h[0][0] for h in headers)
        self._file_of = np.full(n, -1, dtype=np.int32)
        self._local_of = np.zeros(n, dtype=np.int64)
        for k, (header, global_rows) in enumerate(zip(headers, rows, strict=True)):
            global_rows = np.asarray(global_rows, dtype=np.int64)
            if len(global_rows) != header[0][0] or (len(global_rows) and
                                                    (global_rows.min() < 0 or global_rows.max() >= n)):
                raise ValueError(f"{self.files[k]}: {header[0][0]} rows but a row map of {len(global_rows)} "
                                 f"entries in 0..{n - 1}")
            self._file_of[global_rows] = k
            self._local_of[global_rows] = np.arange(len(global_rows))
        if (self._file_of < 0).any() or np.bincount(self._file_of, minlength=len(files)).tolist() != [
                h[0][0] for h in headers]:
            raise ValueError(f"{self.files}: the shards' row maps are not a permutation of 0..{n - 1}")
        self._handles: dict[int, Any] = {}

    def view(self, rows: np.ndarray) -> ShardedArray:
        """The rows ``rows`` (in that order) as a :class:`ShardedArray` over the same files: nothing is read."""
        rows = self._rows(rows)
        view = object.__new__(ShardedArray)
        view.__dict__.update({**self.__dict__, "_file_of": self._file_of[rows], "_local_of": self._local_of[rows],
                              "_handles": {}})
        return view

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._file_of), *self._row_shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def ndim(self) -> int:
        return 1 + len(self._row_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self._dtype.itemsize

    def __len__(self) -> int:
        return len(self._file_of)

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.files)})"

    def __getitem__(self, key: Any) -> np.ndarray:
        row_key, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(row_key, (int, np.integer)):
            row = int(row_key) + (len(self) if int(row_key) < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {row_key} out of range for {len(self)} rows")
            out = self.take(np.array([row]))[0]
        else:
            out = self.take(self._rows(row_key))
            rest = (slice(None), *rest)
        return out[rest] if rest else out

    def _rows(self, row_key: Any) -> np.ndarray:
        if row_key is Ellipsis:
            return np.arange(len(self))
        if isinstance(row_key, slice):
            return np.arange(len(self))[row_key]
        index = np.asarray(row_key)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean row index of shape {index.shape} for {len(self)} rows")
            return np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"rows must be integers, a slice or a boolean mask, got {index.dtype}")
        index = index.astype(np.int64).reshape(-1)
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return index

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), ...) the rows ``rows`` (0 ≤ row < N), read in file order, returned in the order asked."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self._row_shape), dtype=self._dtype)
        row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self._dtype.itemsize
        flat = out.reshape(len(rows), -1).view(np.uint8) if len(rows) else out
        order = np.lexsort((self._local_of[rows], self._file_of[rows]))
        files, local = self._file_of[rows][order], self._local_of[rows][order]
        start = 0
        while start < len(order):  # runs of consecutive rows of one file: one read each
            stop = start + 1
            while stop < len(order) and files[stop] == files[start] and local[stop] == local[stop - 1] + 1:
                stop += 1
            data = self._read(int(files[start]), int(local[start]), stop - start, row_bytes)
            block = np.frombuffer(data, dtype=np.uint8).reshape(stop - start, row_bytes)
            flat[order[start:stop]] = block
            start = stop
        return out

    def _read(self, file_index: int, first_row: int, n_rows: int, row_bytes: int) -> bytes:
        handle = self._handles.get(file_index)
        if handle is None:
            handle = self._handles[file_index] = open(self.files[file_index], "rb")  # noqa: SIM115 (kept open)
        size = n_rows * row_bytes
        data = os.pread(handle.fileno(), size, self._offsets[file_index] + first_row * row_bytes)
        if len(data) != size:
            raise OSError(f"{self.files[file_index]}: short read ({len(data)} of {size} bytes)")
        return data

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        whole = self.take(np.arange(len(self)))
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        if name in ShardedArray.MATERIALISING:
            return getattr(np.asarray(self), name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to another process

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            handle.close()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered ``.npy`` file."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order or dtype.hasobject:
            raise ValueError(f"{path}: expected a C-ordered array of plain values")
        return tuple(shape), dtype, handle.tell()


class RowWriter:
    """Writes an (n_rows, *row_shape) ``.npy`` file one row at a time (``os.pwrite``), rows never written
    staying zero; the file is sized up front (sparse) and never mapped, so memory stays one row."""

    def __init__(self, path: str | Path, n_rows: int, row_shape: Sequence[int], dtype: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        self.n_rows = n_rows
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (n_rows, *self.row_shape)}
        self._handle = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        np.lib.format.write_array_header_1_0(self._handle, header)
        self._offset = self._handle.tell()
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._handle.truncate(self._offset + n_rows * self._row_bytes)

    def write(self, row: int, values: np.ndarray) -> None:
        """Write row ``row`` (0 ≤ row < n_rows); ``values`` must have the row shape (cast to the dtype)."""
        if not 0 <= row < self.n_rows:
            raise IndexError(f"{self.path}: row {row} out of range for {self.n_rows} rows")
        data = np.ascontiguousarray(values, dtype=self.dtype)
        if data.shape != self.row_shape:
            raise ValueError(f"{self.path}: row of shape {data.shape}, expected {self.row_shape}")
        os.pwrite(self._handle.fileno(), data.tobytes(), self._offset + row * self._row_bytes)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ProcessedDataset:
    """All processed arrays plus metadata, as written by ``preprocess``; the volumes (:data:`SHARDED_ARRAYS`)
    of a folder read by :func:`load_processed` are :class:`ShardedArray` (rows read on indexing)."""

    arrays: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    vocabulary: dict[int, str] = field(default_factory=dict)  # token id → token, from tokenizer.json

    def __len__(self) -> int:
        return len(self.arrays["label"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def n_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def n_tabular(self) -> int:
        return int(self.arrays["tabular"].shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def indices(self, split: str) -> np.ndarray:
        if split not in (*SPLITS, APPLY_SPLIT):
            raise ValueError(f"split must be one of {(*SPLITS, APPLY_SPLIT)}, got {split!r}")
        return np.flatnonzero(self.arrays["split"] == split)

    def subset(self, index: np.ndarray) -> ProcessedDataset:
        """The patients ``index``; volumes that are :class:`ShardedArray` stay on disk (a view), the rest in memory."""
        return ProcessedDataset({k: v.view(index) if isinstance(v, ShardedArray) else v[index]
                                 for k, v in self.arrays.items()}, self.meta, self.vocabulary)


def validate_arrays(arrays: dict[str, Any]) -> None:
    """Check that every array of the contract is present and aligned on the patient axis."""
    missing = sorted(set(ARRAY_SPEC) - set(arrays))
    if missing:
        raise ValueError(f"processed arrays are missing {missing}")
    n = len(arrays["label"])
    for name in [*ARRAY_SPEC, *(k for k in OPTIONAL_ARRAY_SPEC if k in arrays)]:
        if len(arrays[name]) != n:
            raise ValueError(f"array {name!r} has {len(arrays[name])} rows, expected {n}")
    if arrays["modality_present"].shape[1:] != (len(MODALITIES),):
        raise ValueError(f"modality_present must be (N, {len(MODALITIES)})")
    unknown = set(np.unique(arrays["split"]).tolist()) - {*SPLITS, APPLY_SPLIT}
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}")


def shard_folder(directory: str | Path, name: str) -> Path:
    """The folder of shard ``name`` (``00000-of-00001``) inside a processed folder."""
    return Path(directory) / SHARDS_DIR / name


def save_array(path: Path, values: np.ndarray) -> None:
    """``values`` as the ``.npy`` file ``path`` (atomically; no pickled objects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as handle:
        np.save(handle, np.asarray(values), allow_pickle=False)


def save_processed(directory: str | Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write in-memory ``arrays`` and ``meta`` into ``directory`` in the layout above, as one shard
    (each file atomically). Stages that stream their volumes write shards themselves and call
    :func:`write_processed`."""
    validate_arrays(arrays)
    shard = shard_folder(directory, "00000-of-00001")
    for name in SHARDED_ARRAYS:
        save_array(shard / f"{name}.npy", arrays[name])
    save_array(shard / ROWS_FILE, np.arange(len(arrays["label"]), dtype=np.int64))
    write_processed(directory, {k: v for k, v in arrays.items() if k not in SHARDED_ARRAYS}, meta,
                    [shard.relative_to(directory)])


def write_processed(directory: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                    shards: Iterable[str | Path]) -> None:
    """Write the per-patient ``arrays`` (all but :data:`SHARDED_ARRAYS`) and ``meta.json`` with the storage
    index over ``shards`` (folders relative to ``directory``, each with :data:`SHARDED_ARRAYS` and
    :data:`ROWS_FILE` already written). Checks the whole set against the contract first.

    Raises:
        ValueError: an array is missing or misaligned, or the shards' rows are not a permutation of the patients.
    """
    directory = Path(directory)
    shards = [Path(s).as_posix() for s in shards]
    storage = {"format": STORAGE_FORMAT, "arrays": {name: f"{ARRAYS_DIR}/{name}.npy" for name in arrays},
               "shards": shards}
    validate_arrays({**arrays, **_sharded_arrays(directory, storage)})
    for name, values in arrays.items():
        save_array(directory / storage["arrays"][name], values)
    write_json(directory / META_FILE, {**meta, STORAGE_KEY: storage})


def _sharded_arrays(directory: Path, storage: dict[str, Any]) -> dict[str, ShardedArray]:
    rows = [np.load(directory / shard / ROWS_FILE, allow_pickle=False) for shard in storage["shards"]]
    return {name: ShardedArray([directory / shard / f"{name}.npy" for shard in storage["shards"]], rows)
            for name in SHARDED_ARRAYS}


def has_processed(directory: str | Path) -> bool:
    """Whether ``directory`` holds processed data (this layout or the earlier ``arrays.npz``)."""
    directory = Path(directory)
    return (directory / ARRAYS_FILE).is_file() or (
        (directory / META_FILE).is_file() and STORAGE_KEY in read_json(directory / META_FILE))


def load_processed(directory: str | Path) -> ProcessedDataset:
    """Read what ``preprocess`` wrote: the per-patient arrays in memory, the volumes as :class:`ShardedArray`;
    errors name the missing file."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    meta = read_json(meta_path) if meta_path.is_file() else None
    if meta is not None and STORAGE_KEY in meta:
        storage = meta[STORAGE_KEY]
        if storage.get("format") != STORAGE_FORMAT:
            raise ValueError(f"{meta_path}: storage format {storage.get('format')}, this code reads {STORAGE_FORMAT}")
        arrays: dict[str, Any] = {name: np.load(directory / file, allow_pickle=False)
                                  for name, file in storage["arrays"].items()}
        arrays.update(_sharded_arrays(directory, storage))
    else:
        arrays_path = directory / ARRAYS_FILE
        if not arrays_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found (nor {ARRAYS_FILE}); run `meddiff preprocess` first")
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = read_json(meta_path)
    validate_arrays(arrays)
    return ProcessedDataset(arrays, meta, load_vocabulary(directory))


def processed_digest(directory: str | Path) -> str:
    """MD5 identifying the processed data: of ``arrays.npz`` in the earlier layout (the hash DVC recorded), else
    of every array file of the storage index, in index order (names and contents)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    storage = read_json(meta_path).get(STORAGE_KEY) if meta_path.is_file() else None
    if storage is None:
        return _file_md5(directory / ARRAYS_FILE)
    files = [*storage["arrays"].values(),
             *(f"{shard}/{name}" for shard in storage["shards"] for name in (*(f"{a}.npy" for a in SHARDED_ARRAYS),
                                                                              ROWS_FILE))]
    digest = hashlib.md5(usedforsecurity=False)
    for file in files:
        digest.update(file.encode())
        digest.update(_file_md5(directory / file).encode())
    return digest.hexdigest()


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def load_vocabulary(directory: str | Path) -> dict[int, str]:
    """Token id → token string from ``tokenizer.json`` (empty when there is no tokenizer file)."""
    tokenizer_file = Path(directory) / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return {index: token for token, index in tokenizer.get_vocab().items()}



def copy_preprocessing_artefacts(processed_dir: str | Path, target_dir: str | Path) -> list[str]:
    """Copy the preprocessing artefacts (:data:`PREPROCESSING_FILES`) of ``processed_dir`` into
    ``target_dir`` (created); return the names copied. A processed set without notes' tokenizer (hand-made
    test data) has no ``tokenizer.json``: then only ``meta.json`` is copied, and apply mode will refuse it.

    Raises:
        FileNotFoundError: ``processed_dir`` has no ``meta.json``.
    """
    import shutil

    source, target = Path(processed_dir), Path(target_dir)
    if not (source / META_FILE).is_file():
        raise FileNotFoundError(f"{source / META_FILE}: not found; run `meddiff preprocess` first")
    target.mkdir(parents=True, exist_ok=True)
    copied = [name for name in PREPROCESSING_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, target / name)
    return copied
