"""Speech downstream metrics, offline: accuracy and macro-F1 for classification, CER and WER for ASR.

Accuracy and F1 are the project's offline versions of the Hub's `evaluate` metrics
(`sslcore.metrics`, modality-agnostic; same names and outputs). CER and WER are `jiwer`'s, the
library the field reports with (and the one the Hub's `cer`/`wer` metrics wrap): word (character)
edit distance summed over the corpus, divided by the reference word (character) count -- a
corpus-level rate, not a mean of per-utterance rates.

Transcripts are compared after `normalize_transcript` (lowercase, punctuation dropped, spaces
collapsed), the normalisation the CTC vocabulary is built with, so "Goodbye." and "goodbye" match.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from sslcore.metrics import accuracy, compute_metrics, f1

CLASSIFICATION_METRICS = ("accuracy", "f1")
"""Reported for keyword spotting and speaker ID; f1 is macro-averaged over classes."""
ASR_METRICS = ("cer", "wer")
"""Reported for ASR; lower is better (`LOWER_IS_BETTER`)."""
LOWER_IS_BETTER = frozenset(ASR_METRICS)

_KEEP = re.compile(r"[^\w' ]+")


def normalize_transcript(text: str) -> str:
    """Lowercase, NFC, punctuation (but apostrophes) to spaces, whitespace collapsed: "Hello, World!" -> "hello world"."""
    text = unicodedata.normalize("NFC", text).lower().replace("_", " ")
    return " ".join(_KEEP.sub(" ", text).split())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    if not references:
        raise ValueError("no transcripts to score: the evaluated split is empty")
    empty = [i for i, reference in enumerate(references) if not reference.strip()]
    if empty:
        raise ValueError(f"reference transcript {empty[0]} is empty ({len(empty)} empty in all); an error rate "
                         "needs words to divide by -- drop utterances without a transcript")


def wer(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Word error rate: (substitutions + deletions + insertions) / reference words, over the corpus (jiwer)."""
    import jiwer

    _check_pairs(predictions, references)
    return {"wer": float(jiwer.wer(list(references), list(predictions)))}


def cer(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Character error rate: character edit distance / reference characters (spaces count), over the corpus (jiwer)."""
    import jiwer

    _check_pairs(predictions, references)
    return {"cer": float(jiwer.cer(list(references), list(predictions)))}


FUNCTIONS = {"accuracy": accuracy, "f1": f1, "cer": cer, "wer": wer}


def compute_speech_metrics(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{name: value} for each metric in `names` (class ids for accuracy/f1, macro-F1; normalised strings for
    cer/wer)."""
    return compute_metrics(names, predictions, references, functions=FUNCTIONS, kind="speech")


def better(metric: str, a: float, b: float, min_delta: float = 0.0) -> bool:
    """Whether score `a` improves on `b` by more than `min_delta` (lower is better for error rates)."""
    return a < b - min_delta if metric in LOWER_IS_BETTER else a > b + min_delta


__all__ = ["ASR_METRICS", "CLASSIFICATION_METRICS", "LOWER_IS_BETTER", "better", "cer", "compute_speech_metrics",
           "normalize_transcript", "wer"]
