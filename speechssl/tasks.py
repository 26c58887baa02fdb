"""Labelled speech tasks (SUPERB-style): a registry of offline benchmarks, and any `datasets` audio
dataset or local audio folder the same way.

`load_speech_task(SpeechTaskConfig(name=...))` returns a :class:`SpeechTask`: a `DatasetDict` with
`train`, `validation` and `test` splits whose columns are

- ``id``         -- a stable example id (the clip id of `speechssl.audio`);
- ``audio``      -- the waveform, float32 mono at 16 kHz (as `speechssl.audio.load_audio` stores it);
- ``speaker``    -- who (or which voice) said it, for splits by speaker and leakage checks;
- ``label``      -- a `ClassLabel` (classification tasks), or
- ``transcript`` -- the normalised text (ASR tasks; see `speechssl.metrics.normalize_transcript`);

plus the metrics to report and the one to select models on.

Built-in tasks (`list_speech_tasks()`), from real recordings that Debian packages ship (DATA.md):

- ``asterisk-speakers``: speaker (voice) identification over the Asterisk prompt voices, split by
  utterance (stratified by speaker: every speaker in every split);
- ``asterisk-en-asr``: character-level transcription of the English Asterisk prompts (Allison, ~25
  minutes): the low-resource setting of the wav2vec 2.0 paper at this project's scale. One speaker
  only (no second English voice exists offline), so this split is by utterance, not by voice;
- ``speech-keywords`` (needs espeak-ng, `pip install espeakng-loader`): Speech-Commands-like keyword
  spotting when `speechssl.espeak` is available (see :func:`_read_keywords`).

Every split is fixed by a hash of (split seed, example id) -- no library RNG, no file order -- and
`SpeechTaskSpec.sizes` records the sizes it gives, checked at every build.

Anything else: ``hf:NAME[:CONFIG]`` (a `datasets` audio dataset, e.g. ``hf:google/speech_commands:v0.02``,
``hf:openslr/librispeech_asr:clean``; needs the Hub or its cache) or a local folder following the
`audiofolder` convention: audio files plus a ``metadata.csv`` whose ``file_name`` column names them,
with a label column (classification) or a transcript column (ASR), and optionally a speaker column.
Missing validation/test splits are carved out of train: by speaker when `speaker_column` is set
(the test voices are then unheard in training), else by utterance, stratified by label.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

from sslcore.errors import UserError
from speechssl.audio import ASTERISK_VOICES, AudioDataConfig, decode_audio_value, load_audio
from speechssl.metrics import ASR_METRICS, CLASSIFICATION_METRICS, normalize_transcript
from sslcore.registry import TaskRegistry
from sslcore.splits import TaskSplitsConfig, split_digest, stratified_split

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SAMPLING_RATE = 16_000
MIN_SECONDS = 0.2
"""Task clips may be short (a digit is ~0.4 s); shorter than this is a click, not a word."""

Problem = Literal["classification", "asr"]


class SpeechTaskError(UserError, ValueError):
    """A speech task cannot be built or used; the message says what is wrong and how to fix it."""


@dataclass
class SpeechTaskConfig(TaskSplitsConfig):
    """Which labelled speech to fine-tune and score on (with the shared split options of `TaskSplitsConfig`)."""

    name: str = "asterisk-speakers"
    """A built-in task (`list_speech_tasks()`), `hf:NAME[:CONFIG]`, or a local audiofolder (audio files +
    metadata.csv with a `file_name` column)."""
    audio_column: str = "audio"
    """Audio column of `hf:` datasets (ignored by built-in tasks and audiofolders)."""
    label_column: str = "label"
    """Class column (classification). Ignored when `transcript_column` is set."""
    transcript_column: str | None = None
    """Transcript column: set it for ASR (e.g. `text` for LibriSpeech, `transcription` in an audiofolder)."""
    speaker_column: str | None = None
    """Speaker column: when set, carved splits are by speaker (no voice in two splits)."""


@dataclass
class SpeechTask:
    """Labelled speech ready to fine-tune on: splits, labels or transcripts, and metrics."""

    name: str
    splits: datasets.DatasetDict
    """train / validation / test with columns id, audio, speaker and label (or transcript)."""
    problem: Problem
    label_names: list[str] | None
    """Class names in label-id order (None for ASR)."""
    metrics: list[str]
    """Metrics reported on validation and test (`speechssl.metrics`)."""
    main_metric: str
    """The metric models are selected and compared on (for cer/wer, lower is better)."""
    description: str
    dataset_id: str
    split_by: Literal["speaker", "utterance"] = "utterance"
    """What the held-out splits are disjoint in: speakers (unheard voices) or only utterances."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 0

    @property
    def target_column(self) -> str:
        return "label" if self.problem == "classification" else "transcript"


@dataclass(frozen=True)
class SpeechTaskSpec:
    """A built-in task: how to build its examples, and its recorded split."""

    name: str
    description: str
    build: Callable[[SpeechTaskConfig], datasets.Dataset]
    """Returns every example (id, audio, speaker, label name or transcript), before the split."""
    problem: Problem
    sizes: tuple[int, int, int]
    """(train, validation, test) sizes the split gives; a build that differs is an error."""
    split_into: Callable[[datasets.Dataset], dict[str, list[int]]]
    """Row indices of each split."""
    label_names: tuple[str, ...] = ()
    split_by: Literal["speaker", "utterance"] = "utterance"
    dataset_id: str = ""
    needs: str | None = None
    """What must be reachable the first time (a package registry), or None."""

    @property
    def metrics(self) -> tuple[str, ...]:
        return CLASSIFICATION_METRICS if self.problem == "classification" else ASR_METRICS


_TASKS: TaskRegistry[SpeechTaskSpec] = TaskRegistry("speech task")
register_speech_task = _TASKS.register
list_speech_tasks = _TASKS.names
describe_speech_tasks = _TASKS.describe


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_group(groups: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Row indices per split with whole groups (speakers) kept together: the groups are ranked by a hash of
    (seed, group) and the first round(fraction x groups) go to each split of `fractions` in order, at
    least one each; the rest to train. Needs more groups than splits."""
    distinct = sorted(set(groups), key=lambda g: (_unit_hash(seed, g), g))
    if len(distinct) <= len(fractions):
        raise SpeechTaskError(f"{len(distinct)} speaker(s) cannot fill {len(fractions) + 1} splits by speaker; "
                              "add speakers, or leave speaker_column unset to split by utterance")
    assigned: dict[str, str] = {}
    start = 0
    for name, fraction in fractions.items():
        count = max(1, round(fraction * len(distinct)))
        count = min(count, len(distinct) - start - 1)
        for group in distinct[start:start + count]:
            assigned[group] = name
        start += count
    out: dict[str, list[int]] = {name: [] for name in ("train", *fractions)}
    for index, group in enumerate(groups):
        out[assigned.get(group, "train")].append(index)
    return out


def _utterance_split(strata_column: str) -> Callable[[datasets.Dataset], dict[str, list[int]]]:
    """80/10/10 by a hash of the example id, stratified by `strata_column` (speaker or label)."""
    def split(rows: datasets.Dataset) -> dict[str, list[int]]:
        return stratified_split(rows["id"], rows[strata_column], {"validation": 0.1, "test": 0.1}, seed=0)
    return split


# --------------------------------------------------------------------------------------------------
# Built-in tasks
# --------------------------------------------------------------------------------------------------


NON_SPEECH_PROMPTS = frozenset({"ascending-2tone", "beep", "beeperr", "descending-2tone", "tt-monkeys"})
"""Asterisk prompt ids that are tones or noises (their transcripts are "[beep]"...), not speech."""


def _asterisk_clips(config: SpeechTaskConfig, sources: Sequence[str]) -> datasets.Dataset:
    """Every spoken clip of these `speechssl.audio` sources (16 kHz, decoded once and cached there), with its
    speaker (the voice folder), prompt id ("digits/7") and transcript ("" where the package has none)."""
    audio = AudioDataConfig(sources=list(sources), validation_fraction=0.0, min_seconds=MIN_SECONDS,
                            cache_dir=config.cache_dir, fetch_timeout_s=config.fetch_timeout_s)
    clips = load_audio(audio)["train"]
    keep = [i for i, prompt in enumerate(clips["prompt"])
            if prompt not in NON_SPEECH_PROMPTS and not prompt.startswith("silence/")]
    return (clips.rename_column("clip_id", "id").remove_columns(["source", "num_samples", "language"])
            .select(keep))


SPEAKER_SOURCES = (*(f"asterisk-{lang}" for lang in ASTERISK_VOICES), "asterisk-it-menardi", "asterisk-fr-armelle",
                   "asterisk-es-co")
SPEAKERS = ("en_US_f_Allison", "es_CO_f_July", "es_MX_f_Allison", "fr_CA_f_June", "fr_f_Armelle", "it_IT_f_Menardi",
            "it_IT_m_Carlo", "ru_RU_f_IvrvoiceRU")
"""The 8 voices: the five core Asterisk voices, and a second Italian (Menardi), French (Armelle) and Spanish
(July, Colombian) speaker reading the same prompt ids, so two voices share each of those languages."""


def _build_speakers(config: SpeechTaskConfig) -> datasets.Dataset:
    clips = _asterisk_clips(config, SPEAKER_SOURCES).remove_columns(["prompt", "text"])
    return clips.add_column("label", list(clips["speaker"]))


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def asr_transcript(text: str) -> str:
    """An ASR target: `normalize_transcript`, with lone digits spelled out ("press 1" -> "press one"), since
    the prompts say the word and a character model cannot learn "1" from it."""
    words = normalize_transcript(text).split()
    return " ".join(_DIGIT_WORDS[int(w)] if len(w) == 1 and w.isdigit() else w for w in words)


def _build_english_asr(config: SpeechTaskConfig) -> datasets.Dataset:
    clips = _asterisk_clips(config, ["asterisk-en"])
    texts = [asr_transcript(text) for text in clips["text"]]
    keep = [i for i, text in enumerate(texts) if text]
    return clips.select(keep).remove_columns(["prompt", "text"]).add_column("transcript", [texts[i] for i in keep])


# Keyword spotting ---------------------------------------------------------------------------------

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", *_DIGIT_WORDS)
"""Speech Commands' ten command words and the ten digits."""
UNKNOWN = "unknown"
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow", "learn", "follow",
                 "forward", "backward", "visual", "hello", "water", "paper", "window", "orange", "table", "music",
                 "little", "seventy", "twenty", "open", "later", "thank you", "goodbye", "number")
"""Words of the "unknown" class in synthesized speech (Speech Commands' auxiliary words and more)."""
KEYWORD_VOICE_SPLIT = {"validation": 0.15, "test": 0.15}
"""Share of the espeak voices (accent x variant) held out for validation and for test: unheard voices."""
KEYWORD_UTTERANCES = {"train": 2400, "validation": 400, "test": 400}
"""Synthesized keyword utterances per split (from that split's voices); unknown words add a tenth more."""


REAL_UNKNOWN_CLIPS = 20
"""Real single-word recordings kept for the unknown class (a fixed hash-chosen few: Allison reads ~220 words
that are not keywords, and the test should weigh keywords, not them)."""


def _real_keyword_clips(config: SpeechTaskConfig) -> datasets.Dataset:
    """Allison's real English recordings of the keywords (digits/0-9, "no") and `REAL_UNKNOWN_CLIPS` of her
    other single words (the unknown class): the human voice every test split holds."""
    clips = _asterisk_clips(config, ["asterisk-en"])
    keywords, unknown = [], []
    for i, (clip_id, text) in enumerate(zip(clips["id"], clips["text"])):
        words = normalize_transcript(text).split()
        if len(words) == 1 and not words[0].isdigit():
            (keywords if words[0] in KEYWORDS else unknown).append((i, words[0] if words[0] in KEYWORDS else UNKNOWN,
                                                                     clip_id))
    unknown = sorted(unknown, key=lambda item: _unit_hash(0, item[2]))[:REAL_UNKNOWN_CLIPS]
    chosen = sorted(keywords + unknown)
    return (clips.select([i for i, _, _ in chosen]).remove_columns(["prompt", "text"])
            .add_column("label", [label for _, label, _ in chosen]))


def _synthesized_keywords(config: SpeechTaskConfig, voices: list[str], words: Sequence[str], count: int,
                          seed: int) -> datasets.Dataset:
    from speechssl.espeak import synthesized_corpus

    corpus = synthesized_corpus(list(words), count, seed=seed, cache_dir=config.cache_dir, voices=voices,
                                num_proc=1)
    audio = [decode_audio_value(value) for value in corpus["audio"]]
    labels = [text if text in KEYWORDS else UNKNOWN for text in corpus["text"]]
    return datasets.Dataset.from_dict(
        {"id": corpus["utterance_id"], "audio": audio, "speaker": corpus["voice"], "label": labels},
        features=datasets.Features({"id": datasets.Value("string"), "audio": datasets.List(datasets.Value("float32")),
                                    "speaker": datasets.Value("string"), "label": datasets.Value("string")}))


def _build_keywords(config: SpeechTaskConfig) -> datasets.Dataset:
    """Synthesized keywords from espeak voices split by voice, and (test only) real human recordings."""
    from speechssl.espeak import espeak_available, list_voices

    if not espeak_available():
        raise SpeechTaskError("task 'speech-keywords' synthesizes its training voices with espeak-ng, which is not "
                              "available: pip install espeakng-loader")
    voices = list_voices("en")
    voice_split = split_by_group(voices, KEYWORD_VOICE_SPLIT, seed=0)
    parts = []
    for offset, name in enumerate(SPLITS):
        split_voices = [voices[i] for i in voice_split[name]]
        count = KEYWORD_UTTERANCES[name]
        parts.append(_synthesized_keywords(config, split_voices, KEYWORDS, count, seed=10 + offset))
        parts.append(_synthesized_keywords(config, split_voices, UNKNOWN_WORDS, count // 10, seed=20 + offset))
    real = _real_keyword_clips(config)
    parts.append(real.cast(parts[0].features))
    rows = datasets.concatenate_datasets(parts)
    return rows


def _keyword_split(rows: datasets.Dataset) -> dict[str, list[int]]:
    """By voice: the synthesized utterances of each split came from that split's voices; real recordings
    (speakers that are no espeak voice) all go to test."""
    from speechssl.espeak import list_voices

    voices = list_voices("en")
    assigned = {voices[i]: name for name, indices in split_by_group(voices, KEYWORD_VOICE_SPLIT, seed=0).items()
                for i in indices}
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for index, speaker in enumerate(rows["speaker"]):
        out[assigned.get(speaker, "test")].append(index)
    return out


_ASTERISK = "Debian asterisk-core-sounds-*-wav and asterisk-prompt-* packages (apt-get download, ~20 MB each)"

register_speech_task(SpeechTaskSpec(
    name="asterisk-speakers", build=_build_speakers, problem="classification", label_names=SPEAKERS,
    sizes=(3124, 390, 390), split_into=_utterance_split("speaker"), split_by="utterance",
    description="Speaker ID: which of 8 Asterisk prompt voices said a prompt (Allison en/es, June fr, Carlo it, an ru "
                "voice, and second speakers Menardi it, Armelle fr, July es-CO); 80/10/10 split by utterance, "
                "stratified by speaker",
    dataset_id="debian/asterisk-core-sounds", needs=_ASTERISK))
register_speech_task(SpeechTaskSpec(
    name="asterisk-en-asr", build=_build_english_asr, problem="asr",
    sizes=(443, 55, 55), split_into=_utterance_split("speaker"), split_by="utterance",
    description="English ASR: the Asterisk prompts read by Allison (en_US), transcripts from core-sounds-en.txt, "
                "lowercased without punctuation, digits spelled out; 80/10/10 split by utterance (one speaker: no "
                "second English voice exists offline)",
    dataset_id="debian/asterisk-core-sounds-en", needs=_ASTERISK))
register_speech_task(SpeechTaskSpec(
    name="speech-keywords", build=_build_keywords, problem="classification",
    label_names=tuple(sorted((*KEYWORDS, UNKNOWN))), sizes=(2640, 440, 471), split_into=_keyword_split, split_by="speaker",
    description="Keyword spotting: yes/no/up/down/left/right/on/off/stop/go and the ten digits, plus 'unknown' "
                "(other words); train/validation synthesized by espeak-ng voices (accent x variant), split by voice; "
                "test = unheard espeak voices plus Allison's real recordings of the digits, 'no' and other words",
    dataset_id="espeak-ng + debian/asterisk-core-sounds-en", needs=_ASTERISK + " and espeak-ng (pip install "
                                                                               "espeakng-loader)"))


def _load_builtin(spec: SpeechTaskSpec, config: SpeechTaskConfig) -> datasets.DatasetDict:
    rows = spec.build(config)
    indices = spec.split_into(rows)
    splits = {name: rows.select(indices[name]) for name in SPLITS}
    sizes = tuple(len(splits[name]) for name in SPLITS)
    if sizes != spec.sizes:
        raise SpeechTaskError(f"task {spec.name!r} built splits of sizes {sizes}, but its recorded split is "
                              f"{spec.sizes}: the source data changed (another package version?). Clear "
                              f"{Path(config.cache_dir).expanduser() / 'audio'} and rebuild; if it persists, the "
                              "package differs from the pinned one")
    if spec.problem == "classification":
        feature = datasets.ClassLabel(names=list(spec.label_names))
        splits = {name: split.cast_column("label", feature) for name, split in splits.items()}
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------------------------------
# Local audiofolders and hf: datasets
# --------------------------------------------------------------------------------------------------


def _read_audiofolder(config: SpeechTaskConfig) -> datasets.DatasetDict:
    """An audiofolder: metadata.csv (file_name + columns) at the top, or one per split folder
    (train/, validation/, test/)."""
    root = Path(config.name).expanduser()
    if not root.is_dir():
        raise SpeechTaskError(f"unknown speech task {config.name!r}: not a built-in task "
                              f"({', '.join(list_speech_tasks())}), not hf:NAME, and no such folder")
    split_dirs = {name: root / name for name in ("train", "validation", "test") if (root / name / "metadata.csv").is_file()}
    if (root / "metadata.csv").is_file():
        split_dirs = {"train": root}
    if not split_dirs:
        raise SpeechTaskError(f"{root} holds no metadata.csv; an audiofolder needs metadata.csv with a file_name "
                              f"column naming each audio file and a {config.transcript_column or config.label_column!r} "
                              "column (or train/, validation/, test/ folders with one each)")
    out = {}
    for name, folder in split_dirs.items():
        with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "file_name" not in rows[0]:
            raise SpeechTaskError(f"{folder / 'metadata.csv'} has no file_name column (columns: "
                                  f"{list(rows[0]) if rows else 'none, the file is empty'}); name the audio file "
                                  "of each row in a file_name column")
        columns: dict[str, list] = {key: [row[key] for row in rows] for key in rows[0]}
        columns["audio"] = [str(folder / row["file_name"]) for row in rows]
        columns["id"] = [f"{name}/{row['file_name']}" for row in rows]
        out[name] = datasets.Dataset.from_dict(columns)
    return datasets.DatasetDict(out)


def _decode_batch(batch: dict[str, list], column: str) -> dict[str, list]:
    """16 kHz mono float32 of each value: a file path (audiofolder) or any form an `Audio` column takes."""
    return {"audio": [decode_audio_value({"path": value} if isinstance(value, str) else value)
                      for value in batch[column]]}


def _load_source(config: SpeechTaskConfig) -> datasets.DatasetDict:
    if not config.name.startswith("hf:"):
        return _read_audiofolder(config)
    name, _, subset = config.name.removeprefix("hf:").partition(":")
    try:
        loaded = datasets.load_dataset(name, subset or None)
    except Exception as error:  # offline, unknown name: say what works instead
        raise SpeechTaskError(
            f"cannot load {config.name} ({type(error).__name__}: {' '.join(str(error).split())[:200]}); hf: tasks "
            f"need the Hub (or its cache); offline, use a built-in task ({', '.join(list_speech_tasks())}) or a "
            "local audiofolder (audio files + metadata.csv)") from None
    for split in loaded.values():
        if config.audio_column not in split.column_names:
            raise SpeechTaskError(f"{config.name} has no audio column {config.audio_column!r}; its columns are "
                                  f"{split.column_names}: set task.audio_column")
        break
    if isinstance(next(iter(loaded.values())).features.get(config.audio_column), datasets.Audio):
        loaded = loaded.cast_column(config.audio_column, datasets.Audio(decode=False))  # soundfile decodes
    return loaded


def _pick_splits(config: SpeechTaskConfig, source: datasets.DatasetDict) -> dict[str, datasets.Dataset | None]:
    claimed = {config.train_split, config.validation_split, config.test_split}

    def named(option: str, value: str | None, default: str) -> datasets.Dataset | None:
        if value is not None:
            if value not in source:
                raise SpeechTaskError(f"task.{option}={value!r} is not a split of {config.name!r}; it has "
                                      f"{sorted(source)}")
            return source[value]
        return source[default] if default in source and default not in claimed else None

    if config.train_split not in source:
        raise SpeechTaskError(f"{config.name!r} has no split {config.train_split!r} (it has {sorted(source)}); set "
                              "task.train_split")
    return {"train": source[config.train_split], "validation": named("validation_split", config.validation_split, "validation"),
            "test": named("test_split", config.test_split, "test")}


def _check_columns(config: SpeechTaskConfig, splits: dict[str, datasets.Dataset | None]) -> None:
    wanted = {"task.transcript_column": config.transcript_column} if config.transcript_column else \
        {"task.label_column": config.label_column}
    if config.speaker_column:
        wanted["task.speaker_column"] = config.speaker_column
    for name, split in splits.items():
        if split is None:
            continue
        for option, column in wanted.items():
            if column not in split.column_names:
                close = difflib.get_close_matches(column, split.column_names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpeechTaskError(f"{option}={column!r} is not a column of the {name} split of {config.name!r}"
                                      f"{hint}; its columns are {split.column_names}. Set {option} to one of them"
                                      + ("" if config.transcript_column else ", or set task.transcript_column for ASR"))


def _carve(config: SpeechTaskConfig, splits: dict[str, datasets.Dataset | None]) -> tuple[dict[str, datasets.Dataset], str]:
    fractions = {}
    if splits["validation"] is None:
        fractions["validation"] = config.carve_validation_fraction
    if splits["test"] is None:
        fractions["test"] = config.carve_test_fraction
    by = "speaker" if config.speaker_column else "utterance"
    if not fractions:
        return dict(splits), by  # type: ignore[arg-type]
    for option, fraction in fractions.items():
        if not 0 < fraction < 1:
            raise SpeechTaskError(f"task.carve_{option}_fraction must be in (0, 1), got {fraction}")
    train = splits["train"]
    if config.speaker_column:
        indices = split_by_group([str(s) for s in train[config.speaker_column]], fractions, config.split_seed)
    else:
        keys = [f"{i}" for i in range(len(train))]
        strata = [0] * len(train) if config.transcript_column else [str(v) for v in train[config.label_column]]
        indices = stratified_split(keys, strata, fractions, config.split_seed)
    out = {name: split for name, split in splits.items() if split is not None}
    for name, chosen in indices.items():
        out[name] = train.select(sorted(chosen))
    return out, by


def _normalise(config: SpeechTaskConfig, splits: dict[str, datasets.Dataset]) -> tuple[datasets.DatasetDict, list[str] | None]:
    """id/audio/speaker/label-or-transcript columns, decoded audio, label ids from the train split's classes."""
    asr = config.transcript_column is not None
    target = config.transcript_column if asr else config.label_column
    label_names: list[str] | None = None
    if not asr:
        train_feature = splits["train"].features[target]
        label_names = (list(train_feature.names) if isinstance(train_feature, datasets.ClassLabel)
                       else sorted({str(v) for v in splits["train"][target]}))
        for name, split in splits.items():
            feature = split.features[target]
            names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else sorted({str(v) for v in split[target]})
            extra = sorted(set(names) - set(label_names))
            if extra or (isinstance(feature, datasets.ClassLabel) and names != label_names):
                raise SpeechTaskError(
                    f"label sets differ between splits of {config.name!r}: train has {label_names[:20]}, the {name} "
                    f"split has {names[:20]}; a model cannot learn classes it never sees -- relabel, or merge the "
                    "splits and let the task carve them")
    features = {"id": datasets.Value("string"), "audio": datasets.List(datasets.Value("float32")),
                "speaker": datasets.Value("string")}
    features[target_name := ("transcript" if asr else "label")] = (
        datasets.Value("string") if asr else datasets.ClassLabel(names=label_names))
    out = {}
    for name, split in splits.items():
        values = split[target]
        if asr:
            texts = [normalize_transcript(str(v)) if v is not None else "" for v in values]
            empty = [i for i, text in enumerate(texts) if not text]
            if empty:
                raise SpeechTaskError(f"{len(empty)} examples of the {name} split of {config.name!r} have an empty "
                                      f"transcript in {target!r} (first: row {empty[0]}); ASR needs text to learn and "
                                      "score: drop them first")
            targets: list = texts
        else:
            missing = sum(1 for v in values if v is None)
            if missing:
                raise SpeechTaskError(f"{missing} examples of the {name} split of {config.name!r} have no label in "
                                      f"{target!r}; drop them first")
            feature = split.features[target]
            targets = (list(values) if isinstance(feature, datasets.ClassLabel)
                       else [label_names.index(str(v)) for v in values])
        ids = split["id"] if "id" in split.column_names else [f"{name}/{i}" for i in range(len(split))]
        speakers = ([str(s) for s in split[config.speaker_column]] if config.speaker_column
                    else [""] * len(split))
        audio_column = "audio" if "audio" in split.column_names and not config.name.startswith("hf:") else config.audio_column

        decoded = split.select_columns([audio_column]).map(
            _decode_batch, batched=True, batch_size=32, fn_kwargs={"column": audio_column},
            remove_columns=[audio_column], desc=f"decoding {name}")
        table = {"id": [str(i) for i in ids], "audio": decoded["audio"], "speaker": speakers, target_name: targets}
        out[name] = datasets.Dataset.from_dict(table, features=datasets.Features(features))
    return datasets.DatasetDict(out), label_names


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_speech_task(config: SpeechTaskConfig | str, **overrides: Any) -> SpeechTask:
    """Build the task `config` names: train/validation/test, labels or transcripts, and metrics."""
    if isinstance(config, str):
        config = SpeechTaskConfig(name=config, **overrides)
    elif overrides:
        config = SpeechTaskConfig(**{**config.__dict__, **overrides})
    spec = _TASKS.get(config.name)
    if spec is not None:
        task = SpeechTask(name=spec.name, splits=_load_builtin(spec, config), problem=spec.problem,
                          label_names=list(spec.label_names) or None, metrics=list(spec.metrics),
                          main_metric=spec.metrics[0], description=spec.description, dataset_id=spec.dataset_id,
                          split_by=spec.split_by)
    else:
        looks_local = config.name.startswith(("hf:", ".", "/", "~")) or Path(config.name).expanduser().exists()
        if not looks_local:
            close = difflib.get_close_matches(config.name, list_speech_tasks(), n=1)
            raise SpeechTaskError(
                f"unknown speech task {config.name!r}{f' (did you mean {close[0]!r}?)' if close else ''}. Known: "
                + "; ".join(f"{name}: {text}" for name, text in describe_speech_tasks().items())
                + ". Or give hf:NAME[:CONFIG] or a local audiofolder (audio files + metadata.csv)")
        picked = _pick_splits(config, _load_source(config))
        _check_columns(config, picked)
        carved, split_by = _carve(config, picked)
        normalised, label_names = _normalise(config, carved)
        problem: Problem = "asr" if config.transcript_column else "classification"
        metrics = list(ASR_METRICS if problem == "asr" else CLASSIFICATION_METRICS)
        target = config.transcript_column or config.label_column
        task = SpeechTask(name=Path(config.name).name if not config.name.startswith("hf:") else config.name,
                          splits=normalised, problem=problem, label_names=label_names, metrics=metrics,
                          main_metric=metrics[0], description=f"{config.name}: {problem} on column {target!r}, split by "
                                                              f"{split_by}", dataset_id=config.name, split_by=split_by)
    for name in SPLITS:
        if len(task.splits[name]) == 0:
            raise SpeechTaskError(f"the {name} split of {config.name!r} is empty; add data or change the split options")
    if config.max_train_examples is not None:
        train = task.splits["train"]
        if config.max_train_examples < len(train):
            strata = train["label"] if task.problem == "classification" else [0] * len(train)
            keep = stratified_split(train["id"], strata, {"keep": config.max_train_examples / len(train)}, 0)["keep"]
            task.splits["train"] = train.select(sorted(keep))
    return task


def label_counts(split: datasets.Dataset) -> dict[str, int]:
    names = split.features["label"].names
    return {names[label]: count for label, count in sorted(Counter(split["label"]).items())}


def speakers_by_split(task: SpeechTask) -> dict[str, set[str]]:
    """The speakers each split holds (for leakage checks: a split by speaker shares none)."""
    return {name: set(task.splits[name]["speaker"]) for name in SPLITS}




def held_out_clip_ids(tasks: Sequence[str] = ("asterisk-en-asr", "asterisk-speakers", "speech-keywords"),
                      config: SpeechTaskConfig | None = None) -> set[str]:
    """Ids of every validation and test clip of these built-in tasks: audio a pretraining corpus must not hold,
    or the scores would be on audio the upstream has already seen."""
    config = config or SpeechTaskConfig()
    held: set[str] = set()
    for name in tasks:
        spec = _TASKS[name]
        if name == "speech-keywords":  # only its real recordings can meet a pretraining corpus
            rows = _real_keyword_clips(config)
            held.update(rows["id"])
            continue
        rows = spec.build(SpeechTaskConfig(**{**config.__dict__, "name": name}))
        indices = spec.split_into(rows)
        held.update(rows.select(indices["validation"] + indices["test"])["id"])
    return held


def write_pretraining_folder(out_dir: str | Path, sources: Sequence[str] = ("asterisk-en",),
                             tasks: Sequence[str] = ("asterisk-en-asr", "asterisk-speakers", "speech-keywords"),
                             config: SpeechTaskConfig | None = None) -> Path:
    """Write the clips of the audio `sources` that no validation or test split of `tasks` holds, as 16 kHz WAV
    files, for pretraining with `--data.sources [out_dir]`: the upstream never hears the audio it is scored on.
    Returns the folder (rewritten when it exists)."""
    import shutil

    import soundfile as sf

    config = config or SpeechTaskConfig()
    held = held_out_clip_ids(tasks, config)
    clips = load_audio(AudioDataConfig(sources=list(sources), validation_fraction=0.0, cache_dir=config.cache_dir,
                                       fetch_timeout_s=config.fetch_timeout_s))["train"]
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    written = 0
    for index, clip_id in enumerate(clips["clip_id"]):
        if clip_id in held:
            continue
        name = clip_id.replace("#", "/").replace("/", "__")
        sf.write(out_dir / (Path(name).stem + ".wav"), np.asarray(clips[index]["audio"], dtype=np.float32),
                 SAMPLING_RATE, subtype="PCM_16")
        written += 1
    logger.info("wrote %d of %d clips of %s to %s (%d held out: validation/test audio of %s)", written, len(clips),
                ", ".join(sources), out_dir, len(clips) - written, ", ".join(tasks))
    return out_dir


__all__ = ["SpeechTask", "SpeechTaskConfig", "SpeechTaskError", "SpeechTaskSpec", "describe_speech_tasks", "held_out_clip_ids",
           "label_counts", "list_speech_tasks", "load_speech_task", "register_speech_task", "split_by_group",
           "split_digest", "speakers_by_split", "write_pretraining_folder"]
