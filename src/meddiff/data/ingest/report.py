"""``reports/ingest/``: ``validation.json`` (the counts), ``validation.html`` and one GX result per table.

``validation.json`` always holds ``records_in``, ``accepted`` and ``quarantined`` (with
``records_in == accepted + quarantined``), counts per reason and per kind, the manifest's size and
modalities, the Bundle entries not read, how the de-identification key was obtained and each suite's
outcome (``docs/data.md``).
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from meddiff.data.deid import DEID_METHOD
from meddiff.data.validation import TableValidation
from meddiff.io import write_json


def html_summary(summary: dict[str, Any], expectations: Mapping[str, list[dict[str, Any]]]) -> str:
    """A one-page HTML view of the counts and of every expectation's outcome (``expectations``: per table,
    :attr:`meddiff.data.validation.TableValidation.expectations`)."""
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{html.escape(str(e['expectation']))}</td>"
        f"<td>{html.escape(str(e['column']))}</td><td>{'✔' if e['success'] else '✘'}</td>"
        f"<td>{e['unexpected_count']}</td><td>{html.escape(str(e['reason']))}</td></tr>"
        for t, listed in expectations.items() for e in listed
    )
    reasons = "".join(f"<li>{html.escape(str(k))}: {v}</li>" for k, v in summary["quarantined_by_reason"].items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>meddiff ingest validation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
        "</head><body><h1>Ingest validation</h1>"
        f"<p>records in: {summary['records_in']}, accepted: {summary['accepted']}, "
        f"quarantined: {summary['quarantined']}</p><h2>Quarantined by reason</h2><ul>{reasons}</ul>"
        "<h2>great-expectations suites</h2><table><tr><th>table</th><th>expectation</th><th>column</th>"
        f"<th>ok</th><th>unexpected</th><th>reason</th></tr>{rows}</table></body></html>\n"
    )


def validation_report(summary: dict[str, Any], manifest: pd.DataFrame, ignored_entries: Counter,
                      key_source: str, validations: dict[str, TableValidation]) -> dict[str, Any]:
    """The ``validation.json`` payload: the ledger's ``summary`` plus the manifest and suite outcomes."""
    key = ("environment" if key_source.startswith("environment")
           else "ephemeral, derived from cohort.json (synthetic data only)")
    return {
        **summary,
        "manifest_patients": len(manifest),
        "modalities": {k: int(manifest[k].sum()) for k in ("has_image", "has_note", "has_labs")},
        "ignored_bundle_entries": dict(sorted(ignored_entries.items())),
        "deidentification": {"method": DEID_METHOD, "key": key},
        "gx_suites": {
            table: {"success": v.success, "rows": v.n_rows, "expectations": v.expectations}
            for table, v in validations.items()
        },
    }


#: Keys of a great-expectations result that list the failing rows themselves (raw record ids such as
#: ``note/P00007`` and raw values): they belong in the quarantine, never in a report.
GX_ROW_KEYS = frozenset({
    "partial_unexpected_index_list", "unexpected_index_list", "unexpected_index_query",
    "partial_unexpected_list", "unexpected_list", "partial_unexpected_counts",
})


def without_rows(node: Any) -> Any:
    """A GX result without the keys of :data:`GX_ROW_KEYS`, at any depth (counts and percentages stay)."""
    if isinstance(node, dict):
        return {k: without_rows(v) for k, v in node.items() if k not in GX_ROW_KEYS}
    if isinstance(node, list):
        return [without_rows(v) for v in node]
    return node


def write_report(report_dir: Path, payload: dict[str, Any], validations: dict[str, TableValidation]) -> None:
    """Write ``validation.json``, ``validation.html`` and ``gx/<table>.json`` into ``report_dir``.

    The GX results keep their counts but not the failing rows (:func:`without_rows`): those rows carry
    raw identifiers, and each rejected record is already in the quarantine with its reason.
    """
    (report_dir / "gx").mkdir()
    for table, validation in validations.items():
        write_json(report_dir / "gx" / f"{table}.json", without_rows(validation.result_json))
    write_json(report_dir / "validation.json", payload)
    expectations = {table: validation.expectations for table, validation in validations.items()}
    (report_dir / "validation.html").write_text(html_summary(payload, expectations), encoding="utf-8")
