"""Synthesized speech from espeak-ng: many voices, pitches and speeds reading any sentences, offline.

espeak-ng comes from PyPI's `espeakng-loader` (bundles libespeak-ng and its voice data; no apt needed) or
from the system (Debian `libespeak-ng1` + `espeak-ng-data`); it is driven through ctypes.

    >>> from speechssl.espeak import list_voices, synthesize, synthesized_corpus
    >>> list_voices("en")[:3]                      # doctest: +SKIP
    ['en+f1', 'en+f2', 'en+f3']
    >>> wave = synthesize("seven three two", "en-us+m3", pitch=40, rate=150)   # float32, 16 kHz
    >>> corpus = synthesized_corpus(["Hello there.", "Seven."], 100, seed=0)  # doctest: +SKIP

A voice is `<language voice>+<variant>`: the language voice sets accent and pronunciation ("en-us",
"en-gb-scotland", "fr", "es-419"), the variant the speaker ("m1".."m7" male, "f1".."f5" female, "klatt"
formant-synthesizer voices). Speaker variation is real but partial (an MFCC + logistic-regression speaker-ID
over 20 English accent x variant voices scores 0.66): it widens a corpus of recorded speech, it is not one.

Reproducibility: libespeak-ng carries synthesizer state from one utterance to the next (no API resets it),
so :func:`synthesize` in a long-lived process gives slightly different samples for the same call.
:func:`synthesized_corpus` therefore synthesizes in chunks of `CHUNK_SIZE` utterances, each in a fresh
worker process with the noise generator seeded: the same (sentences, count, seed) gives the same samples on
every run and any `num_proc` (checked by a test), with the same library version.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np

from speechssl import _espeak_engine
from sslcore.errors import UserError

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16_000
"""Rate of everything this module returns (espeak-ng itself synthesizes at 22,050 Hz)."""
CORPUS_FORMAT_VERSION = 1
"""Bump when synthesis or storage changes, so cached corpora built by older code are not reused."""
CHUNK_SIZE = 32
"""Utterances per fresh worker process: start-up (~0.1 s) against a few ms per utterance."""
DEFAULT_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                    "klatt3")
"""Speaker variants that sound like people (espeak also ships robots, whispers and croaks)."""
EXCLUDED_LANGUAGE_VOICES = ("en-shaw",)
"""Language voices that expect another script (Shavian) and cannot read ordinary text."""
PITCH_LIMITS = (0, 100)
RATE_LIMITS = (80, 450)
"""Words per minute espeak-ng accepts (175 is its default)."""

INSTALL_HINT = ("pip install espeakng-loader (bundles libespeak-ng and its voices), or on Debian apt-get install "
                "libespeak-ng1 espeak-ng-data")


class EspeakUnavailableError(UserError, RuntimeError):
    """No libespeak-ng could be loaded; the message says what to install."""


class EspeakError(UserError, ValueError):
    """A bad voice, pitch, rate or sentence list; the message says what is valid."""


@functools.cache
def _located() -> tuple[str, str | None]:
    located = _espeak_engine.locate_library()
    if located is None:
        raise EspeakUnavailableError(f"espeak-ng is not installed: {INSTALL_HINT}")
    return located


@functools.cache
def _engine() -> _espeak_engine.Engine:
    """The in-process engine (loaded once; see the module note on reproducibility)."""
    library, data_path = _located()
    try:
        return _espeak_engine.Engine(library, data_path)
    except OSError as error:
        raise EspeakUnavailableError(f"cannot load espeak-ng from {library} ({error}): {INSTALL_HINT}") from None


def espeak_available() -> bool:
    """Whether libespeak-ng (with its voice data) can be loaded here."""
    try:
        _engine()
    except EspeakUnavailableError:
        return False
    return True


def espeak_version() -> str:
    return _engine().version


@functools.cache
def _voice_table() -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    """({language voice name: its languages}, variant names), names as `SetVoiceByName` takes them (lower case)."""
    engine = _engine()
    languages = {identifier.rsplit("/", 1)[-1].lower(): tuple(langs) for identifier, langs in engine.voices()}
    variants = frozenset(identifier.rsplit("/", 1)[-1] for identifier, _ in engine.voices(variants=True))
    return languages, variants


def list_voices(language: str = "en", variants: Sequence[str] = DEFAULT_VARIANTS) -> list[str]:
    """Every `<language voice>+<variant>` for the language voices that speak `language` ("en" covers en,
    en-us, en-gb-scotland, en-029...; "en-us" only American ones), sorted."""
    table, known_variants = _voice_table()
    unknown = sorted(set(variants) - known_variants)
    if unknown:
        raise EspeakError(f"unknown espeak-ng variants {unknown}; known: {', '.join(sorted(known_variants))}")
    language = language.lower()
    names = sorted(name for name, langs in table.items() if name not in EXCLUDED_LANGUAGE_VOICES
                   and any(lang == language or lang.startswith(language + "-") for lang in langs))
    if not names:
        spoken = sorted({lang.split("-")[0] for langs in table.values() for lang in langs})
        raise EspeakError(f"espeak-ng has no voice for language {language!r}; it has: {', '.join(spoken)}")
    return [f"{name}+{variant}" for name in names for variant in variants]


def check_voice(voice: str, pitch: int = 50, rate: int = 175) -> None:
    """Raise EspeakError unless `voice` names a language voice (and an optional `+variant`) espeak-ng has,
    and pitch and rate are in range. (espeak-ng itself falls back to a default voice on unknown names.)"""
    table, variants = _voice_table()
    name, _, variant = voice.partition("+")
    if name.lower() not in table:
        raise EspeakError(f"espeak-ng has no language voice {name!r} (in {voice!r}); see list_voices(language), "
                          f"e.g. {', '.join(list_voices('en')[:3])}")
    if variant and variant not in variants:
        raise EspeakError(f"espeak-ng has no variant {variant!r} (in {voice!r}); use one of "
                          f"{', '.join(DEFAULT_VARIANTS)} (the human-sounding ones of the {len(variants)} espeak-ng ships)")
    if not PITCH_LIMITS[0] <= pitch <= PITCH_LIMITS[1]:
        raise EspeakError(f"pitch must be in {PITCH_LIMITS[0]}..{PITCH_LIMITS[1]} (50 = the voice's own), got {pitch}")
    if not RATE_LIMITS[0] <= rate <= RATE_LIMITS[1]:
        raise EspeakError(f"rate must be in {RATE_LIMITS[0]}..{RATE_LIMITS[1]} words per minute, got {rate}")


def _to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    from speechssl.audio import resample

    return resample(samples.astype(np.float32) / 32768.0, rate, SAMPLING_RATE).astype(np.float32, copy=False)


def synthesize(text: str, voice: str, *, pitch: int = 50, rate: int = 175) -> np.ndarray:
    """`text` read by `voice` at `pitch` (0-100, 50 = the voice's own) and `rate` (words per minute):
    float32 mono in [-1, 1] at 16 kHz. Runs in this process (see the module note on reproducibility)."""
    check_voice(voice, pitch, rate)
    engine = _engine()
    return _to_16k(engine.synthesize(text, voice, pitch, rate), engine.sample_rate)


# --------------------------------------------------------------------------------------------------
# A corpus: a seeded plan, synthesized in fresh worker processes, cached
# --------------------------------------------------------------------------------------------------

FEATURES = datasets.Features({
    "utterance_id": datasets.Value("string"),
    "audio": datasets.Audio(sampling_rate=SAMPLING_RATE, decode=False),
    "text": datasets.Value("string"),
    "voice": datasets.Value("string"),
    "pitch": datasets.Value("int32"),
    "rate": datasets.Value("int32"),
    "num_samples": datasets.Value("int64"),
})
"""`audio` holds 16-bit WAV bytes (decode=False: `datasets` decodes audio with torchcodec + FFmpeg, which many
machines lack); read it with `speechssl.audio.decode_audio_value`, or cast to `Audio(decode=True)` where
torchcodec works."""


def plan_utterances(sentences: Sequence[str], num_utterances: int, seed: int, voices: Sequence[str],
                    pitch_range: tuple[int, int], rate_range: tuple[int, int]) -> list[tuple[str, str, int, int]]:
    """[(text, voice, pitch, rate)]: sentences, voices, pitches and speeds drawn with replacement from `seed`."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(sentences), size=num_utterances)
    voice_picks = rng.integers(len(voices), size=num_utterances)
    pitches = rng.integers(pitch_range[0], pitch_range[1] + 1, size=num_utterances)
    rates = rng.integers(rate_range[0], rate_range[1] + 1, size=num_utterances)
    return [(sentences[s], voices[v], int(p), int(r)) for s, v, p, r in zip(picks, voice_picks, pitches, rates)]


def _synthesize_chunk(items: list[tuple[str, str, int, int]], seed: int, timeout_s: float) -> list[np.ndarray]:
    """int16 arrays at the library's rate, from a fresh worker process (so the result depends on `items` only)."""
    library, data_path = _located()
    request = json.dumps({"library": library, "data_path": data_path, "seed": seed, "items": items}).encode()
    done = subprocess.run([sys.executable, _espeak_engine.__file__], input=request, capture_output=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise EspeakUnavailableError(f"the espeak-ng worker failed (exit {done.returncode}): "
                                     f"{said[-1] if said else 'no message'}; {INSTALL_HINT}")
    out, at = [], 0
    for _ in items:
        count = int.from_bytes(done.stdout[at: at + 8], "little")
        out.append(np.frombuffer(done.stdout, dtype="<i2", count=count, offset=at + 8))
        at += 8 + 2 * count
    return out


def _wav_bytes(waveform: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, waveform, SAMPLING_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def synthesized_corpus(sentences: Sequence[str], num_utterances: int, seed: int = 0,
                       cache_dir: str | os.PathLike[str] = "~/.cache/selfsup", *,
                       voices: Sequence[str] | None = None, pitch_range: tuple[int, int] = (25, 75),
                       rate_range: tuple[int, int] = (130, 230), num_proc: int = 1,
                       timeout_s: float = 600.0) -> datasets.Dataset:
    """`num_utterances` clips of `sentences` read by `voices` (default: every English voice x
    DEFAULT_VARIANTS) at pitches and rates drawn uniformly from the ranges, all from `seed`.

    Columns: `utterance_id` ("espeak-<seed>-<index>"), `audio` (16 kHz 16-bit WAV, a `datasets.Audio` feature;
    see FEATURES), `text`, `voice`, `pitch`, `rate`, `num_samples`. Built once and cached under
    `<cache_dir>/espeak/<hash of everything that decides the content>`; `num_proc` worker processes at a
    time (the result does not depend on it).
    """
    sentences = [" ".join(str(s).split()) for s in sentences]
    sentences = [s for s in sentences if any(ch.isalnum() for ch in s)]
    if not sentences:
        raise EspeakError("synthesized_corpus needs sentences with at least one letter or digit; got none")
    if num_utterances < 1:
        raise EspeakError(f"num_utterances must be at least 1, got {num_utterances}")
    voices = list(voices) if voices is not None else list_voices("en")
    if not voices:
        raise EspeakError("voices is empty; give some, e.g. list_voices('en')")
    for low_high, limits, what in ((pitch_range, PITCH_LIMITS, "pitch_range"), (rate_range, RATE_LIMITS, "rate_range")):
        if not limits[0] <= low_high[0] <= low_high[1] <= limits[1]:
            raise EspeakError(f"{what} must be (low, high) within {limits[0]}..{limits[1]}, got {low_high}")
    for voice in sorted(set(voices)):
        check_voice(voice)
    engine = _engine()
    key = hashlib.sha256(json.dumps([
        CORPUS_FORMAT_VERSION, engine.version, CHUNK_SIZE, hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
        num_utterances, seed, voices, list(pitch_range), list(rate_range)]).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / "espeak" / key
    if (cache / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(cache))

    plan = plan_utterances(sentences, num_utterances, seed, voices, pitch_range, rate_range)
    chunks = [plan[start: start + CHUNK_SIZE] for start in range(0, len(plan), CHUNK_SIZE)]
    with ThreadPoolExecutor(max_workers=max(1, num_proc)) as pool:  # threads only wait on worker processes
        results = list(pool.map(lambda ic: _synthesize_chunk(ic[1], seed * 1_000_003 + ic[0], timeout_s),
                                enumerate(chunks)))
    rows = []
    for index, ((text, voice, pitch, rate), samples) in enumerate(zip(plan, (s for r in results for s in r))):
        waveform = _to_16k(samples, engine.sample_rate)
        rows.append({"utterance_id": f"espeak-{seed}-{index}", "audio": {"bytes": _wav_bytes(waveform), "path": None},
                     "text": text, "voice": voice, "pitch": pitch, "rate": rate, "num_samples": waveform.size})
    # Audio(decode=False) still imports torchcodec to encode: build the Arrow struct, then cast (pure Arrow).
    plain = FEATURES.copy()
    plain["audio"] = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    dataset = datasets.Dataset.from_list(rows, features=plain).cast(FEATURES)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    dataset.save_to_disk(str(tmp))
    if cache.exists():  # another process built it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, cache)
    seconds = sum(row["num_samples"] for row in rows) / SAMPLING_RATE
    logger.info("espeak-ng corpus: %d utterances, %.2f h, %d voices (cached in %s)", len(rows), seconds / 3600,
                len(set(voices)), cache)
    return datasets.load_from_disk(str(cache))
