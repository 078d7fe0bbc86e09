"""The PHI scan finds identifiers in any file format and is not fooled by base64 images."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd

from meddiff.data.ingest.report import without_rows
from meddiff.data.phi_scan import find_identifiers


def test_finds_identifiers_in_every_format(tmp_path: Path) -> None:
    pd.DataFrame({"note": ["seen by Dr. Hartmann"]}).to_parquet(tmp_path / "t.parquet")
    np.savez(tmp_path / "a.npz", ids=np.array(["P00012"]))
    (tmp_path / "n.txt.gz").write_bytes(gzip.compress("Anna Weber".encode("utf-32-le")))
    (tmp_path / "clean.json").write_text('{"patient_id": "anon-1f"}')
    leaks = {leak.path.name: leak.identifiers for leak in find_identifiers([tmp_path], ["Hartmann", "P00012",
                                                                                        "Anna Weber"])}
    assert leaks == {"t.parquet": ("hartmann",), "a.npz": ("p00012",), "n.txt.gz": ("anna weber",)}


def test_base64_images_in_reports_are_not_text(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<p>anon-1f</p><img src="data:image/png;base64,AAP00003zz+/=">')
    assert find_identifiers([tmp_path], ["P00003"]) == []
    (tmp_path / "index.html").write_text("<p>P00003</p>")
    assert [leak.identifiers for leak in find_identifiers([tmp_path], ["P00003"])] == [("p00003",)]
    # a KFP HTML artefact has no suffix: recognised by its content
    (tmp_path / "index.html").unlink()
    (tmp_path / "html").write_text('<!DOCTYPE html><img src="data:image/png;base64,AAP00003zz">')
    assert find_identifiers([tmp_path], ["P00003"]) == []


def test_gx_results_keep_counts_but_not_the_failing_rows() -> None:
    result = {"results": [{"result": {
        "unexpected_count": 2, "unexpected_percent": 3.5,
        "partial_unexpected_index_list": [{"record_id": "note/P00007", "text": ""}],
        "partial_unexpected_list": ["Anna Weber"], "partial_unexpected_counts": [{"value": "", "count": 2}],
    }}]}
    assert without_rows(result) == {"results": [{"result": {"unexpected_count": 2, "unexpected_percent": 3.5}}]}
