"""BERT masked-LM end to end through the recipe: exact resume after SIGKILL, a refused
mismatched checkpoint, 2 processes = 1 process, and an export stock transformers loads."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslcore.api import pretrain
from sslcore.checkpoint import CheckpointError

ROOT = Path(__file__).parent.parent
RECIPE = str(ROOT / "recipes" / "pretrain.py")
CONFIG = str(ROOT / "recipes" / "configs" / "bert_mlm_tiny.yaml")


def tiny(cache_dir, output_dir, **extra):
    """CLI overrides for a seconds-long run on a slice of the default corpus."""
    values = {
        "data.corpus.max_documents": 80, "data.corpus.cache_dir": cache_dir, "data.max_seq_length": 64,
        "tokenizer.vocab_size": 2000, "model.hidden_size": 32, "model.num_hidden_layers": 1,
        "model.num_attention_heads": 2, "model.intermediate_size": 64, "train.per_device_batch_size": 8,
        "train.progress_bar": "false", "train.report_to": "[]", "train.output_dir": str(output_dir),
        "train.max_steps": 40, "train.save_every": 5, "train.keep_checkpoints": 3, "train.log_every": 5,
        "train.eval_every": 0, "train.learning_rate": 2e-3, **extra,
    }
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def run(args, **kwargs):
    return subprocess.run([sys.executable, RECIPE, "--config", CONFIG, *args], capture_output=True, text=True, check=False,
                          timeout=600, **kwargs)


def weights(path):
    return load_file(str(path))


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(tiny(cache_dir, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(cache_dir, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, RECIPE, "--config", CONFIG, *tiny(cache_dir, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / "step-000010"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "checkpoints" / "step-000040").exists()
    for checkpoint in (out / "checkpoints").glob("step-*"):  # whatever the kill interrupted, no torn checkpoint
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()

    resumed = run([*tiny(cache_dir, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a = weights(uninterrupted / "checkpoints" / "step-000040" / "model.safetensors")
    b = weights(out / "checkpoints" / "step-000040" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_checkpoint_from_another_model_config_is_refused(cache_dir, uninterrupted, tmp_path):
    args = tiny(cache_dir, uninterrupted, **{"model.hidden_size": 48, "train.resume": "latest",
                                            "train.max_steps": 45})
    with pytest.raises(CheckpointError) as error:
        pretrain(CONFIG, args)
    assert "model.hidden_size: checkpoint has 32, this run has 48" in str(error.value)


def test_export_works_in_stock_fill_mask_pipeline_offline(uninterrupted):
    from transformers import AutoModelForMaskedLM, pipeline

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    export = uninterrupted / "model"
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.bin"))
    model = AutoModelForMaskedLM.from_pretrained(export)
    trained = weights(uninterrupted / "checkpoints" / "step-000040" / "model.safetensors")
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       trained["model.bert.embeddings.word_embeddings.weight"])
    fill = pipeline("fill-mask", model=str(export))
    predictions = fill(f"the government said it would {fill.tokenizer.mask_token} the plan.")
    assert len(predictions) == 5 and all(p["token_str"] for p in predictions)
    card = (export / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "gensim-wiki" in card and "final_loss" in card


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(cache_dir, tmp_path):
    no_dropout = {"model.hidden_dropout_prob": 0, "model.attention_probs_dropout_prob": 0, "train.max_steps": 10,
                  "train.save_every": 0}
    one = run(tiny(cache_dir, tmp_path / "one", **no_dropout, **{"train.per_device_batch_size": 8}))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        # `--cpu` would start one process (Accelerate fans CPU runs out only through mpirun);
        # torchrun via --multi_gpu on a GPU-less machine is the CPU multi-process route.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", RECIPE, "--config", CONFIG,
         *tiny(cache_dir, tmp_path / "two", **no_dropout, **{"train.per_device_batch_size": 4})],
        capture_output=True, text=True, check=False, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 4" in two.stderr
    a = weights(tmp_path / "one" / "checkpoints" / "step-000010" / "model.safetensors")
    b = weights(tmp_path / "two" / "checkpoints" / "step-000010" / "model.safetensors")
    # Same examples, same masks; only the per-process averaging of the masked-token loss differs.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 5e-3, f"largest weight difference {worst}"


@pytest.mark.slow
def test_mlm_loss_falls_well_below_uniform_on_the_demo_corpus(cache_dir, tmp_path):
    # The demo's corpus and tokenizer (8192 WordPiece tokens) with a narrower encoder, to stay cheap.
    result = pretrain(CONFIG, ["--data.corpus.cache_dir", cache_dir, "--train.output_dir", str(tmp_path),
                               "--data.max_seq_length", "64", "--model.hidden_size", "64",
                               "--model.intermediate_size", "256", "--train.learning_rate", "2e-3",
                               "--train.max_steps", "200", "--train.warmup_steps", "20", "--train.save_every", "0",
                               "--train.eval_every", "0", "--train.progress_bar", "false", "--train.report_to", "[]",
                               "--train.export", "false"])
    vocab = 8192
    first = result.history[0]["loss"]
    assert first > math.log(vocab) - 0.5  # starts near uniform over the vocabulary
    assert result.final_loss < math.log(vocab) - 2.0, result.final_loss
    assert result.eval["eval_loss"] < math.log(vocab) - 1.5  # 8 held-out documents: a noisier estimate
    assert result.eval["eval_mlm_accuracy"] > 100 / vocab  # far above chance (1/8192)


def test_streamed_corpus_trains_without_materialising_it(cache_dir, tmp_path):
    result = pretrain(CONFIG, tiny(cache_dir, tmp_path, **{
        "data.corpus.streaming": "true", "data.corpus.sources": "[gensim-lee]", "train.max_steps": 6,
        "train.save_every": 3, "data.max_eval_examples": 16}))
    assert result.step == 6 and math.isfinite(result.final_loss)
    assert (tmp_path / "checkpoints" / "step-000006" / "data-0.json").is_file()  # the stream's position
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty"),
    (b"caf\xe9 au lait\n\nna\xefve text\n", "UTF-8"),
])
def test_bad_corpus_files_fail_early_with_a_clear_error(cache_dir, tmp_path, content, fragment):
    from textssl.corpus import CorpusError

    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as error:
        pretrain(CONFIG, tiny(str(tmp_path / "cache"), tmp_path / "run", **{"data.corpus.sources": f"[{path}]"}))
    assert fragment.lower() in str(error.value).lower() and str(path) in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before anything was written


def test_a_corpus_smaller_than_one_block_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("one short document.\n\nand another one.\n")
    with pytest.raises(ValueError, match="max_seq_length"):
        pretrain(CONFIG, tiny(str(tmp_path / "cache"), tmp_path / "run", **{
            "data.corpus.sources": f"[{path}]", "tokenizer.vocab_size": 100, "tokenizer.min_frequency": 1}))
