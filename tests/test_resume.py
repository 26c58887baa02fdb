"""Exact resume for NSP, SOP, GPT and full fine-tuning (MLM and word2vec have their own tests).

Each test trains a tiny model for STEPS steps without a break, then resumes a copy of its halfway
checkpoint (what a run killed after that step leaves behind) with `--resume latest`, and requires
every tensor of the final checkpoint (weights, optimizer moments, scheduler, RNG streams, objective
state) and every logged loss to be identical. Dropout stays on, so the RNG streams matter.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslcore.api import pretrain

CONFIGS = Path(__file__).parent.parent / "recipes" / "configs"
STEPS = 12
HALF = STEPS // 2


def tiny(cache_dir, output_dir, model, **train):
    """A seconds-long run on the corpus slice tests/test_text_objectives.py uses (shared cache)."""
    return {
        "data": {"corpus": {"max_documents": 120, "validation_fraction": 0.15, "cache_dir": cache_dir},
                 "max_seq_length": 64, "num_proc": 1},
        "tokenizer": {"vocab_size": 2000},
        "model": model,
        "train": {"output_dir": str(output_dir), "per_device_batch_size": 8, "max_steps": STEPS, "save_every": HALF,
                  "keep_checkpoints": 3, "log_every": 2, "eval_every": 0, "eval_batches": 2, "report_to": [],
                  "progress_bar": False, "learning_rate": 1e-3, "warmup_steps": 3, "export": False, **train},
    }


def killed_at_half(finished_run: Path, resumed_run: Path, half: int = HALF) -> None:
    """What a run killed right after its halfway checkpoint leaves: that checkpoint, as `latest`."""
    name = f"step-{half:06d}"
    (resumed_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(finished_run / "checkpoints" / name, resumed_run / "checkpoints" / name)
    (resumed_run / "checkpoints" / "latest").write_text(name)


def assert_identical(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, compared exactly (torch.equal for tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "model.safetensors" in files and "optimizer.pt" in files and "rng-0.pt" in files
    for name in files:
        if name.endswith(".safetensors"):
            assert_identical(load_file(a / name), load_file(b / name), name)
        elif name.endswith(".pt"):
            assert_identical(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True), name)


def logged(history, key):
    return [(record["step"], record[key]) for record in history if key in record]


def assert_resumes_exactly(config_name, overrides, tmp_path) -> None:
    whole = pretrain(CONFIGS / config_name, overrides(tmp_path / "whole"))
    killed_at_half(tmp_path / "whole", tmp_path / "resumed")
    resumed = pretrain(CONFIGS / config_name, overrides(tmp_path / "resumed", resume="latest"))
    assert whole.step == resumed.step == STEPS
    name = f"step-{STEPS:06d}"
    assert_same_checkpoint(tmp_path / "whole" / "checkpoints" / name, tmp_path / "resumed" / "checkpoints" / name)
    for key in sorted({k for record in whole.history for k in record if "loss" in k or "accuracy" in k}):
        assert logged(resumed.history, key) == logged(whole.history, key), key
        assert logged(whole.history, key), key
    assert resumed.final_loss == whole.final_loss


@pytest.mark.slow
def test_nsp_resumes_exactly(cache_dir, tmp_path):
    model = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    assert_resumes_exactly("bert_nsp_tiny.yaml", lambda out, **train: {
        **tiny(cache_dir, out, model, **train), "pairs": {"dupe_factor": 1}}, tmp_path)


@pytest.mark.slow
def test_sop_resumes_exactly(cache_dir, tmp_path):
    model = {"embedding_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "hidden_dropout_prob": 0.1}
    assert_resumes_exactly("albert_sop_tiny.yaml", lambda out, **train: {
        **tiny(cache_dir, out, model, **train), "pairs": {"dupe_factor": 1}}, tmp_path)


@pytest.mark.slow
def test_gpt_resumes_exactly_with_accumulation_and_capped_eval(cache_dir, tmp_path):
    # Accumulation and an eval capped by eval_batches in the middle of the run: the eval loader must
    # leave no state behind that the uninterrupted run has and the resumed one lacks.
    model = {"n_embd": 32, "n_layer": 2, "n_head": 2}
    assert_resumes_exactly("gpt_clm_tiny.yaml", lambda out, **train: tiny(
        cache_dir, out, model, gradient_accumulation_steps=2, eval_every=4, **train), tmp_path)


# -- full fine-tuning (textssl.finetune through the sequence_classification objective) --------------------
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, cache_dir):
    """An exported-looking BERT folder (BertForMaskedLM + tokenizer), as tests/test_finetune.py uses."""
    from conftest import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"), cache_dir)


FINETUNE_STEPS, FINETUNE_HALF = 16, 8
FINETUNE_RUN = "full-pretrained-seed0"


def finetune_then_resume(encoder, cache_dir, tmp_path, early_stopping):
    """textssl.finetune uninterrupted, then again from a copy of its halfway checkpoint with resume latest."""
    import textssl

    def options(out, **train):
        return {"task": {"cache_dir": cache_dir}, "keep_checkpoints": True, "early_stopping": early_stopping,
                "train": {"output_dir": str(out), "max_steps": FINETUNE_STEPS, "eval_every": 2,
                          "save_every": FINETUNE_HALF, "keep_checkpoints": 3, "per_device_batch_size": 16,
                          "learning_rate": 3e-3, "log_every": 2, "progress_bar": False, **train}}

    whole = textssl.finetune(model=encoder, task="tiny-polarity", seeds=[0], overrides=options(tmp_path / "whole"))
    killed_at_half(tmp_path / "whole" / FINETUNE_RUN, tmp_path / "resumed" / FINETUNE_RUN, FINETUNE_HALF)
    resumed = textssl.finetune(model=encoder, task="tiny-polarity", seeds=[0],
                               overrides=options(tmp_path / "resumed", resume="latest"))
    return whole, resumed


@pytest.mark.slow
def test_full_finetune_resumes_exactly(tiny_encoder, cache_dir, tmp_path):
    whole, resumed = finetune_then_resume(tiny_encoder, cache_dir, tmp_path, {"patience": 0})
    assert whole.steps == resumed.steps == [FINETUNE_STEPS]
    final = f"step-{FINETUNE_STEPS:06d}"
    assert_same_checkpoint(tmp_path / "whole" / FINETUNE_RUN / "checkpoints" / final,
                           tmp_path / "resumed" / FINETUNE_RUN / "checkpoints" / final)
    history = [read_metrics(tmp_path / run / FINETUNE_RUN) for run in ("whole", "resumed")]
    after_half = [[r for r in h if r["step"] > FINETUNE_HALF] for h in history]
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy"):
        assert [(r["step"], r[key]) for r in after_half[0] if key in r] == \
               [(r["step"], r[key]) for r in after_half[1] if key in r], key


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_full_finetune_resume_keeps_the_early_stopping_state(tiny_encoder, cache_dir, tmp_path):
    # min_delta 1.0: no evaluation after the first counts as an improvement, so the best weights are
    # step 2's and patience 6 runs out at step 14. Both are decided in the first half: resume must carry them.
    whole, resumed = finetune_then_resume(tiny_encoder, cache_dir, tmp_path, {"patience": 6, "min_delta": 1.0})
    assert whole.steps == [14]
    assert resumed.steps == whole.steps
    assert resumed.validation == whole.validation and resumed.test == whole.test
    final = f"step-{whole.steps[0]:06d}"
    assert_same_checkpoint(tmp_path / "whole" / FINETUNE_RUN / "checkpoints" / final,
                           tmp_path / "resumed" / FINETUNE_RUN / "checkpoints" / final)
    # The export holds the best validation weights (step 2's), which only the checkpoint can hand over.
    assert_identical(load_file(Path(whole.model_dirs[0]) / "model.safetensors"),
                     load_file(Path(resumed.model_dirs[0]) / "model.safetensors"), "exported best weights")
