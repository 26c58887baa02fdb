"""Audio corpora for pretraining: a registry of sources, each decoded to 16 kHz mono and cached.

Every split returned by :func:`load_audio` has the columns

- ``source``      -- the source the clip came from (a registered name, a local folder, ``hf:...``);
- ``clip_id``     -- ``"<source>#<path or index within the source>"``: unique and stable across rebuilds;
- ``audio``       -- the waveform, float32 at ``sampling_rate`` (16 kHz), mono, loudness as recorded;
- ``num_samples`` -- its length (what length-bucketed batching sorts by);
- ``speaker``     -- who (or which voice) said it: ``"it_IT_f_Menardi"``, ``"en-us+m3"`` (espeak), ``""`` unknown;
- ``language``    -- ``"en"``, ``"fr"``, ``"cmn"``... (``""`` unknown);
- ``prompt``      -- what was said, as an id shared across voices: ``"digits/7"`` (``""`` unknown);
- ``text``        -- its transcript where the package has one (``"seven"``; the sentence espeak read), else ``""``.

Sources (see :func:`list_audio_sources`):

- real recorded speech shipped by Debian packages (fetched once with `apt-get download`, sha256-pinned in
  `sslcore.fetch`): ``asterisk-en``/``-es``/``-fr``/``-it``/``-ru`` (telephone prompts, digits, letters;
  8 kHz WAV, one voice each, transcripts), the same recordings at 16 kHz as ``asterisk-en-g722``... (G.722,
  decoded with PyPI ``g722``), second voices with the same prompt ids: ``asterisk-it-menardi`` (WAV),
  ``asterisk-fr-armelle`` and ``asterisk-es-co`` (headerless GSM); ``klettres`` (letters and syllables in 24
  languages), ``gcin`` (Mandarin syllables, two speakers), ``tuxpaint`` (sentences describing stamps, 13
  languages, ~3 h);
- ``espeak-en``: espeak-ng voices reading sentences of text corpora (`speechssl.espeak`; seeded, cached);
- ``speech-mixed``: every real source above that can be fetched (not the G.722 duplicates) plus a synthesized
  share (``espeak-en``), skipping (with a warning) those that cannot be had; with no registry answering it is
  the synthesized part alone, with a warning;
- a local folder (searched recursively) or file of WAV/FLAC/OGG/MP3 (or .opus/.aiff/.au);
- ``hf:<name>[:<config>]``: any `datasets` dataset with an audio column (needs the Hub or its cache).

Decoding is `soundfile` (libsndfile: WAV, FLAC, OGG Vorbis/Opus, MP3, headerless GSM; no FFmpeg) and
PyPI `g722` for ``.g722``; stereo is
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
import functools
import gzip
import hashlib
import importlib.util
import io
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
from sslcore.fetch import FetchError, fetch_package_files, fetched_archive, package_cache_dir, pin_package

logger = logging.getLogger(__name__)

AUDIO_FORMAT_VERSION = 2
"""Bump when decoding, resampling or splitting changes, so cached corpora built by older code are not reused."""

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".gsm", ".g722")

FEATURES = datasets.Features({
    "source": datasets.Value("string"),
    "clip_id": datasets.Value("string"),
    "audio": datasets.List(datasets.Value("float32")),
    "num_samples": datasets.Value("int64"),
    "speaker": datasets.Value("string"),
    "language": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "text": datasets.Value("string"),
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
    synthesized_utterances: int = 2000
    """Utterances of the `espeak-en` source (and so of the synthesized share of `speech-mixed`)."""
    synthesized_sentences: list[str] = field(default_factory=lambda: ["gensim-wiki", "gensim-lee"])
    """Text corpora (`textssl.corpus` sources) whose sentences espeak-ng reads."""
    synthesized_max_words: int = 20
    """Sentences longer than this are not read (training crops are a few seconds anyway)."""
    synthesized_num_proc: int = 2
    """espeak-ng worker processes at a time (the result does not depend on it)."""


# --------------------------------------------------------------------------------------------------
# Source registry
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """One file (or in-memory file) of a source, with what is known about it."""

    clip_id: str
    """Id within the source (a relative path): stable across rebuilds and machines."""
    path: str | None = None
    """An audio file `read_audio` decodes (by suffix: .gsm is headerless GSM, .g722 is G.722)..."""
    data: bytes | None = None
    """...or the bytes of one (WAV, FLAC, OGG)."""
    speaker: str = ""
    language: str = ""
    prompt: str = ""
    text: str = ""


ClipLister = Callable[[AudioDataConfig], "list[Clip] | list[tuple[str, str]]"]
"""`lister(config)` -> [Clip] (or [(clip id within the source, path of an audio file)]), fetching what it needs."""


@dataclass(frozen=True)
class AudioSource:
    name: str
    lister: ClipLister
    description: str
    packages: tuple[tuple[str, str], ...] = ()
    """(kind, spec) of the registry packages it comes from: their fetch state is part of the cache key."""
    state: Callable[[], Any] | None = None
    """Anything else that decides its content (e.g. whether espeak-ng is installed): part of the cache key."""


_SOURCES: dict[str, AudioSource] = {}
_COMPOSITES: dict[str, list[str]] = {}


def register_audio_source(name: str, lister: ClipLister, description: str,
                          packages: tuple[tuple[str, str], ...] = (), state: Callable[[], Any] | None = None) -> None:
    """Register `name` (or replace it) so `AudioDataConfig(sources=[name])` reads the clips `lister` gives."""
    if name in _COMPOSITES or name.startswith("hf:"):
        raise ValueError(f"source name {name!r} is reserved")
    _SOURCES[name] = AudioSource(name, lister, description, packages, state)


def list_audio_sources() -> list[str]:
    return sorted([*_SOURCES, *_COMPOSITES])


def describe_audio_sources() -> dict[str, str]:
    lines = {name: source.description for name, source in _SOURCES.items()}
    lines.update({name: "every source that can be fetched: " + ", ".join(members)
                  for name, members in _COMPOSITES.items()})
    return dict(sorted(lines.items()))


def _debian_source(package: str, pattern: str, prefix: str,
                   annotator: Callable[[AudioDataConfig], Callable[[str], dict[str, str]]] | None = None) -> ClipLister:
    """Files of a Debian package matching `pattern`; ids are paths below `prefix`; `annotator(config)` gives
    the function that turns an id into speaker/language/prompt/text."""
    def lister(config: AudioDataConfig) -> list[Clip]:
        try:
            paths = fetch_package_files("debian", package, pattern, config.cache_dir, config.fetch_timeout_s)
        except FetchError as error:
            raise AudioDataError(str(error)) from error
        annotate = annotator(config) if annotator is not None else (lambda _: {})
        clips = []
        for path in paths:
            clip_id = _relative(path, prefix)
            clips.append(Clip(clip_id, str(path), **annotate(clip_id)))
        return clips

    return lister


def _relative(path: Path, prefix: str) -> str:
    """The part of a fetched file's path below `prefix` (stable ids, independent of the cache location)."""
    text = path.as_posix()
    marker = f"/files/{prefix.strip('/')}/"
    return text.split(marker, 1)[1] if marker in text else path.name


def _strip_suffix(relative: str) -> str:
    return relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative


ASTERISK_VOICES = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June", "it": "it_IT_m_Carlo",
                   "ru": "ru_RU_f_IvrvoiceRU"}
"""The voice of each `asterisk-core-sounds-LANG-wav` package (its folder under sounds/)."""

ASTERISK_SECOND_VOICES = {
    # source: (Debian package, voice folder inside it, speaker name, language, file suffix)
    "asterisk-it-menardi": ("asterisk-prompt-it-menardi-wav", "it_IT_f_Menardi", "it_IT_f_Menardi", "it", "wav"),
    "asterisk-fr-armelle": ("asterisk-prompt-fr-armelle", "fr", "fr_f_Armelle", "fr", "gsm"),
    "asterisk-es-co": ("asterisk-prompt-es-co", "es", "es_CO_f_July", "es", "gsm"),
}
"""Second speakers with the core voices' prompt ids (Menardi/Carlo, Armelle/June, July/Allison): speaker ID
and voice-disjoint splits. Their packages ship no transcript."""

# Debian bookworm archives of the packages added here (the core voices are pinned in sslcore.fetch).
for _spec, _file, _digest, _version in (
    ("asterisk-core-sounds-es", "asterisk-core-sounds-es_1.6.1-1_all.deb",
     "9afdab7f559f036649fb406e625899306ca1004df8ebe39c30bfbd5912d66f74", "1.6.1-1"),
    ("asterisk-core-sounds-fr", "asterisk-core-sounds-fr_1.6.1-1_all.deb",
     "04c82c78c570c43a7136cbc5e2488d0c470b775468dff9fbce4a131b18cf1056", "1.6.1-1"),
    ("asterisk-core-sounds-it", "asterisk-core-sounds-it_1.6.1-1_all.deb",
     "3884d9457e12f21caa018c18f0d587df5d53ebea14b673d8453a134c5941ab3b", "1.6.1-1"),
    ("asterisk-core-sounds-ru", "asterisk-core-sounds-ru_1.6.1-1_all.deb",
     "28a61616bb0cd3345a7ea532dec4df9f071e5d0fa9f8c1a563ea9669002f39ab", "1.6.1-1"),
    ("asterisk-core-sounds-en-g722", "asterisk-core-sounds-en-g722_1.6.1-1_all.deb",
     "38c5261820b406dcb0ecb37675720da2b0864850690690352ca52707eb623806", "1.6.1-1"),
    ("asterisk-core-sounds-es-g722", "asterisk-core-sounds-es-g722_1.6.1-1_all.deb",
     "e4e3b4281057d3b81b779298fd6be705f57411513955c518eed1bcaabbd615b8", "1.6.1-1"),
    ("asterisk-core-sounds-fr-g722", "asterisk-core-sounds-fr-g722_1.6.1-1_all.deb",
     "7add61d5e42279ecff1bbdf842a5a946ac3644fac9a0fe44384731aa7270c8e0", "1.6.1-1"),
    ("asterisk-core-sounds-it-g722", "asterisk-core-sounds-it-g722_1.6.1-1_all.deb",
     "46b4cf7afc508a5fcfc051b7ea233251c0d195dd4ef83cc4b7facb4c6429b016", "1.6.1-1"),
    ("asterisk-core-sounds-ru-g722", "asterisk-core-sounds-ru-g722_1.6.1-1_all.deb",
     "673b4238a6b8269960f055d868c6a11083f7a0d00979167cb01554046b48ed9b", "1.6.1-1"),
    ("asterisk-prompt-it-menardi-wav", "asterisk-prompt-it-menardi-wav_1%3a1.4.22+mm20110907-3.1_all.deb",
     "3094530d98f8758ac275572d59624c41f60969fef883f34f4886d144f3dfeb21", "1:1.4.22+mm20110907-3.1"),
    ("asterisk-prompt-fr-armelle", "asterisk-prompt-fr-armelle_20070613-2.2_all.deb",
     "162570b1a9b3512a98f06b89f60c7c17cf1b9b52297315adca9a4e5be728bea3", "20070613-2.2"),
    ("asterisk-prompt-es-co", "asterisk-prompt-es-co_0.20070403-2.1_all.deb",
     "6702696e045514699e87dc8fb70f370717e5df91f821f7bec8dd0df1be008e83", "0.20070403-2.1"),
):
    pin_package("debian", _spec, _file, _digest, _version)


def asterisk_transcripts(language: str, config: AudioDataConfig) -> dict[str, str]:
    """{prompt id ("digits/7"): transcript ("seven")} of the core voice of `language`, from Debian
    asterisk-core-sounds-LANG's core-sounds-LANG.txt.gz; tones ("[beep]") are left out. {} (with a warning)
    when the package cannot be fetched: the clips are still usable, without text."""
    try:
        path = fetch_package_files("debian", f"asterisk-core-sounds-{language}",
                                   f"usr/share/doc/*/core-sounds-{language}.txt.gz", config.cache_dir,
                                   config.fetch_timeout_s)[0]
    except FetchError as error:
        logger.warning("no transcripts for the Asterisk %s prompts: %s", language, error)
        return {}
    transcripts = {}
    for line in gzip.decompress(path.read_bytes()).decode("utf-8-sig", errors="replace").splitlines():
        prompt, sep, text = line.partition(":")
        text = text.strip()
        if sep and not line.startswith(";") and text and not text.startswith("["):
            transcripts[prompt.strip()] = text
    return transcripts


def _asterisk_annotator(language: str, speaker: str | None = None,
                        transcripts: bool = True) -> Callable[[AudioDataConfig], Callable[[str], dict[str, str]]]:
    """Ids are "<voice folder>/<prompt>.<ext>" (or "<prompt>.<ext>" when `speaker` is given)."""
    def annotator(config: AudioDataConfig) -> Callable[[str], dict[str, str]]:
        texts = asterisk_transcripts(language, config) if transcripts else {}

        def annotate(clip_id: str) -> dict[str, str]:
            voice, rest = (speaker, clip_id) if speaker is not None else clip_id.split("/", 1)
            prompt = _strip_suffix(rest)
            return {"speaker": voice, "language": language, "prompt": prompt, "text": texts.get(prompt, "")}

        return annotate

    return annotator


def _needs_g722(lister: ClipLister) -> ClipLister:
    def checked(config: AudioDataConfig) -> list[Clip]:
        if importlib.util.find_spec("G722") is None:
            raise AudioDataError("G.722 sources need the `g722` package (a small C codec): pip install g722")
        return lister(config)

    return checked


SOUNDS = "usr/share/asterisk/sounds"
for _lang, _voice in ASTERISK_VOICES.items():
    register_audio_source(
        f"asterisk-{_lang}",
        _debian_source(f"asterisk-core-sounds-{_lang}-wav", f"{SOUNDS}/*.wav", SOUNDS, _asterisk_annotator(_lang)),
        f"Asterisk telephone prompts, digits and letters read by {_voice} (8 kHz WAV, transcripts; Debian "
        f"asterisk-core-sounds-{_lang}-wav)",
        packages=(("debian", f"asterisk-core-sounds-{_lang}-wav"), ("debian", f"asterisk-core-sounds-{_lang}")),
    )
    register_audio_source(
        f"asterisk-{_lang}-g722",
        _needs_g722(_debian_source(f"asterisk-core-sounds-{_lang}-g722", f"{SOUNDS}/*.g722", SOUNDS,
                                   _asterisk_annotator(_lang))),
        f"the asterisk-{_lang} recordings at 16 kHz (G.722, needs `pip install g722`; Debian "
        f"asterisk-core-sounds-{_lang}-g722)",
        packages=(("debian", f"asterisk-core-sounds-{_lang}-g722"), ("debian", f"asterisk-core-sounds-{_lang}")),
    )
for _name, (_package, _folder, _speaker, _lang, _suffix) in ASTERISK_SECOND_VOICES.items():
    register_audio_source(
        _name,
        _debian_source(_package, f"{SOUNDS}/{_folder}/*.{_suffix}", f"{SOUNDS}/{_folder}",
                       _asterisk_annotator(_lang, _speaker, transcripts=False)),
        f"Asterisk prompts read by {_speaker}, a second {_lang} voice (8 kHz {'WAV' if _suffix == 'wav' else 'GSM'}, "
        f"no transcripts; Debian {_package})",
        packages=(("debian", _package),),
    )


def _klettres_annotator(config: AudioDataConfig) -> Callable[[str], dict[str, str]]:
    def annotate(clip_id: str) -> dict[str, str]:  # "fr/alpha/a.ogg": the letter or syllable is the file name
        language, _, rest = clip_id.partition("/")
        return {"language": language, "prompt": _strip_suffix(rest), "text": _strip_suffix(rest).rsplit("/", 1)[-1]}

    return annotate


def _gcin_annotator(config: AudioDataConfig) -> Callable[[str], dict[str, str]]:
    def annotate(clip_id: str) -> dict[str, str]:  # "<syllable>/<speaker>.ogg": two speakers, same syllables
        syllable, _, file = clip_id.rpartition("/")
        return {"speaker": f"gcin-{_strip_suffix(file)}", "language": "cmn", "prompt": syllable, "text": syllable}

    return annotate


def _tuxpaint_annotator(config: AudioDataConfig) -> Callable[[str], dict[str, str]]:
    def annotate(clip_id: str) -> dict[str, str]:  # "animals/birds/owl_desc_fr.ogg"
        stem, _, language = _strip_suffix(clip_id).rpartition("_desc_")
        return {"language": language, "prompt": stem}

    return annotate


register_audio_source(
    "klettres", _debian_source("klettres-data", "usr/share/klettres/*.ogg", "usr/share/klettres", _klettres_annotator),
    "KLettres letters and syllables, 24 languages (44.1 kHz OGG; Debian klettres-data)",
    packages=(("debian", "klettres-data"),),
)
register_audio_source(
    "gcin", _debian_source("gcin-voice", "usr/share/gcin-voice/ogg/*.ogg", "usr/share/gcin-voice/ogg", _gcin_annotator),
    "Mandarin syllables with tones, two speakers (OGG; Debian gcin-voice)", packages=(("debian", "gcin-voice"),),
)
register_audio_source(
    "tuxpaint",
    _debian_source("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps/*_desc_*.ogg", "usr/share/tuxpaint/stamps",
                   _tuxpaint_annotator),
    "Tux Paint stamp descriptions, sentences in 13 languages, ~3 h (OGG; Debian tuxpaint-stamps-default)",
    packages=(("debian", "tuxpaint-stamps-default"),),
)


def _synthesized_sentences(config: AudioDataConfig) -> list[str]:
    """Sentences of `config.synthesized_sentences` (text corpora) of 2..synthesized_max_words words, in corpus order."""
    from textssl.corpus import CorpusConfig, load_corpus

    corpus = load_corpus(CorpusConfig(sources=list(config.synthesized_sentences), cache_dir=config.cache_dir,
                                      fetch_timeout_s=config.fetch_timeout_s))
    return [sentence for name in sorted(corpus) for document in corpus[name]["sentences"] for sentence in document
            if 2 <= len(sentence.split()) <= config.synthesized_max_words]


def _espeak_clips(config: AudioDataConfig) -> list[Clip]:
    from speechssl import espeak

    try:
        sentences = _synthesized_sentences(config)
        corpus = espeak.synthesized_corpus(sentences, config.synthesized_utterances, config.seed, config.cache_dir,
                                           voices=espeak.list_voices("en"), num_proc=config.synthesized_num_proc)
    except UserError as error:  # espeak-ng missing, a text corpus that cannot be had
        raise AudioDataError(f"espeak-en: {error}") from error
    return [Clip(row["utterance_id"], data=row["audio"]["bytes"], speaker=row["voice"], language="en",
                 text=row["text"]) for row in corpus]


def _espeak_state() -> str:
    from speechssl import espeak

    return espeak.espeak_version() if espeak.espeak_available() else "unavailable"


register_audio_source(
    "espeak-en", _espeak_clips,
    "espeak-ng voices (8 English accents x 15 variants, pitch and speed drawn from the seed) reading sentences "
    "of text corpora; needs `pip install espeakng-loader`",
    state=_espeak_state,
)

REAL_SPEECH_SOURCES = [*(f"asterisk-{lang}" for lang in ASTERISK_VOICES), *ASTERISK_SECOND_VOICES, "klettres", "gcin",
                       "tuxpaint"]
SYNTHESIZED_SOURCES = ["espeak-en"]
_COMPOSITES["speech-mixed"] = [*REAL_SPEECH_SOURCES, *SYNTHESIZED_SOURCES]


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


GSM_RATE = 8_000
"""Headerless GSM 06.10 (Asterisk's .gsm) is 8 kHz mono by definition."""
G722_RATE = 16_000


def read_audio(source: str | os.PathLike[str] | bytes) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, its sample rate) of a file or a file's bytes; stereo averaged. soundfile decodes
    (WAV, FLAC, OGG, MP3; `.gsm` as headerless GSM 06.10); `.g722` files go through PyPI's `g722` codec."""
    import soundfile as sf

    suffix = "" if isinstance(source, bytes) else Path(source).suffix.lower()
    if suffix == ".g722":
        import G722

        codes = Path(source).read_bytes()
        if not codes:
            return np.zeros(0, np.float32), G722_RATE
        return np.asarray(G722.G722(G722_RATE, 64_000).decode(codes), dtype=np.float32) / 32768.0, G722_RATE
    file = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    if suffix == ".gsm":
        data, rate = sf.read(file, dtype="float32", always_2d=True, format="RAW", subtype="GSM610",
                             samplerate=GSM_RATE, channels=1)
    else:
        data, rate = sf.read(file, dtype="float32", always_2d=True)
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0], int(rate)


def decode_audio_value(value: Any, sampling_rate: int = 16_000) -> np.ndarray:
    """float32 mono waveform at `sampling_rate` of one value of an audio column, whatever its form: a
    `datasets.Audio` value left encoded ({"bytes", "path"}, as `speechssl.espeak` stores it), a decoded one
    ({"array", "sampling_rate"}, or a torchcodec decoder), or a plain list of samples (as `load_audio` stores
    them, already at `sampling_rate`)."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        waveform, rate = read_audio(value["bytes"])
    elif isinstance(value, dict) and value.get("path") is not None and "array" not in value:
        waveform, rate = read_audio(value["path"])
    elif isinstance(value, dict):
        waveform, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    elif hasattr(value, "get_all_samples"):  # torchcodec's AudioDecoder (datasets >= 4 decoding)
        samples = value.get_all_samples()
        waveform, rate = samples.data.numpy().astype(np.float32), int(samples.sample_rate)
    else:
        return np.asarray(value, dtype=np.float32)
    waveform = waveform.mean(axis=0) if waveform.ndim > 1 else waveform
    return resample(waveform, rate, sampling_rate).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=16)
def _resampler(rate: int, target: int) -> Any:
    import torchaudio.transforms as T

    return T.Resample(rate, target)  # its sinc kernel is built once (3x faster than the functional form per call)


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`waveform` (float32, mono) from `rate` to `target` Hz with torchaudio's windowed-sinc resampler."""
    if rate == target:
        return waveform
    import torch

    with torch.no_grad():
        return _resampler(rate, target)(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))).numpy()


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


def decode_clip(path: str | bytes, config: AudioDataConfig) -> tuple[np.ndarray | None, str | None]:
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


def _list_clips(entry: str, config: AudioDataConfig) -> list[Clip]:
    if entry in _SOURCES:
        return [c if isinstance(c, Clip) else Clip(c[0], c[1]) for c in _SOURCES[entry].lister(config)]
    if entry.startswith("hf:"):
        raise AssertionError("hf: sources are read by _hf_rows")
    looks_like_path = os.sep in entry or entry.startswith(".") or Path(entry).expanduser().exists()
    if not looks_like_path:
        raise AudioDataError(f"unknown audio source {entry!r}. Known sources: "
                             + "; ".join(f"{k}: {v}" for k, v in describe_audio_sources().items())
                             + ". Or give a folder of audio files, or hf:<dataset>.")
    return [Clip(clip_id, path) for clip_id, path in _local_files(entry)]


def _subsample(items: list[Any], config: AudioDataConfig) -> list[Any]:
    if config.max_clips is None or len(items) <= config.max_clips:
        return items
    order = np.random.default_rng(config.seed).permutation(len(items))[: config.max_clips]
    return [items[i] for i in sorted(order)]


def _file_rows(entry: str, config: AudioDataConfig, report: SkipReport) -> Iterator[dict]:
    """The rows of a source; listing (and fetching) happens now and raises AudioDataError, decoding lazily."""
    clips = _subsample(_list_clips(entry, config), config)

    def rows() -> Iterator[dict]:
        for clip in clips:
            report.total += 1
            waveform, reason = decode_clip(clip.data if clip.data is not None else clip.path, config)
            if reason is not None:
                report.add(reason, clip.path or f"{entry}#{clip.clip_id}")
                continue
            yield {"source": entry, "clip_id": f"{entry}#{clip.clip_id}", "audio": waveform,
                   "num_samples": waveform.size, "speaker": clip.speaker, "language": clip.language,
                   "prompt": clip.prompt, "text": clip.text}

    return rows()


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
    return _hf_decoded_rows(entry, dataset, config, report)


def _hf_decoded_rows(entry: str, dataset: datasets.Dataset, config: AudioDataConfig,
                     report: SkipReport) -> Iterator[dict]:
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
        yield {"source": entry, "clip_id": f"{entry}#{index}", "audio": waveform, "num_samples": waveform.size,
               "speaker": "", "language": "", "prompt": "", "text": ""}


def _fingerprint(config: AudioDataConfig) -> str:
    """Cache key: the config fields that decide the content, the fetch state of packages, local file stats."""
    parts: list[Any] = [AUDIO_FORMAT_VERSION]
    for field_ in dataclasses.fields(config):
        if field_.name not in ("max_seconds", "fetch_timeout_s", "cache_dir"):
            parts.append((field_.name, getattr(config, field_.name)))
    for entry, _ in _expand(config.sources):
        if entry in _SOURCES:
            source = _SOURCES[entry]
            parts.append((entry, [fetched_archive(package_cache_dir(kind, spec, config.cache_dir)) is not None
                                  for kind, spec in source.packages], source.state() if source.state else None))
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
    report = SkipReport()
    planned: list[tuple[str, Iterator[dict]]] = []
    for entry, optional in _expand(config.sources):  # list (and fetch) every source before decoding any
        reader = _hf_rows if entry.startswith("hf:") else _file_rows
        try:
            planned.append((entry, reader(entry, config, report)))
        except AudioDataError as error:
            if not optional:
                raise
            logger.warning("skipping source %r: %s", entry, error)
    used_entries = {entry for entry, _ in planned}
    composites = [entry for entry in config.sources if entry in _COMPOSITES]
    if composites and used_entries and not used_entries & set(REAL_SPEECH_SOURCES) and not any(
            entry not in _COMPOSITES for entry in config.sources):
        logger.warning("%s: no real speech could be fetched (no package registry answered?), so this corpus is "
                       "synthesized espeak-ng speech alone: enough for a smoke run, not for figures you report",
                       ", ".join(composites))
    # Decoded clips go to Arrow files on disk as they come (hours of audio do not fit in memory as rows).
    _remove_leftovers(cache)
    build_dir = cache.with_name(f"{cache.name}.build-{os.getpid()}")
    counts: Counter = Counter()

    def decoded() -> Iterator[dict]:
        for entry, rows in planned:
            for row in rows:
                counts[entry] += 1
                yield row

    try:
        try:
            everything = datasets.Dataset.from_generator(
                decoded, features=FEATURES, cache_dir=str(build_dir), writer_batch_size=64,
                fingerprint=f"{cache.name}-{os.getpid()}")
        except ValueError:  # `datasets` refuses a generator that yielded nothing
            if sum(counts.values()):
                raise
            everything = None
        if report.counts:
            logger.warning("skipped %d of %d audio files: %s", sum(report.counts.values()), report.total,
                           report.summary())
        seconds = _save_splits(everything, config, report, cache)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    used = [f"{entry} ({counts[entry]} clips)" for entry, _ in planned]
    hours = seconds / 3600
    logger.info("audio corpus: %s; %d clips, %.2f h at %d Hz (cached in %s)", ", ".join(used), sum(counts.values()),
                hours, config.sampling_rate, cache)
    return datasets.load_from_disk(str(cache))


def _remove_leftovers(cache: Path) -> None:
    """Delete the build and temp folders of earlier builds of `cache` whose process is gone (killed mid-build)."""
    for leftover in [*cache.parent.glob(f"{cache.name}.build-*"), *cache.parent.glob(f"{cache.name}.tmp-*")]:
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(leftover, ignore_errors=True)


def _save_splits(everything: datasets.Dataset | None, config: AudioDataConfig, report: SkipReport,
                 cache: Path) -> float:
    """Split by clip id and save atomically to `cache` (temp folder, then rename); returns the seconds of audio."""
    if everything is None or len(everything) == 0:
        why = f" Every file was skipped: {report.summary()}." if report.counts else ""
        raise AudioDataError(f"no usable audio in {config.sources}.{why} Give clips of at least "
                             f"min_seconds={config.min_seconds} s with sound in them, in a format soundfile reads "
                             f"({', '.join(AUDIO_EXTENSIONS)}).")
    clip_ids = everything["clip_id"]
    held_out = np.array([is_validation_clip(clip_id, config.validation_fraction, config.seed) for clip_id in clip_ids],
                        dtype=bool)
    if held_out.all():
        raise AudioDataError(f"all {len(clip_ids)} clips fell in the validation split; lower data.validation_fraction "
                             "or add clips")
    splits = {"train": everything.select(np.flatnonzero(~held_out))}
    if config.validation_fraction > 0:
        splits["validation"] = everything.select(np.flatnonzero(held_out))
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    datasets.DatasetDict(splits).save_to_disk(str(tmp))
    if cache.exists():  # another process built it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, cache)
    return float(np.sum(everything["num_samples"])) / config.sampling_rate


def describe_audio(config: AudioDataConfig, splits: datasets.DatasetDict) -> str:
    """One paragraph for model cards: sources, clips and hours per split."""
    parts = []
    for name, split in splits.items():
        seconds = float(np.sum(split["num_samples"])) / config.sampling_rate
        parts.append(f"{name}: {len(split)} clips, {seconds / 3600:.2f} h")
    return (f"Audio from {', '.join(config.sources)} ({'; '.join(parts)}), mono, resampled to "
            f"{config.sampling_rate} Hz; crops of at most {config.max_seconds} s.")

