"""Downstream metrics that work offline, with the names and outputs of the Hub's `evaluate` ones.

`evaluate.load("accuracy")` fetches a script from the Hub, so it fails on an offline machine. The
same five metrics are here as plain functions (`accuracy`, `f1`, `matthews_correlation`,
`pearsonr`, `spearmanr`: same keyword arguments, same result keys) and as local `evaluate`
modules (`evaluate.load(local_module_path("f1"))` works with no network).
`load_metric(name, hub=True)` takes the Hub version when it is reachable and falls back to the
local one when it is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearsonr", "spearmanr")
METRICS = (*CLASSIFICATION_METRICS, *REGRESSION_METRICS)


def _as_arrays(predictions: Sequence, references: Sequence) -> tuple[np.ndarray, np.ndarray]:
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.ndim != 1:
        raise ValueError(f"predictions and references must be 1-d and of equal length; got shapes "
                         f"{predictions.shape} and {references.shape}")
    if len(references) == 0:
        raise ValueError("no predictions to score: the evaluated split is empty")
    return predictions, references


def _weighted(values: np.ndarray, sample_weight: Sequence[float] | None) -> np.ndarray:
    return np.ones(len(values)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)


def accuracy(predictions: Sequence, references: Sequence, normalize: bool = True,
             sample_weight: Sequence[float] | None = None) -> dict[str, float]:
    """Fraction (or weighted count, with `normalize=False`) of predictions equal to the reference."""
    predictions, references = _as_arrays(predictions, references)
    weights = _weighted(references, sample_weight)
    correct = float(np.sum(weights * (predictions == references)))
    return {"accuracy": correct / float(weights.sum()) if normalize else correct}


def _per_class(predictions: np.ndarray, references: np.ndarray, labels: np.ndarray,
               weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (true positives, predicted, actual) for each of `labels`."""
    hits = [(predictions == label, references == label) for label in labels.tolist()]
    true_positive = np.array([weights[predicted & actual].sum() for predicted, actual in hits])
    predicted = np.array([weights[predicted].sum() for predicted, _ in hits])
    actual = np.array([weights[actual].sum() for _, actual in hits])
    return true_positive, predicted, actual


def f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None, pos_label: Any = 1,
       average: str | None = "binary", sample_weight: Sequence[float] | None = None) -> dict[str, Any]:
    """F1 as the Hub's `f1` computes it (scikit-learn semantics).

    `average`: binary (the F1 of `pos_label`), macro, micro, weighted, or None (one per label). A class
    never predicted and never present scores 0 (scikit-learn's `zero_division=0`).
    """
    predictions, references = _as_arrays(predictions, references)
    weights = _weighted(references, sample_weight)
    present = np.unique(np.concatenate([references, predictions]))
    if average == "binary":
        if len(present) > 2:
            raise ValueError(f"average='binary' needs at most two classes, got {len(present)}; "
                             "use average='macro' for multi-class tasks")
        labels = [pos_label]
    labels = present if labels is None else np.asarray(labels)
    true_positive, predicted, actual = _per_class(predictions, references, labels, weights)
    if average == "micro":
        denominator = predicted.sum() + actual.sum()
        return {"f1": float(2 * true_positive.sum() / denominator) if denominator else 0.0}
    denominator = predicted + actual
    per_class = np.divide(2 * true_positive, denominator, out=np.zeros(len(labels)), where=denominator > 0)
    if average is None:
        return {"f1": per_class}
    if average == "weighted":
        return {"f1": float(per_class @ actual / actual.sum()) if actual.sum() else 0.0}
    if average in ("macro", "binary"):
        return {"f1": float(per_class.mean())}
    raise ValueError(f"unknown average {average!r}; use binary, macro, micro, weighted or None")


def matthews_correlation(predictions: Sequence, references: Sequence,
                         sample_weight: Sequence[float] | None = None) -> dict[str, float]:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K); 0 where it is undefined."""
    predictions, references = _as_arrays(predictions, references)
    labels = np.unique(np.concatenate([references, predictions]))
    true_positive, predicted, actual = _per_class(predictions, references, labels,
                                                  _weighted(references, sample_weight))
    total, correct = actual.sum(), true_positive.sum()
    covariance = correct * total - predicted @ actual
    scale = np.sqrt((total**2 - predicted @ predicted) * (total**2 - actual @ actual))
    return {"matthews_correlation": float(covariance / scale) if scale > 0 else 0.0}


def pearsonr(predictions: Sequence[float], references: Sequence[float],
             return_pvalue: bool = False) -> dict[str, float]:
    """Pearson correlation (and its two-sided p-value) via scipy, as the Hub's `pearsonr`."""
    from scipy import stats

    predictions, references = _as_arrays(predictions, references)
    result = stats.pearsonr(references, predictions)
    out = {"pearsonr": float(result[0])}
    if return_pvalue:
        out["p-value"] = float(result[1])
    return out


def spearmanr(predictions: Sequence[float], references: Sequence[float],
              return_pvalue: bool = False) -> dict[str, float]:
    """Spearman rank correlation (and its p-value) via scipy, as the Hub's `spearmanr`."""
    from scipy import stats

    predictions, references = _as_arrays(predictions, references)
    result = stats.spearmanr(predictions, references)
    out = {"spearmanr": float(result[0])}
    if return_pvalue:
        out["spearmanr_pvalue"] = float(result[1])
    return out


FUNCTIONS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
             "pearsonr": pearsonr, "spearmanr": spearmanr}

DEFAULT_ARGUMENTS = {"f1": {"average": "macro"}}
"""What `compute_metrics` passes: macro-F1, so binary and multi-class tasks report the same quantity."""


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence,
                    functions: Mapping[str, Callable[..., dict[str, float]]] = FUNCTIONS,
                    arguments: Mapping[str, dict] = DEFAULT_ARGUMENTS, kind: str = "offline") -> dict[str, float]:
    """{name: value} for each metric in `names` (f1 is macro-averaged), with the local functions; a modality
    passes its own `functions` (speech adds CER/WER) and `kind` (named in the unknown-metric error)."""
    unknown = [name for name in names if name not in functions]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; {kind} metrics are: {', '.join(functions)}")
    scores: dict[str, float] = {}
    for name in names:
        scores.update(functions[name](predictions, references, **arguments.get(name, {})))
    return scores


def local_module_path(name: str) -> str:
    """Folder of the local `evaluate` module for `name`: `evaluate.load(local_module_path("f1"))`."""
    if name not in FUNCTIONS:
        raise ValueError(f"no local evaluate module {name!r}; shipped ones: {', '.join(FUNCTIONS)}")
    return str(Path(__file__).parent / "modules" / name)


def load_metric(name: str, hub: bool = False):
    """An `evaluate` module for `name`: the local one, or (with `hub=True`) the Hub's when reachable.

    An unreachable Hub (offline machine, HF_HUB_OFFLINE=1) is a warning, not an error: the local
    module computes the same values under the same names.
    """
    import evaluate

    if hub:
        try:
            return evaluate.load(name)
        except Exception as error:  # noqa: BLE001 - any Hub failure means: use the local copy
            logger.warning("evaluate.load(%r) from the Hub failed (%s: %s); using the local module",
                           name, type(error).__name__, str(error).splitlines()[0][:200])
    return evaluate.load(local_module_path(name))


_DESCRIPTIONS = {
    "accuracy": "Fraction of predictions equal to the reference label.",
    "f1": "Harmonic mean of precision and recall (binary, or averaged over classes).",
    "matthews_correlation": "Correlation between predicted and reference classes, in [-1, 1]; robust to imbalance.",
    "pearsonr": "Pearson linear correlation between predicted and reference scores.",
    "spearmanr": "Spearman rank correlation between predicted and reference scores.",
}


def module_info(name: str):
    """The `evaluate.MetricInfo` of the local module `name` (used by the scripts in modules/)."""
    import datasets
    import evaluate

    value = datasets.Value("float64" if name in REGRESSION_METRICS else "int64")
    return evaluate.MetricInfo(
        description=_DESCRIPTIONS[name] + " Computed offline by selfsup (sslcore.metrics).",
        citation="",
        inputs_description=f"predictions, references: 1-d sequences of equal length; keyword arguments as "
                           f"sslcore.metrics.{name}.",
        features=datasets.Features({"predictions": value, "references": value}),
    )
