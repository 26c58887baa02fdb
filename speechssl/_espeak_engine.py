"""ctypes binding of libespeak-ng, and the worker that synthesizes one chunk of utterances.

Imports only the standard library and NumPy, on purpose: `speechssl.espeak` runs this file as a fresh
`python` process per chunk (a fraction of a second to start, where importing `speechssl` would load torch).
Fresh processes are how a synthesized corpus stays reproducible: libespeak-ng keeps synthesizer state
across utterances (flutter phase, wave phase, echo buffer; no API resets them), so the exact samples of
an utterance depend on what the process synthesized before it. A chunk always starts from a fresh
library, with the noise generator (Klatt voices) seeded, so the same chunk gives the same samples.

Worker protocol: a JSON object on stdin, {"library", "data_path", "seed", "items": [[text, voice, pitch,
rate], ...]}; on stdout, per item, an 8-byte little-endian sample count then that many int16 samples at
the library's rate (22,050 Hz).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000  # without it a missing data folder ends the whole process
CHARS_UTF8 = 1
POS_CHARACTER = 1
PARAMETER_RATE = 1
PARAMETER_PITCH = 3

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    """`espeak_VOICE` of speak_lib.h; `languages` is a run of (priority byte, NUL-terminated name) pairs."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


def locate_library() -> tuple[str, str | None] | None:
    """(path of libespeak-ng, its data folder or None for the library's built-in default), or None when
    neither PyPI's `espeakng-loader` nor a system library (Debian `libespeak-ng1`) is installed."""
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except (ImportError, RuntimeError):
        pass
    found = ctypes.util.find_library("espeak-ng")
    return (found, None) if found else None


class Engine:
    """One loaded libespeak-ng in synchronous mode: text in, int16 samples out."""

    def __init__(self, library: str, data_path: str | None):
        lib = ctypes.CDLL(library)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode() if data_path else None,
                                     INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise OSError(f"espeak_Initialize failed for {library} with data {data_path or '(default)'}")
        self.lib = lib
        self.sample_rate = int(rate)
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it later
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0 = continue

    def seed(self, seed: int) -> None:
        """Seed the noise generator of Klatt voices (espeak-ng >= 1.52; older libraries seed from the clock)."""
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))

    def voices(self, variants: bool = False) -> list[tuple[str, list[str]]]:
        """[(identifier, languages)] of the language voices ("gmw/en-US", ["en-us", "en"]), or of the variants
        ("!v/m3", ["variant"])."""
        spec = None
        if variants:
            spec = _Voice()
            keep = ctypes.create_string_buffer(b"variant")
            spec.languages = ctypes.cast(keep, ctypes.c_void_p)
        listed = self.lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
        out = []
        for i in range(10_000):
            if not listed[i]:
                break
            voice = listed[i].contents
            languages, at = [], voice.languages
            while at and ctypes.string_at(at, 1) != b"\0":  # priority byte, then the name
                name = ctypes.string_at(at + 1).decode()
                languages.append(name)
                at += len(name) + 2
            out.append((voice.identifier.decode(), languages))
        return out

    def synthesize(self, text: str, voice: str, pitch: int, rate: int) -> np.ndarray:
        """int16 samples at `sample_rate`; `voice` as espeak names it ("en-us+m3")."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(PARAMETER_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(PARAMETER_PITCH, int(pitch), 0)
        data = text.encode() + b"\0"
        self._chunks = []
        error = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed (error {error}) on {text[:60]!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _worker() -> None:
    request = json.load(sys.stdin)
    engine = Engine(request["library"], request["data_path"])
    engine.seed(int(request["seed"]))
    out = sys.stdout.buffer
    for text, voice, pitch, rate in request["items"]:
        samples = engine.synthesize(text, voice, pitch, rate).astype("<i2", copy=False)
        out.write(int(samples.size).to_bytes(8, "little"))
        out.write(samples.tobytes())
    out.flush()


if __name__ == "__main__":
    _worker()
