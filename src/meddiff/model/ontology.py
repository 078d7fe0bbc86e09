"""Ontology-informed attention (proposal §3.4): clinically significant terms get a learned prior.

The vocabulary of head-CT terms ships as ``meddiff/resources/radlex_terms.json`` (RadLex ids where
verified against a RadLex export, see its ``source_note``). Every note token whose text is a term or
one of its single-word synonyms is mapped to that term; in cross-modal fusion a learned bias per
term is added to the attention logits of such tokens, so the model starts out (and may stay)
attending to findings vocabulary rather than filler words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

NO_TERM = -1


@dataclass(frozen=True)
class OntologyTerm:
    term: str
    radlex_id: str | None
    forms: tuple[str, ...]  # single-word surface forms, lowercase


@cache
def load_terms() -> tuple[OntologyTerm, ...]:
    payload = json.loads(resources.files("meddiff").joinpath("resources/radlex_terms.json").read_text())
    terms = []
    for entry in payload["terms"]:
        forms = {entry["term"].lower(), *(s.lower() for s in entry.get("synonyms", []))}
        single_words = tuple(sorted(f for f in forms if " " not in f and "-" not in f))
        terms.append(OntologyTerm(entry["term"], entry.get("radlex_id"), single_words))
    return tuple(terms)


def token_term_index(vocabulary: dict[int, str], vocab_size: int) -> np.ndarray:
    """(vocab_size,) term index of each token id, ``NO_TERM`` where the token is no ontology term."""
    index = np.full(vocab_size, NO_TERM, dtype=np.int64)
    form_to_term: dict[str, int] = {}
    for term_id, term in enumerate(load_terms()):
        for form in term.forms:
            form_to_term.setdefault(form, term_id)
    for token_id, token in vocabulary.items():
        if 0 <= token_id < vocab_size:
            index[token_id] = form_to_term.get(token.lower().removeprefix("##"), NO_TERM)
    return index
