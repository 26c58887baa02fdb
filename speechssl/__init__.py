"""selfsup speech: audio corpora (decode, resample, cache) and wav2vec 2.0 contrastive pretraining."""

from speechssl import wav2vec2  # noqa: F401  (registers wav2vec2)
from speechssl.audio import AudioDataConfig, AudioDataError, decode_audio_value, load_audio
from speechssl.wav2vec2 import Wav2Vec2Objective, Wav2Vec2PretrainConfig

__all__ = ["AudioDataConfig", "AudioDataError", "Wav2Vec2Objective", "Wav2Vec2PretrainConfig", "decode_audio_value",
           "load_audio"]
