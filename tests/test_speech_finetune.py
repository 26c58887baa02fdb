"""Speech downstream protocols (speechssl.finetune): the weighted-layer probe, full fine-tuning on the shared
trainer, and exports that stock `pipeline()` runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.finetune import (
    SpeechFinetuneResult,
    WeightedLayerProbe,
    reversed_in_length,
    build_ctc_tokenizer,
    finetune,
    greedy_decode,
)
from speechssl.synthetic import babble
from sslcore.compare import Comparison
from sslcore.errors import MissingPathError

TINY_UPSTREAM = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "conv_dim": [16, 32, 32, 32], "conv_kernel": [10, 8, 4, 4], "conv_stride": [5, 4, 4, 4],
                 "feat_extract_norm": "layer", "do_stable_layer_norm": True, "num_codevectors_per_group": 16,
                 "codevector_dim": 32, "proj_codevector_dim": 32, "num_conv_pos_embeddings": 8,
                 "num_conv_pos_embedding_groups": 2, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                 "feat_proj_dropout": 0.0, "layerdrop": 0.0}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> str:
    """A stock Wav2Vec2ForPreTraining folder (random weights, as an exported pretraining run looks)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    folder = tmp_path_factory.mktemp("upstream")
    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(Wav2Vec2Config(**TINY_UPSTREAM)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    return str(folder)


def write_folder(folder: Path, rows: list[dict], make_audio) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        sf.write(folder / row["file_name"], make_audio(i, row), 16000)
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(folder)


@pytest.fixture(scope="module")
def sound_or_tone(tmp_path_factory) -> str:
    """Two classes a frozen random upstream already separates: speech-like babble vs a pure tone."""
    rows = [{"file_name": f"{i}.wav", "label": ["babble", "tone"][i % 2]} for i in range(80)]

    def audio(i: int, row: dict) -> np.ndarray:
        if row["label"] == "babble":
            return babble(i, 0.5)
        return (0.5 * np.sin(2 * np.pi * (200 + 5 * i) * np.arange(8000) / 16000)).astype(np.float32)

    return write_folder(tmp_path_factory.mktemp("sound_or_tone"), rows, audio)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> str:
    """A tiny ASR set: babble clips with short transcripts (the pipeline mechanics, not accuracy)."""
    rows = [{"file_name": f"{i}.wav", "text": ["yes", "no go", "up"][i % 3]} for i in range(30)]
    return write_folder(tmp_path_factory.mktemp("spoken"), rows, lambda i, row: babble(100 + i, 0.5))


def options(tmp_path: Path, **extra) -> dict:
    train = {"output_dir": str(tmp_path / "runs"), "per_device_batch_size": 4, "max_steps": 6, "eval_every": 3,
             "log_every": 3, "progress_bar": False, "num_threads": 1, "learning_rate": 1e-3}
    return {"train": {**train, **extra.pop("train", {})}, "probe": {"epochs": 30, "patience": 30}, **extra}


def test_layer_weights_sum_to_one_and_receive_gradients():
    probe = WeightedLayerProbe(num_layers=4, hidden_size=8, num_outputs=3)
    hidden = torch.randn(5, 4, 8)  # pooled: [batch, layers, hidden]
    assert probe.layer_weights().sum().item() == pytest.approx(1.0)
    torch.nn.functional.cross_entropy(probe(hidden), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert probe.layer_logits.grad is not None and probe.layer_logits.grad.abs().sum() > 0
    # The mix is the softmax-weighted sum of the layers (here, one-hot on layer 2), per frame for CTC.
    with torch.no_grad():
        probe.layer_logits.copy_(torch.tensor([-1e4, -1e4, 0.0, -1e4]))
    frames = torch.randn(2, 4, 7, 8)
    assert torch.allclose(probe(frames), probe.head(frames[:, 2]), atol=1e-6)


def test_bilstm_probe_equals_a_packed_bidirectional_lstm_and_never_reads_padding():
    torch.manual_seed(0)
    probe = WeightedLayerProbe(num_layers=2, hidden_size=6, num_outputs=5, lstm_size=4)
    reference = torch.nn.LSTM(6, 4, batch_first=True, bidirectional=True)
    with torch.no_grad():  # the reference's two directions get the probe's two LSTMs' weights
        for name, value in probe.lstm_forward.named_parameters():
            getattr(reference, name).copy_(value)
        for name, value in probe.lstm_backward.named_parameters():
            getattr(reference, f"{name}_reverse").copy_(value)
    hidden, lengths = torch.randn(3, 2, 7, 6), torch.tensor([7, 4, 2])
    for row, length in enumerate(lengths.tolist()):
        hidden[row, :, length:] = 1e3  # padding: must not change a single true frame's output
    logits = probe(hidden, lengths)
    mixed = torch.einsum("l,bl...->b...", probe.layer_weights(), hidden)
    packed = torch.nn.utils.rnn.pack_padded_sequence(mixed, lengths, batch_first=True, enforce_sorted=False)
    expected = probe.head(torch.nn.utils.rnn.pad_packed_sequence(reference(packed)[0], batch_first=True)[0])
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(logits[row, :length], expected[row, :length], rtol=1e-5, atol=1e-5)
    assert torch.equal(reversed_in_length(reversed_in_length(mixed, lengths), lengths), mixed)


def test_probe_learns_a_separable_task_and_reports_layer_weights(upstream, sound_or_tone, tmp_path):
    result = finetune(model=upstream, task=sound_or_tone, protocol="probe", seeds=[0, 1],
                      overrides=options(tmp_path))
    assert isinstance(result, SpeechFinetuneResult) and result.protocol == "probe"
    assert min(result.test["accuracy"]) > 0.9  # chance is 0.5
    assert len(result.layer_weights) == 2 and len(result.layer_weights[0]) == 3  # CNN projection + 2 layers
    assert all(sum(weights) == pytest.approx(1.0, abs=1e-5) for weights in result.layer_weights)
    head = json.loads((Path(result.model_dirs[0]) / "probe_head.json").read_text())
    assert head["layer_weights"] == result.layer_weights[0]
    assert (Path(result.model_dirs[0]) / "probe_head.safetensors").is_file()


def test_full_finetune_end_to_end_exports_an_audio_classification_pipeline(upstream, sound_or_tone, tmp_path):
    from transformers import pipeline

    result = finetune(model=upstream, task=sound_or_tone, protocol="full", seeds=[0], overrides=options(tmp_path))
    assert result.steps[0] <= 6 and set(result.test) == {"accuracy", "f1"}
    model_dir = result.model_dirs[0]
    assert "## Downstream results" in (Path(model_dir) / "README.md").read_text()
    frozen = json.loads((Path(model_dir) / "config.json").read_text())
    assert frozen["architectures"] == ["Wav2Vec2ForSequenceClassification"]
    classify = pipeline("audio-classification", model=model_dir)
    out = classify({"raw": babble(7, 0.5), "sampling_rate": 16000})
    assert {row["label"] for row in out} == {"babble", "tone"}


def test_full_finetune_freezes_the_conv_feature_encoder(upstream, sound_or_tone, tmp_path):
    from sslcore.config import build

    from speechssl.finetune import SpeechFinetuneConfig, SpeechFinetuneObjective

    config = build(SpeechFinetuneConfig, {"task": {"name": sound_or_tone}, "model": {"path": upstream},
                                          "train": {"output_dir": str(tmp_path)}})
    objective = SpeechFinetuneObjective(config)
    objective.prepare()
    model = objective.build_model()
    conv = [p.requires_grad for p in model.wav2vec2.feature_extractor.parameters()]
    assert conv and not any(conv)
    assert all(p.requires_grad for p in model.wav2vec2.encoder.parameters())


def test_asr_finetune_round_trips_through_the_stock_asr_pipeline(upstream, spoken, tmp_path):
    from transformers import pipeline

    result = finetune(model=upstream, task=spoken, protocol="full", seeds=[0],
                      overrides=options(tmp_path, task={"name": spoken, "transcript_column": "text"}))
    assert result.task_type == "automatic-speech-recognition" and result.lower_is_better
    assert set(result.test) == {"cer", "wer"} and result.main_metric == "cer"
    model_dir = Path(result.model_dirs[0])
    assert (model_dir / "vocab.json").is_file()  # the character tokenizer travels with the model
    # A WAV file in, text out, with nothing of ours: stock pipeline, offline (soundfile reads the file, as
    # there is no FFmpeg here for the pipeline's own file reader).
    wav = tmp_path / "utterance.wav"
    sf.write(wav, babble(3, 0.7), 16000)
    waveform, rate = sf.read(wav, dtype="float32")
    transcribe = pipeline("automatic-speech-recognition", model=str(model_dir))
    text = transcribe({"raw": waveform, "sampling_rate": rate})["text"]
    assert isinstance(text, str) and set(text.replace("<unk>", "")) <= set("yesnogup ")  # its own vocabulary


def test_asr_probe_scores_cer_and_greedy_decoding_merges_repeats(upstream, spoken, tmp_path):
    tokenizer = build_ctc_tokenizer(["no go", "yes"], tmp_path / "vocab")
    ids = tokenizer.convert_tokens_to_ids
    frames = [ids("n"), ids("n"), 0, ids("o"), ids("|"), ids("g"), 0, ids("o"), ids("o"), 0]
    logits = torch.nn.functional.one_hot(torch.tensor([frames]), len(tokenizer)).float()
    assert greedy_decode(logits, torch.tensor([10]), tokenizer) == ["no go"]
    result = finetune(model=upstream, task=spoken, protocol="probe", seeds=[0],
                      overrides=options(tmp_path, task={"name": spoken, "transcript_column": "text"},
                                        probe={"epochs": 3}))
    assert 0.0 <= result.test["cer"][0] and len(result.layer_weights[0]) == 3


def test_asr_probe_patience_counts_only_once_the_head_spells(upstream, spoken, tmp_path, monkeypatch):
    from speechssl import finetune as speech_finetune

    scored = []

    def blank_for_six_epochs(task, probe, features, references, tokenizer, batch_size):
        scored.append(1)
        epoch = len(scored)  # validation once per epoch, test once at the end
        return {"cer": 1.0 if epoch <= 6 else 0.9 if epoch == 7 else 0.95, "wer": 1.0}

    monkeypatch.setattr(speech_finetune, "_probe_scores", blank_for_six_epochs)
    result = finetune(model=upstream, task=spoken, protocol="probe", seeds=[0],
                      overrides=options(tmp_path, task={"name": spoken, "transcript_column": "text"},
                                        probe={"epochs": 20, "patience": 2}))
    # 6 blank epochs do not count; epoch 7 is the best, then 2 misses end it: 9 validations + 1 test.
    assert result.steps == [7] and len(scored) == 10


def test_comparison_reads_a_lower_error_rate_as_a_gain():
    def arm(values):
        return SpeechFinetuneResult(task="asr", protocol="probe", model="m", init="x", seeds=[0, 1, 2], main_metric="cer",
                                    test={"cer": values}, validation={"cer": values}, model_dirs=[], steps=[],
                                    output_dir="o", lower_is_better=True)

    row = Comparison("asr", "probe", arm([0.40, 0.41, 0.42]), arm([0.60, 0.61, 0.62]))
    assert row.delta < 0 and row.verdict == "helps"
    assert Comparison("asr", "probe", arm([0.60, 0.61, 0.62]), arm([0.40, 0.41, 0.42])).verdict == "hurts"


def test_bad_input_errors(upstream, sound_or_tone, tmp_path):
    with pytest.raises(MissingPathError, match="not a wav2vec 2.0 model folder.*recipes/pretrain.py"):
        finetune(model=str(tmp_path / "missing"), task=sound_or_tone, seeds=[0], overrides=options(tmp_path))
    with pytest.raises(ValueError, match="early_stopping.metric='cer' is not computed.*accuracy"):
        finetune(model=upstream, task=sound_or_tone, seeds=[0],
                 overrides=options(tmp_path, early_stopping={"metric": "cer"}))
    with pytest.raises(ValueError, match="repeats a seed"):
        finetune(model=upstream, task=sound_or_tone, seeds=[1, 1], overrides=options(tmp_path))


def test_full_finetune_grid_picks_on_validation_and_scores_test_only_with_the_choice(upstream, sound_or_tone,
                                                                                     tmp_path, monkeypatch):
    from speechssl.finetune import SpeechFinetuneObjective

    original, calls = SpeechFinetuneObjective.score, []

    def score(self, model, split, accelerator=None):  # real scores; validation steered to prefer 3e-3
        scores = original(self, model, split, accelerator)
        calls.append((self.config.train.learning_rate, split))
        if split == "validation":
            scores["accuracy"] = 1.0 if self.config.train.learning_rate == 3e-3 else 0.0
        return scores

    monkeypatch.setattr(SpeechFinetuneObjective, "score", score)
    result = finetune(model=upstream, task=sound_or_tone, protocol="full", seeds=[0],
                      overrides=options(tmp_path, train={"max_steps": 3}, grid={"learning_rates": [1e-3, 3e-3]},
                                        label_budget=20))
    assert result.selection.chosen_settings() == [{"learning_rate": 3e-3}] and result.validation["accuracy"] == [1.0]
    assert [c for c in calls if c[1] == "test"] == [(3e-3, "test")]  # the test split: only the chosen setting
    assert result.label_budget == 20 and result.train_examples == [20]
    assert Path(result.model_dirs[0]).parent.name == "full-pretrained-labels20-lr3e-3-seed0"
    assert "test" not in json.loads((tmp_path / "runs" / "full-pretrained-labels20-lr1e-3-seed0" / "scores.json").read_text())


def test_finished_runs_are_reused(upstream, sound_or_tone, tmp_path, monkeypatch):
    """A rerun (an interrupted benchmark's) reuses every finished seed of the same config, in both protocols."""
    import sslcore.trainer
    from speechssl import finetune as speech_finetune

    probe = finetune(model=upstream, task=sound_or_tone, protocol="probe", seeds=[0], overrides=options(tmp_path))
    full = finetune(model=upstream, task=sound_or_tone, protocol="full", seeds=[0], overrides=options(tmp_path))
    scores = tmp_path / "runs" / "full-pretrained-seed0" / "scores.json"
    saved = json.loads(scores.read_text())
    scores.write_text(json.dumps({k: v for k, v in saved.items() if k != "test"}))  # trained, not yet scored on test

    def refuse(*args, **kwargs):
        raise RuntimeError("retrained a finished run")

    monkeypatch.setattr(speech_finetune, "run_probe", refuse)
    monkeypatch.setattr(sslcore.trainer.Trainer, "fit", refuse)
    assert finetune(model=upstream, task=sound_or_tone, protocol="probe", seeds=[0],
                    overrides=options(tmp_path)).test == probe.test
    assert finetune(model=upstream, task=sound_or_tone, protocol="full", seeds=[0],
                    overrides=options(tmp_path)).test == full.test  # test scored again from the exported model
    with pytest.raises(RuntimeError, match="retrained"):  # another config is a new run
        finetune(model=upstream, task=sound_or_tone, protocol="full", seeds=[0],
                 overrides=options(tmp_path, train={"max_steps": 5}))
