"""speechssl.wav2vec2: span masks and negatives (fraction, spans, never padding, never the positive), the
loss against transformers' own Wav2Vec2ForPreTraining, batches fixed by the seeds, a short run that
learns, exact resume (Gumbel temperature included), 2 processes = 1, the collapse alarm, the presets,
and an export stock transformers loads offline."""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sslcore.api import build_config, pretrain
from sslcore.data import generator_for
from sslcore.objective import LossContext
from speechssl.synthetic import write_babble_folder
from speechssl.wav2vec2 import (
    Wav2Vec2Objective,
    codebook_perplexity,
    contrastive_loss,
    conv_features,
    frame_lengths,
    masked_fraction,
    sample_negatives,
    span_masks,
)

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "recipes" / "configs"
TINY = CONFIGS / "wav2vec2_tiny.yaml"

TEST_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "conv_dim": [16, 32, 32, 32], "num_codevectors_per_group": 16, "codevector_dim": 32,
              "proj_codevector_dim": 32, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2,
              "hidden_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0, "layerdrop": 0.0}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("babble")
    write_babble_folder(folder, 48, seed=11, seconds=(0.8, 2.0))
    return str(folder)


def overrides(clips: str, cache: str, output_dir: Path, **train) -> dict:
    return {"data": {"sources": [clips], "cache_dir": cache, "validation_fraction": 0.15, "max_seconds": 1.0},
            "model": TEST_MODEL, "masking": {"num_negatives": 10},
            "train": {"output_dir": str(output_dir), "per_device_batch_size": 8, "max_steps": 20, "log_every": 4,
                      "eval_every": 0, "save_every": 10, "keep_checkpoints": 4, "progress_bar": False,
                      "report_to": [], "warmup_steps": 0, "lr_schedule": "constant", "learning_rate": 3e-3,
                      # One thread: with two, this machine's CPU kernels differ run to run in the last bit
                      # (measured: two fresh runs 1.6e-7 apart after 4 steps), which bit-exact resume would see.
                      "num_threads": 1, **train}}


def cli_args(settings: dict) -> list[str]:
    """`overrides(...)` as recipe command-line flags (`--train.max_steps=20`, lists as `[a, b]`)."""
    def text(value) -> str:
        if isinstance(value, list):
            return "[" + ", ".join(map(text, value)) + "]"
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [f"--{section}.{key}={text(value)}" for section, values in settings.items() for key, value in values.items()]


def objective(clips: str, cache: str, tmp_path: Path, **extra) -> Wav2Vec2Objective:
    config = build_config(TINY, {**overrides(clips, cache, tmp_path), **extra})
    obj = Wav2Vec2Objective(config)
    obj.prepare()
    return obj


# -- masks and negatives -------------------------------------------------------------------------------


def test_span_masks_cover_about_half_of_the_true_frames_and_never_padding() -> None:
    frames = torch.tensor([400, 250, 120, 37] * 16)
    gens = [generator_for(i) for i in range(len(frames))]
    mask = span_masks(frames, gens, mask_prob=0.065, mask_length=10, min_masks=2)
    valid = torch.arange(mask.shape[1])[None, :] < frames[:, None]
    assert not mask[~valid].any(), "a padding frame was masked"
    fraction = float(mask.sum()) / float(frames.sum())
    assert 0.42 < fraction < 0.56, fraction  # 1 - (1 - 0.065)^10 = 0.49 for long clips
    for row, n in zip(mask, frames.tolist()):  # every run of masked frames is at least one span long
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row[:n].int().numpy(), 0])))[::2]
        assert len(runs) >= 1 and runs.min() >= 10
    # An example's mask depends on its own seed and length only, not on the batch it is in.
    alone = span_masks(frames[5:6], [generator_for(5)], 0.065, 10, 2)
    assert torch.equal(alone[0], mask[5, : alone.shape[1]])


def test_negatives_are_other_masked_frames_of_the_same_utterance() -> None:
    frames = torch.tensor([300, 180, 60, 25])
    mask = span_masks(frames, [generator_for(i) for i in range(4)], 0.065, 10, 2)
    negatives = sample_negatives(mask, [generator_for(100 + i) for i in range(4)], num_negatives=50)
    rows_utterance = torch.arange(4)[:, None].expand_as(mask)[mask]  # utterance of each masked row
    rows_frame = torch.arange(mask.shape[1])[None, :].expand_as(mask)[mask]
    assert negatives.shape == (int(mask.sum()), 50)
    assert (negatives != torch.arange(len(negatives))[:, None]).all(), "a negative is the positive itself"
    assert (rows_utterance[negatives] == rows_utterance[:, None]).all(), "a negative from another utterance"
    assert (rows_frame[negatives] < frames[rows_utterance][:, None]).all(), "a negative in the padding"
    # Uniform over the other masked frames, for early and late frames alike: with K=50 draws from n-1 others,
    # a row should see about (n-1)(1 - (1 - 1/(n-1))^50) distinct frames.
    for utterance in range(4):
        rows = negatives[rows_utterance == utterance]
        others = int(mask[utterance].sum()) - 1
        expected = others * (1 - (1 - 1 / others) ** 50)
        distinct = torch.tensor([len(torch.unique(row)) for row in rows], dtype=torch.float)
        assert (distinct > 0.6 * expected).all(), (utterance, distinct.min(), expected)
    first = negatives[rows_utterance == 0]
    assert len(torch.unique(first)) == int(mask[0].sum())


def test_batches_are_fixed_by_the_seeds_and_mask_only_true_frames(clips, cache_dir, tmp_path) -> None:
    obj = objective(clips, cache_dir, tmp_path)
    rows = [obj.train_dataset()[i] for i in range(8)]
    a, b = obj.collate(rows, list(range(8))), obj.collate(rows, list(range(8)))
    c = obj.collate(rows, list(range(1, 9)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mask_time_indices"], c["mask_time_indices"])
    assert not (a["mask_time_indices"] & ~a["frame_mask"]).any()
    lengths = a["attention_mask"].sum(1)
    assert torch.equal(a["frame_mask"].sum(1), frame_lengths(lengths, [10, 8, 4, 4], [5, 4, 4, 4]))
    assert (a["input_values"][a["attention_mask"] == 0] == 0).all()
    true = a["input_values"][0, : lengths[0]]
    assert abs(float(true.mean())) < 1e-4 and abs(float(true.std()) - 1) < 1e-2  # normalised per utterance
    assert lengths.max() <= 16_000  # crops of at most data.max_seconds
    assert 0.3 < masked_fraction(a) < 0.7
    assert a["gumbel_uniform"].shape == (int(a["mask_time_indices"].sum()), 2, 16)


# -- the loss ------------------------------------------------------------------------------------------


def test_loss_matches_transformers_wav2vec2_for_pretraining(clips, cache_dir, tmp_path) -> None:
    """In eval mode (argmax codes, no dropout) our forward must give transformers' own contrastive and
    diversity losses for the same masks and negatives (HF's format: flat indices into batch x frames)."""
    obj = objective(clips, cache_dir, tmp_path)
    torch.manual_seed(0)
    model = obj.build_model().eval()
    batch = obj.collate([obj.train_dataset()[i] for i in range(6)], list(range(6)))
    mask = batch["mask_time_indices"]
    ctx = LossContext({k: float(v) for k, v in obj.targets(batch).items()}, training=False)
    with torch.no_grad():
        ours = model(**batch, gumbel_temperature=2.0, contrastive_temperature=0.1)
        loss, logs = obj.loss(model, batch, ctx)
        masked_rows = mask.flatten().nonzero().squeeze(1)  # our row m -> flat index b * T + t
        hf_negatives = torch.zeros(*mask.shape, batch["negative_indices"].shape[1], dtype=torch.long)
        hf_negatives[mask] = masked_rows[batch["negative_indices"]]
        hf = model.model(batch["input_values"], attention_mask=batch["attention_mask"], mask_time_indices=mask,
                         sampled_negative_indices=hf_negatives)
    ours_contrastive, _ = contrastive_loss(ours["logits"])
    assert torch.allclose(ours_contrastive, hf.contrastive_loss, rtol=1e-4), (ours_contrastive, hf.contrastive_loss)
    assert torch.allclose(codebook_perplexity(ours["usage"]).sum(), hf.codevector_perplexity, rtol=1e-4)
    assert math.isclose(ctx.terms["diversity"][0].item(), hf.diversity_loss.item(), rel_tol=1e-4)
    expected = (hf.contrastive_loss + 0.1 * hf.diversity_loss) / mask.sum() + 10.0 * ctx.terms["features"][0] / \
        batch["frame_mask"].sum()
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert logs["contrastive_accuracy"].denominator == float(mask.sum())


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_conv_features_match_the_stock_feature_encoder_and_its_gradients(norm: str) -> None:
    """Our frames-first feature encoder (unfold + matmul) is the stock one's math: outputs and parameter
    gradients equal to float rounding, for the tiny preset's layer-norm encoder and BASE's group-norm one
    (kernel 3, stride 2: windows that overlap unevenly)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=[16, 24, 24], conv_kernel=[10, 3, 4], conv_stride=[5, 2, 4], feat_extract_norm=norm,
                            conv_bias=norm == "layer")
    encoder = Wav2Vec2Model(config).feature_extractor
    audio = torch.randn(3, 4_000)
    weights = torch.randn(3, 99, 24)  # a loss that weighs every output differently

    grads = []
    for forward in (lambda: encoder(audio).transpose(1, 2), lambda: conv_features(encoder, audio)):
        encoder.zero_grad()
        out = forward()
        (out * weights).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (stock, stock_grads), (ours, our_grads) = grads
    assert ours.shape == stock.shape == (3, 99, 24)
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()
    for a, b in zip(our_grads, stock_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max()), (a - b).abs().max()


def test_quantizer_and_logits_stay_fp32_under_bf16_autocast(clips, cache_dir, tmp_path) -> None:
    obj = objective(clips, cache_dir, tmp_path)
    model = obj.build_model().train()
    batch = obj.collate([obj.train_dataset()[i] for i in range(4)], list(range(4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, gumbel_temperature=2.0, contrastive_temperature=0.1)
        loss, _ = obj.loss(model, batch, LossContext({k: float(v) for k, v in obj.targets(batch).items()}))
    assert out["logits"].dtype == out["usage"].dtype == out["feature_penalty"].dtype == torch.float32
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert model.model.quantizer.codevectors.grad is not None


def test_contrastive_loss_against_a_slow_reference() -> None:
    torch.manual_seed(1)
    logits = torch.randn(30, 6) * 3
    logits[3, 2] = float("-inf")  # a distractor equal to the positive is left out
    total, correct = contrastive_loss(logits)
    slow = sum(-(row[0] - torch.logsumexp(row, 0)) for row in logits)
    assert torch.allclose(total, slow) and int(correct) == sum(int(row.argmax() == 0) for row in logits)
    usage = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(codebook_perplexity(usage), torch.tensor([4.0, 1.0]))


# -- training ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(clips, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2v-uninterrupted")
    return pretrain(TINY, overrides(clips, cache_dir, out, max_steps=20)), out


def test_short_run_lowers_the_loss_and_logs_the_monitors(uninterrupted) -> None:
    result, out = uninterrupted
    logs = [h for h in result.history if "contrastive_loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["contrastive_loss"] < logs[0]["contrastive_loss"]
    assert all(h["codevector_perplexity"] > 0.05 * 32 for h in logs)  # no codebook collapse
    assert logs[-1]["gumbel_temperature"] < 2.0 and logs[-1]["audio_s_per_s"] > 0
    assert 0 <= logs[-1]["padding_fraction"] < 0.5 and 0 < logs[-1]["contrastive_accuracy"] < 1
    assert {"eval_contrastive_accuracy", "eval_codevector_perplexity", "eval_contrastive_loss"} <= set(result.eval)
    assert (out / "loss_curve.png").is_file()


def test_contrastive_task_is_learned_on_a_fixed_batch(clips, cache_dir, tmp_path) -> None:
    """60 AdamW steps on one batch take the contrastive loss far below chance (log(K+1)) and the
    accuracy far above 1/(K+1): gradients reach predictions, targets and codebooks."""
    obj = objective(clips, cache_dir, tmp_path)
    batch = obj.collate([obj.train_dataset()[i] for i in range(8)], list(range(8)))
    torch.manual_seed(0)
    model = obj.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        ctx = LossContext({k: float(v) for k, v in obj.targets(batch).items()})
        loss, logs = obj.loss(model, batch, ctx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    total, count, _ = ctx.terms["contrastive"]
    accuracy = logs["contrastive_accuracy"]
    assert float(total) / count < 0.7 * math.log(11), float(total) / count  # measured: 1.34 after 60 steps
    assert float(accuracy.numerator) / accuracy.denominator > 4 / 11


def test_resume_gives_bit_identical_weights_and_temperature(uninterrupted, clips, cache_dir, tmp_path) -> None:
    _, full = uninterrupted
    out = tmp_path / "resumed"
    pretrain(TINY, overrides(clips, cache_dir, out, max_steps=10, export=False))
    pretrain(TINY, overrides(clips, cache_dir, out, max_steps=20, resume="latest", export=False))
    a = load_file(full / "checkpoints" / "step-000020" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step-000020" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    state = [torch.load(d / "checkpoints" / "step-000020" / "objective.pt", weights_only=True) for d in (full, out)]
    assert state[0] == state[1] and state[0]["gumbel_temperature"] < 2.0


@pytest.mark.slow
def test_sigkill_then_resume_through_the_recipe_gives_bit_identical_weights_and_temperature(
        uninterrupted, clips, cache_dir, tmp_path) -> None:
    """The run is killed (no chance to save) after its step-10 checkpoint; `--resume` continues from the last
    complete checkpoint and ends where the run that was never interrupted did: weights and objective state
    (Gumbel temperature) bit for bit."""
    _, full = uninterrupted
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY),
               *cli_args(overrides(clips, cache_dir, out, max_steps=20, save_every=5, export=False))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000010").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "checkpoints" / "step-000020").exists()
    for checkpoint in (out / "checkpoints").glob("step-*"):  # whatever the kill interrupted, no torn checkpoint
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "objective.pt").is_file()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, check=False, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a = load_file(full / "checkpoints" / "step-000020" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step-000020" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after SIGKILL and resume"
    state = [torch.load(d / "checkpoints" / "step-000020" / "objective.pt", weights_only=True) for d in (full, out)]
    assert state[0] == state[1] and state[0]["gumbel_temperature"] < 2.0


def test_export_loads_in_stock_transformers_offline(uninterrupted) -> None:
    from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2ForPreTraining

    _, out = uninterrupted
    export = out / "model"
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.bin"))
    encoder = AutoModel.from_pretrained(export)
    extractor = AutoFeatureExtractor.from_pretrained(export)
    assert type(encoder).__name__ == "Wav2Vec2Model" and extractor.sampling_rate == 16_000
    trained = load_file(out / "checkpoints" / "step-000020" / "model.safetensors")
    assert torch.equal(encoder.feature_projection.projection.weight,
                       trained["model.wav2vec2.feature_projection.projection.weight"])
    inputs = extractor([np.random.default_rng(0).standard_normal(16_000).astype(np.float32)], sampling_rate=16_000,
                       return_tensors="pt")
    assert encoder(**inputs).last_hidden_state.shape == (1, 49, 32)
    assert Wav2Vec2ForPreTraining.from_pretrained(export).config.num_negatives == 10
    card = (export / "README.md").read_text()
    assert "wav2vec2" in card and "eval_contrastive_accuracy" in card and "chance is 0.0909" in card


def test_collapse_alarm_says_what_happened_and_what_to_try(clips, cache_dir, tmp_path, caplog) -> None:
    obj = objective(clips, cache_dir, tmp_path)
    obj._last_perplexity = torch.tensor([0.5, 9.0])
    _, alarm = obj.step_hooks()
    with caplog.at_level(logging.WARNING, logger="speechssl.wav2vec2"):
        alarm(None, obj.config.train.log_every)
    assert "codebook collapse" in caplog.text and "0.5 of 16" in caplog.text
    assert "diversity_weight" in caplog.text and "learning_rate" in caplog.text and "warmup" in caplog.text


def test_presets_load_and_base_is_the_paper_size() -> None:
    tiny = build_config(TINY)
    base = build_config(CONFIGS / "wav2vec2_base.yaml")
    assert tiny.objective == base.objective == "wav2vec2"
    model = Wav2Vec2Objective(base).build_model()
    parameters = sum(p.numel() for p in model.model.wav2vec2.parameters())
    assert 93e6 < parameters < 96e6, parameters  # the paper's BASE: 95M
    assert base.masking.num_negatives == 100 and base.train.mixed_precision in ("bf16", "fp16")


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(clips, cache_dir, tmp_path) -> None:
    one = tmp_path / "one"
    # 4 steps x 8 clips stay inside the first epoch (~9 micro-batches of 4): at an epoch's end one process
    # accumulating 2 takes a last short window where two processes drop the incomplete round.
    pretrain(TINY, overrides(clips, cache_dir, one, max_steps=4, save_every=4, per_device_batch_size=4,
                             gradient_accumulation_steps=2, export=False))
    args = cli_args(overrides(clips, cache_dir, tmp_path / "two", max_steps=4, save_every=4, per_device_batch_size=4,
                              export=False))
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "pretrain.py"),
         "--config", str(TINY), *args], capture_output=True, text=True, check=False, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 4" in two.stderr
    a = load_file(one / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step-000004" / "model.safetensors")
    torch.manual_seed(0)
    init = Wav2Vec2Objective(build_config(TINY, overrides(clips, cache_dir, one))).build_model().state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3, "the weights did not move"
    assert worst < moved / 100, f"largest weight difference {worst} (the run moved weights by up to {moved})"
