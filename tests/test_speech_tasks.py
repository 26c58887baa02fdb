"""Speech downstream tasks (speechssl.tasks) and speech metrics (speechssl.metrics)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import soundfile as sf

from speechssl import metrics
from speechssl.synthetic import babble
from speechssl.tasks import (
    KEYWORDS,
    SPEAKERS,
    UNKNOWN,
    SpeechTaskConfig,
    SpeechTaskError,
    asr_transcript,
    label_counts,
    list_speech_tasks,
    load_speech_task,
    speakers_by_split,
    split_by_group,
    split_digest,
)

# --------------------------------------------------------------------------------------------------
# Metrics, against values worked out by hand
# --------------------------------------------------------------------------------------------------


def test_wer_and_cer_are_corpus_level_edit_rates():
    # "the cat sat" vs reference "the cat sat down": one deletion over 4 reference words.
    assert metrics.wer(["the cat sat"], ["the cat sat down"])["wer"] == pytest.approx(1 / 4)
    # Corpus level: (1 substitution + 0) / (2 + 3) reference words, not the mean of 1/2 and 0/3.
    assert metrics.wer(["a x", "b c d"], ["a b", "b c d"])["wer"] == pytest.approx(1 / 5)
    # One insertion: 1 / 2 words, so WER can exceed what a deletion costs.
    assert metrics.wer(["one two three"], ["one two"])["wer"] == pytest.approx(1 / 2)
    # "abd" vs "abc": 1 substitution / 3 characters; "ab" vs "abc d": 3 deletions (c, space, d) / 5.
    assert metrics.cer(["abd"], ["abc"])["cer"] == pytest.approx(1 / 3)
    assert metrics.cer(["abd", "ab"], ["abc", "abc d"])["cer"] == pytest.approx((1 + 3) / (3 + 5))
    assert metrics.cer(["same"], ["same"])["cer"] == 0.0


def test_accuracy_and_macro_f1_by_hand():
    predictions, references = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    scores = metrics.compute_speech_metrics(["accuracy", "f1"], predictions, references)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # Per class F1 = 2TP / (predicted + actual): class 0: 2*1/(2+2) = 0.5; class 1: 2*1/(1+2) = 2/3;
    # class 2: 2*2/(3+2) = 0.8. Macro = their mean.
    assert scores["f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_transcripts_are_normalised_and_error_rates_reject_empty_references():
    assert metrics.normalize_transcript("  Hello,  World! It's 9. ") == "hello world it's 9"
    assert asr_transcript("Press 1, then 10.") == "press one then 10"
    assert metrics.better("cer", 0.2, 0.3) and not metrics.better("accuracy", 0.2, 0.3)
    with pytest.raises(ValueError, match="reference transcript 1 is empty"):
        metrics.cer(["a", "b"], ["a", " "])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*cer"):
        metrics.compute_speech_metrics(["bleu"], ["a"], ["a"])


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def test_split_by_group_keeps_speakers_whole_and_is_deterministic():
    groups = [f"spk{i % 12}" for i in range(240)]
    first = split_by_group(groups, {"validation": 0.2, "test": 0.2}, seed=0)
    assert first == split_by_group(list(groups), {"validation": 0.2, "test": 0.2}, seed=0)
    assert first != split_by_group(groups, {"validation": 0.2, "test": 0.2}, seed=1)
    speakers = {name: {groups[i] for i in rows} for name, rows in first.items()}
    assert not (speakers["train"] & speakers["test"]) and not (speakers["validation"] & speakers["test"])
    assert not (speakers["train"] & speakers["validation"])
    assert sorted(i for rows in first.values() for i in rows) == list(range(240))
    assert len(speakers["test"]) == len(speakers["validation"]) == round(0.2 * 12)
    with pytest.raises(SpeechTaskError, match="2 speaker.*cannot fill 3 splits"):
        split_by_group(["a", "b", "a"], {"validation": 0.1, "test": 0.1}, seed=0)


# --------------------------------------------------------------------------------------------------
# Local audiofolders
# --------------------------------------------------------------------------------------------------


def write_audiofolder(folder: Path, rows: list[dict], seed: int = 0) -> Path:
    """WAV files (babble, 8 kHz so they are resampled on the way in) and metadata.csv with `rows`' columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        sf.write(folder / row["file_name"], babble(seed * 1000 + i, 0.6, 8000), 8000)
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_audiofolder_classification_split_by_speaker_has_no_voice_leakage(tmp_path):
    rows = [{"file_name": f"{i}.wav", "label": ["yes", "no"][i % 2], "speaker": f"s{i % 10}"} for i in range(60)]
    folder = write_audiofolder(tmp_path / "kws", rows)
    config = SpeechTaskConfig(name=str(folder), speaker_column="speaker", carve_validation_fraction=0.2,
                              carve_test_fraction=0.2)
    task = load_speech_task(config)
    assert task.problem == "classification" and task.label_names == ["no", "yes"] and task.split_by == "speaker"
    assert task.metrics == ["accuracy", "f1"] and task.main_metric == "accuracy"
    assert sum(len(task.splits[name]) for name in ("train", "validation", "test")) == 60
    voices = speakers_by_split(task)
    assert not (voices["train"] & voices["test"]) and not (voices["validation"] & voices["test"])
    assert len(voices["test"]) == 2
    assert task.splits["train"].features["audio"].feature.dtype == "float32"
    assert len(task.splits["train"][0]["audio"]) == pytest.approx(0.6 * 16000, abs=2)  # resampled to 16 kHz
    assert split_digest(load_speech_task(config).splits["test"]) == split_digest(task.splits["test"])
    assert sum(label_counts(task.splits["train"]).values()) == len(task.splits["train"])


def test_audiofolder_asr_with_split_folders(tmp_path):
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        rows = [{"file_name": f"{i}.wav", "transcription": f"Say {i}, please."} for i in range(4)]
        write_audiofolder(tmp_path / "asr" / split, rows, seed)
    task = load_speech_task(SpeechTaskConfig(name=str(tmp_path / "asr"), transcript_column="transcription"))
    assert task.problem == "asr" and task.metrics == ["cer", "wer"] and task.label_names is None
    assert task.splits["test"]["transcript"][:2] == ["say 0 please", "say 1 please"]
    assert task.split_by == "utterance"


def test_bad_input_gives_one_clear_error(tmp_path):
    with pytest.raises(SpeechTaskError, match="unknown speech task 'asterisk-speaker'.*did you mean 'asterisk-speakers'"
                                              ".*asterisk-en-asr.*speech-keywords"):
        load_speech_task("asterisk-speaker")
    folder = write_audiofolder(tmp_path / "a", [{"file_name": f"{i}.wav", "word": "yes"} for i in range(3)])
    with pytest.raises(SpeechTaskError, match="task.label_column='label' is not a column.*'word'.*transcript_column"):
        load_speech_task(str(folder))
    with pytest.raises(SpeechTaskError, match="task.transcript_column='text' is not a column"):
        load_speech_task(str(folder), transcript_column="text")
    empty = write_audiofolder(tmp_path / "b", [{"file_name": f"{i}.wav", "text": "hi" if i else "  "} for i in range(30)])
    with pytest.raises(SpeechTaskError, match="empty transcript in 'text'"):
        load_speech_task(str(empty), transcript_column="text")
    for split, labels in (("train", ["yes", "no"]), ("validation", ["yes", "no"]), ("test", ["yes", "maybe"])):
        write_audiofolder(tmp_path / "c" / split, [{"file_name": f"{i}.wav", "label": labels[i % 2]} for i in range(4)])
    with pytest.raises(SpeechTaskError, match="label sets differ between splits.*test split has.*maybe"):
        load_speech_task(str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    with pytest.raises(SpeechTaskError, match="holds no metadata.csv"):
        load_speech_task(str(tmp_path / "d"))
    with pytest.raises(SpeechTaskError, match="hf: tasks need the Hub"):
        load_speech_task("hf:no-such-user/no-such-speech-set")


def test_registry_lists_the_superb_style_tasks():
    assert {"asterisk-speakers", "asterisk-en-asr", "speech-keywords"} <= set(list_speech_tasks())
    assert len(KEYWORDS) == 20 and UNKNOWN not in KEYWORDS


# --------------------------------------------------------------------------------------------------
# Built-in tasks from Debian packages (fetched once; the default cache keeps them between sessions)
# --------------------------------------------------------------------------------------------------


@pytest.mark.network
def test_speaker_id_task_sizes_labels_and_fixed_split():
    task = load_speech_task("asterisk-speakers")
    assert [len(task.splits[n]) for n in ("train", "validation", "test")] == [3124, 390, 390]
    assert task.label_names == list(SPEAKERS)
    for name in ("train", "validation", "test"):  # split by utterance: every speaker in every split
        assert set(label_counts(task.splits[name])) == set(SPEAKERS)
    ids = {name: set(task.splits[name]["id"]) for name in ("train", "validation", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
    assert split_digest(task.splits["test"]) == split_digest(load_speech_task("asterisk-speakers").splits["test"])


@pytest.mark.network
def test_english_asr_task_holds_transcribed_allison_prompts():
    task = load_speech_task("asterisk-en-asr")
    assert [len(task.splits[n]) for n in ("train", "validation", "test")] == [443, 55, 55]
    assert task.metrics == ["cer", "wer"] and task.main_metric == "cer"
    texts = task.splits["train"]["transcript"]
    assert all(text == asr_transcript(text) and text for text in texts)
    assert set(task.splits["test"]["speaker"]) == {"en_US_f_Allison"}


@pytest.mark.network
def test_keyword_task_splits_by_voice_and_tests_on_real_speech():
    pytest.importorskip("espeakng_loader")
    task = load_speech_task("speech-keywords")
    assert [len(task.splits[n]) for n in ("train", "validation", "test")] == [2640, 440, 471]
    assert set(task.label_names) == {*KEYWORDS, UNKNOWN}
    voices = speakers_by_split(task)
    assert not (voices["train"] & voices["test"]) and not (voices["train"] & voices["validation"])
    assert "en_US_f_Allison" in voices["test"] and "en_US_f_Allison" not in voices["train"]
    real = task.splits["test"].filter(lambda row: row["speaker"] == "en_US_f_Allison")
    names = real.features["label"].names
    assert {names[i] for i in real["label"]} >= {"zero", "five", "nine", "no", UNKNOWN}


@pytest.mark.network
def test_pretraining_exclusions_cover_every_scored_clip(tmp_path):
    from speechssl.tasks import held_out_clip_ids

    held = held_out_clip_ids(("asterisk-en-asr",))
    task = load_speech_task("asterisk-en-asr")
    assert set(task.splits["test"]["id"]) | set(task.splits["validation"]["id"]) == held
    assert not held & set(task.splits["train"]["id"])
