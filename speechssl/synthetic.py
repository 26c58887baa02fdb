"""Speech-like audio synthesized from a seed: a source-filter "babble" for tests and offline smoke runs.

Each clip is a sequence of syllables: a voiced vowel (a glottal pulse train at a gliding pitch through
two formant resonators, like a crude Klatt synthesizer) optionally preceded by a fricative (shaped
noise), with pauses between. It has what a contrastive speech model can learn from -- pitch, formant
transitions, onsets, silences -- and needs nothing but NumPy and SciPy, so tests never touch the network. It is
not speech: use the real corpora (`asterisk-en`, `speech-mixed`) for anything you report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (F1, F2) in Hz of a few vowels (average adult values).
VOWEL_FORMANTS = ((730, 1090), (270, 2290), (300, 870), (530, 1840), (570, 840), (660, 1720), (440, 1020))


def _resonator(signal: np.ndarray, frequency: float, bandwidth: float, rate: int) -> np.ndarray:
    """Second-order IIR resonance (a formant) at `frequency` with `bandwidth`, in Hz."""
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bandwidth / rate)
    return lfilter([1 - r], [1.0, -2 * r * np.cos(2 * np.pi * frequency / rate), r * r], signal)


def babble(seed: int, seconds: float = 1.5, rate: int = 16_000) -> np.ndarray:
    """One clip of `seconds` of syllable-like sound, float32 in [-1, 1], determined by `seed`."""
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total, dtype=np.float64)
    base_pitch = rng.uniform(90, 240)  # one "speaker" per clip
    position = int(rng.uniform(0.02, 0.1) * rate)
    while position < total:
        if rng.random() < 0.4:  # fricative onset: band-limited noise
            length = int(rng.uniform(0.04, 0.1) * rate)
            noise = np.diff(rng.standard_normal(length + 1)) * 0.08
            end = min(position + length, total)
            out[position:end] += noise[: end - position] * np.hanning(length)[: end - position]
            position = end
        length = int(rng.uniform(0.08, 0.25) * rate)
        end = min(position + length, total)
        n = end - position
        if n <= 0:
            break
        pitch = base_pitch * np.linspace(1.0, rng.uniform(0.8, 1.25), n)
        phase = np.cumsum(pitch / rate)
        pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
        f1, f2 = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))]
        voiced = _resonator(pulses, f1, 80, rate) + 0.5 * _resonator(pulses, f2, 120, rate)
        out[position:end] += voiced * np.hanning(n) * rng.uniform(0.3, 1.0)
        position = end + int(rng.uniform(0.02, 0.15) * rate)  # pause
    out += rng.standard_normal(total) * 1e-3  # room noise
    return (0.9 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def write_babble_folder(folder: str | Path, count: int, seed: int = 0, rate: int = 16_000,
                        seconds: tuple[float, float] = (0.8, 2.5)) -> list[Path]:
    """Write `count` WAV clips of random lengths in `seconds` to `folder` (created); returns their paths."""
    import soundfile as sf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.random.default_rng(seed).uniform(*seconds, size=count)
    paths = []
    for i, length in enumerate(lengths):
        path = folder / f"babble-{seed}-{i:04d}.wav"
        sf.write(path, babble(seed * 100_003 + i, float(length), rate), rate, subtype="PCM_16")
        paths.append(path)
    return paths
