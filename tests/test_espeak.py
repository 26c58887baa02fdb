"""speechssl.espeak: voices, synthesis that follows pitch and rate, a seeded corpus that is bit-reproducible
(whatever num_proc) and cached, the `espeak-en` audio source, speech-mixed's synthesized-only fallback, and
the one-line error when espeak-ng is missing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from speechssl import _espeak_engine, audio, espeak
from speechssl.audio import AudioDataConfig, AudioDataError, decode_audio_value, load_audio

needs_espeak = pytest.mark.skipif(not espeak.espeak_available(), reason="espeak-ng not installed "
                                  "(pip install espeakng-loader)")

SENTENCES = ["Seven three two.", "The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
             "Please enter your account number followed by the pound key."]


def fundamental_hz(wave: np.ndarray, rate: int = 16_000) -> float:
    """Median pitch of the voiced 40 ms frames, by autocorrelation (60-400 Hz)."""
    frame, estimates = int(0.04 * rate), []
    for start in range(0, len(wave) - frame, frame):
        x = wave[start: start + frame] - wave[start: start + frame].mean()
        if np.sqrt(np.mean(x**2)) < 0.05 * np.abs(wave).max():
            continue
        ac = np.correlate(x, x, "full")[frame - 1:]
        low, high = rate // 400, rate // 60
        lag = low + int(np.argmax(ac[low:high]))
        if ac[lag] > 0.3 * ac[0]:
            estimates.append(rate / lag)
    return float(np.median(estimates))


def test_missing_espeak_is_one_clear_error(monkeypatch) -> None:
    for cached in (espeak._located, espeak._engine, espeak._voice_table):
        cached.cache_clear()
    monkeypatch.setattr(_espeak_engine, "locate_library", lambda: None)
    try:
        assert not espeak.espeak_available()
        with pytest.raises(espeak.EspeakUnavailableError, match="pip install espeakng-loader"):
            espeak.synthesize("seven", "en-us+m3")
        with pytest.raises(espeak.EspeakUnavailableError, match="pip install espeakng-loader"):
            espeak.synthesized_corpus(SENTENCES, 3, cache_dir="/nonexistent")
    finally:
        for cached in (espeak._located, espeak._engine, espeak._voice_table):
            cached.cache_clear()


@needs_espeak
def test_voices_and_bad_input() -> None:
    english = espeak.list_voices("en")
    assert {"en-us+m3", "en+f2", "en-gb-scotland+klatt"} <= set(english)
    assert len(english) == len(set(english)) >= 8 * len(espeak.DEFAULT_VARIANTS)
    assert all(v.split("+")[0] in ("es", "es-419") for v in espeak.list_voices("es"))
    with pytest.raises(espeak.EspeakError, match="no language voice 'xx'"):
        espeak.synthesize("seven", "xx+m3")
    with pytest.raises(espeak.EspeakError, match="no variant 'zz'"):
        espeak.synthesize("seven", "en+zz")  # espeak-ng itself would silently use its default voice
    with pytest.raises(espeak.EspeakError, match="pitch must be in 0..100"):
        espeak.synthesize("seven", "en+m3", pitch=120)
    with pytest.raises(espeak.EspeakError, match="no voice for language 'tlh'"):
        espeak.list_voices("tlh")


@needs_espeak
def test_synthesis_is_16k_speech_that_follows_pitch_and_rate() -> None:
    text = "Seven three two, nine four one, five five eight."
    normal = espeak.synthesize(text, "en-us+m3")
    assert normal.dtype == np.float32 and normal.ndim == 1 and 0.05 < np.abs(normal).max() <= 1.0
    assert 2.0 < len(normal) / 16_000 < 6.0  # nine digits at 175 words per minute
    fast = espeak.synthesize(text, "en-us+m3", rate=350)
    assert len(fast) < 0.7 * len(normal)
    low, high = (fundamental_hz(espeak.synthesize(text, "en-us+m3", pitch=p)) for p in (10, 90))
    assert high > 1.3 * low, (low, high)


@needs_espeak
def test_corpus_is_seeded_bit_reproducible_whatever_num_proc_and_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(espeak, "CHUNK_SIZE", 8)  # 3 chunks: worker boundaries are exercised
    voices = ["en-us+m3", "en+f2", "en-gb-scotland+klatt"]
    one = espeak.synthesized_corpus(SENTENCES, 20, seed=5, cache_dir=tmp_path / "a", voices=voices, num_proc=1)
    two = espeak.synthesized_corpus(SENTENCES, 20, seed=5, cache_dir=tmp_path / "b", voices=voices, num_proc=2)
    assert one.column_names == ["utterance_id", "audio", "text", "voice", "pitch", "rate", "num_samples"]
    assert one["audio"] == two["audio"] and one["voice"] == two["voice"]  # same bytes, incl. Klatt noise
    assert set(one["voice"]) == set(voices) and set(one["text"]) <= set(SENTENCES)
    assert len(set(one["pitch"])) > 5 and all(25 <= p <= 75 for p in one["pitch"])
    wave = decode_audio_value(one[0]["audio"])
    assert wave.dtype == np.float32 and len(wave) == one[0]["num_samples"] and np.abs(wave).max() > 0.05
    other = espeak.synthesized_corpus(SENTENCES, 20, seed=6, cache_dir=tmp_path / "a", voices=voices)
    assert other["audio"] != one["audio"]

    monkeypatch.setattr(espeak, "_synthesize_chunk", lambda *a: pytest.fail("synthesized again, not cached"))
    again = espeak.synthesized_corpus(SENTENCES, 20, seed=5, cache_dir=tmp_path / "a", voices=voices)
    assert again["audio"] == one["audio"]


@needs_espeak
def test_espeak_source_and_speech_mixed_falls_back_to_synthesized_alone(tmp_path: Path, monkeypatch,
                                                                         caplog) -> None:
    text_file = tmp_path / "sentences.txt"
    text_file.write_text("\n\n".join(SENTENCES * 3) + "\n")
    settings = dict(cache_dir=str(tmp_path / "cache"), validation_fraction=0.0, synthesized_utterances=12,
                    synthesized_sentences=[str(text_file)], synthesized_num_proc=1)
    splits = load_audio(AudioDataConfig(sources=["espeak-en"], **settings))["train"]
    assert len(splits) == 12 and set(splits["language"]) == {"en"}
    assert all(row["speaker"] in espeak.list_voices("en") and row["text"] in SENTENCES for row in splits)

    def offline(config):
        raise AudioDataError("`apt-get download ...` failed (exit 100)")

    for name in audio.REAL_SPEECH_SOURCES:
        monkeypatch.setitem(audio._SOURCES, name, audio._SOURCES[name].__class__(name, offline, "test"))
    with caplog.at_level(logging.WARNING, logger="speechssl.audio"):
        mixed = load_audio(AudioDataConfig(sources=["speech-mixed"], **settings))["train"]
    assert set(mixed["source"]) == {"espeak-en"} and len(mixed) == 12
    assert "no real speech could be fetched" in caplog.text and "synthesized espeak-ng speech alone" in caplog.text
