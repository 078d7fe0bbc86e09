"""Short emergency-department notes for the synthetic cohort.

Notes mix a presenting complaint (class-dependent, overlapping), history, an impression that is
indicative of the diagnosis only with some probability (otherwise neutral or misleading, e.g. a
"r/o ICH" in a stroke patient), negations ("no evidence of hemorrhage"), clinical abbreviations
(ICH, CVA, r/o, h/o, HTN) and occasional typos, so that text alone is only partly informative.
"""

from __future__ import annotations

import numpy as np

COMPLAINTS: dict[str, list[str]] = {
    "healthy": ["headache", "dizziness", "syncope", "minor head trauma after a fall", "blurred vision"],
    "ischemic_stroke": ["acute L sided weakness", "R facial droop", "slurred speech", "aphasia", "R arm numbness"],
    "intracerebral_hemorrhage": ["sudden severe headache", "vomiting and headache", "decreased GCS",
                                 "acute L sided weakness"],
    "brain_abscess": ["fever and headache", "new onset seizure", "confusion", "headache for 1 week"],
}
HISTORY: dict[str, list[str]] = {
    "healthy": ["no significant PMH", "h/o migraine", "h/o HTN", "DM2"],
    "ischemic_stroke": ["h/o HTN", "AF not anticoagulated", "DM2", "smoker", "h/o TIA"],
    "intracerebral_hemorrhage": ["h/o HTN poorly controlled", "on warfarin", "h/o HTN", "alcohol use"],
    "brain_abscess": ["recent sinusitis", "dental infection 3 wks ago", "IVDU", "h/o otitis media"],
}
IMPRESSIONS: dict[str, list[str]] = {
    "healthy": ["no acute intracranial abnormality", "CT head unremarkable", "likely benign headache"],
    "ischemic_stroke": ["findings c/w acute CVA", "likely ischemic stroke in MCA territory",
                        "hypodensity c/w infarct", "stroke team activated"],
    "intracerebral_hemorrhage": ["ICH noted on CT", "intraparenchymal hemorrhage",
                                 "hyperdense bleed, neurosurg consulted"],
    "brain_abscess": ["ring enhancing lesion, r/o abscess", "concern for brain abscess, ID consulted",
                      "lesion with rim enhancement, start empiric abx"],
}
#: "rule-out" phrasing that names another disease: misleading for bag-of-words models
RULE_OUTS: list[str] = ["r/o ICH", "r/o CVA", "r/o abscess", "r/o bleed", "r/o mass lesion"]
NEGATIONS: list[str] = ["no evidence of hemorrhage", "no signs of infarct", "no midline shift",
                        "no mass effect", "no fever"]
NEUTRAL: list[str] = ["awaiting imaging read", "neuro consult requested", "plan: admit for observation",
                      "labs pending", "vitals stable"]


def _typo(rng: np.random.Generator, word: str) -> str:
    if len(word) < 4:
        return word
    position = int(rng.integers(1, len(word) - 2))
    if rng.random() < 0.5:  # swap two letters
        return word[:position] + word[position + 1] + word[position] + word[position + 2 :]
    return word[:position] + word[position + 1 :]  # drop a letter


def clinical_note(
    rng: np.random.Generator, diagnosis: str, age: int, sex: str, p_indicative: float = 0.5,
    p_misleading: float = 0.15, typo_rate: float = 0.03,
) -> str:
    """A note for a patient with ``diagnosis``; indicative with probability ``p_indicative``."""
    classes = list(COMPLAINTS)
    own = diagnosis if diagnosis in COMPLAINTS else "healthy"

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    complaint_class = own if rng.random() < 0.5 else pick(classes)
    history_class = own if rng.random() < 0.5 else pick(classes)
    parts = [
        f"Pt is a {age}yo {'M' if sex == 'male' else 'F'} presenting with {pick(COMPLAINTS[complaint_class])}.",
        f"{pick(HISTORY[history_class])}.",
    ]
    draw = rng.random()
    if draw < p_indicative:
        parts.append(f"Impression: {pick(IMPRESSIONS[own])}.")
    elif draw < p_indicative + p_misleading:
        other = pick([c for c in classes if c != own])
        parts.append(f"Impression: {pick(IMPRESSIONS[other] + RULE_OUTS)}.")
    else:
        parts.append(f"{pick(NEUTRAL).capitalize()}.")
    if rng.random() < 0.5:
        parts.append(f"{pick(NEGATIONS).capitalize()}.")
    if rng.random() < 0.4:
        parts.append(f"{pick(NEUTRAL).capitalize()}.")
    words = " ".join(parts).split(" ")
    words = [_typo(rng, w) if rng.random() < typo_rate else w for w in words]
    return " ".join(words) + "\n"
