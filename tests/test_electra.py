"""ELECTRA replaced-token detection (textssl.electra): how tokens are masked, sampled and labelled, the
discriminator beating the all-"original" baseline, 1 vs 2 processes, exact resume, and exports that stock
transformers loads offline (and textssl.finetune fine-tunes)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslcore.api import build_config, pretrain
from sslcore.data import example_seed
from sslcore.registry import get_objective
from textssl.electra import ElectraRTDObjective, GeneratorDiscriminator, replace_tokens, rtd_loss, sample_tokens
from textssl.masking import IGNORE_INDEX

CONFIGS = Path(__file__).parent.parent / "recipes" / "configs"
CONFIG = CONFIGS / "electra_rtd_tiny.yaml"
SMALL = {"embedding_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2}
"""A seconds-long model: discriminator 1 x 32, generator 1 x 8."""


def tiny(cache_dir, output_dir, model=None, **train):
    """Overrides for a short run on the corpus slice the other text tests use (shared cache)."""
    return {
        "data": {"corpus": {"max_documents": 120, "validation_fraction": 0.15, "cache_dir": cache_dir},
                 "max_seq_length": 64, "num_proc": 1},
        "tokenizer": {"vocab_size": 2000},
        "model": model or SMALL,
        "train": {"output_dir": str(output_dir), "per_device_batch_size": 16, "log_every": 5, "eval_every": 0,
                  "eval_batches": 4, "save_every": 0, "report_to": [], "progress_bar": False, "num_threads": 1,
                  "learning_rate": 1e-3, "warmup_steps": 2, "max_steps": 10, **train},
    }


@pytest.fixture(scope="module")
def objective(cache_dir):
    config = build_config(CONFIG, tiny(cache_dir, "unused"))
    objective = get_objective(config.objective)(config)
    objective.prepare()
    return objective


def batch_of(objective, rows=32, seed=3):
    data = objective.train_dataset()
    return objective.collate([data[i] for i in range(rows)], [example_seed(seed, 0, i) for i in range(rows)])


# -- masking, sampling, labels ------------------------------------------------------------------------------
def test_masking_follows_electra_and_is_fixed_by_the_seeds(objective):
    assert isinstance(objective, ElectraRTDObjective)
    batch = batch_of(objective)
    data = objective.train_dataset()
    originals = torch.stack([data[i]["input_ids"] for i in range(32)]).long()
    selected = batch["labels"] != IGNORE_INDEX
    maskable = ~torch.isin(originals, objective.special_ids)
    # 15% of each row's maskable tokens, never a special token; labels hold the originals there.
    assert torch.equal(selected.sum(1), (0.15 * maskable.sum(1)).round().long())
    assert not (selected & ~maskable).any()
    assert torch.equal(batch["labels"][selected], originals[selected])
    # ELECTRA shows the generator [MASK] at 85% of them and the original at the rest (no random tokens).
    shown_mask = batch["input_ids"] == objective.tokenizer.mask_token_id
    assert torch.equal(batch["input_ids"][~shown_mask], originals[~shown_mask]) and not (shown_mask & ~selected).any()
    n, fraction = int(selected.sum()), float(shown_mask.sum() / selected.sum())
    assert abs(fraction - 0.85) < 4 * math.sqrt(0.85 * 0.15 / n), fraction
    # One sampling uniform per position, drawn from the example's seed: the same seeds give the same batch.
    uniforms = batch["sample_uniforms"]
    assert uniforms.shape == originals.shape and uniforms.min() >= 0 and uniforms.max() < 1
    again, other = batch_of(objective), batch_of(objective, seed=4)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(batch["sample_uniforms"], other["sample_uniforms"])
    assert not torch.equal(batch["labels"], other["labels"])


def test_sampling_follows_the_generator_distribution_and_never_draws_a_banned_token():
    torch.manual_seed(0)
    logits = torch.randn(6).expand(100_000, 6).contiguous()
    banned = torch.tensor([True, False, False, True, False, False])
    sampled = sample_tokens(logits, torch.rand(100_000), banned)
    expected = torch.softmax(logits[0].masked_fill(banned, float("-inf")), -1)
    observed = torch.bincount(sampled, minlength=6).double() / len(sampled)
    assert observed[banned].sum() == 0
    # Within 5 binomial standard errors of the softmax probability, for every token.
    assert ((observed - expected).abs() <= 5 * (expected * (1 - expected) / len(sampled)).sqrt() + 1e-9).all()
    # The uniform decides: u -> 0 takes the first allowed token, u -> 1 the last; same uniforms, same tokens.
    edges = sample_tokens(logits[:2], torch.tensor([0.0, 1.0 - 1e-7]), banned)
    assert edges.tolist() == [1, 5]
    u = torch.rand(1000)
    assert torch.equal(sample_tokens(logits[:1000], u, banned), sample_tokens(logits[:1000], u, banned))


def test_a_sample_equal_to_the_original_is_labelled_original():
    originals = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 22, 3]])
    selected = torch.tensor([[False, True, False, True, False], [False, True, True, False, False]])
    sampled = torch.tensor([10, 40, 50, 21])  # row-major: (0,1) same, (0,3) new, (1,1) new, (1,2) same
    corrupted, replaced = replace_tokens(originals, selected, sampled)
    assert corrupted.tolist() == [[2, 10, 11, 40, 3], [2, 50, 21, 22, 3]]
    assert replaced.tolist() == [[False, False, False, True, False], [False, True, False, False, False]]
    # A generator that always predicts the original replaces nothing: every label is "original".
    vocab_logits = torch.full((4, 60), -30.0)
    vocab_logits[torch.arange(4), originals[selected]] = 30.0
    perfect = sample_tokens(vocab_logits, torch.rand(4), torch.zeros(60, dtype=torch.bool))
    assert not replace_tokens(originals, selected, perfect)[1].any()


def test_replaced_tokens_are_a_subset_of_the_masked_ones_and_the_logs_add_up(objective):
    torch.manual_seed(0)
    batch = batch_of(objective)
    model = objective.build_model().eval()
    assert isinstance(model, GeneratorDiscriminator)
    # One embedding layer for both, and the generator's output layer is its token table.
    shared = model.discriminator.electra.embeddings
    assert model.generator.electra.embeddings is shared
    assert model.generator.generator_lm_head.weight is shared.word_embeddings.weight
    with torch.no_grad():
        generator_logits, targets, discriminator_logits, replaced = model(**batch)
    selected = batch["labels"] != IGNORE_INDEX
    assert generator_logits.shape == (int(selected.sum()), len(objective.tokenizer))
    assert torch.equal(targets, batch["labels"][selected]) and discriminator_logits.shape == replaced.shape
    assert not (replaced & ~selected).any()
    # A fresh generator is near uniform: nearly every masked position gets another token.
    assert 0.9 < replaced.sum() / selected.sum() <= 1.0
    total, logs = rtd_loss(discriminator_logits, replaced, None)
    tokens = replaced.numel()
    assert float(logs["replaced_fraction"][0]) == replaced.sum() and logs["replaced_fraction"][1] == tokens
    assert float(logs["rtd_baseline_accuracy"][0]) == tokens - replaced.sum()
    reference = torch.nn.functional.binary_cross_entropy_with_logits(discriminator_logits, replaced.float())
    assert float(total) / tokens == pytest.approx(float(reference), rel=1e-5)
    # Padding is left out of the loss and of every count.
    real = torch.ones_like(replaced)
    real[:, -8:] = False
    padded_total, padded_logs = rtd_loss(discriminator_logits, replaced, real)
    assert padded_logs["rtd_accuracy"][1] == real.sum()
    assert float(padded_total) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(
        discriminator_logits[real], replaced[real].float(), reduction="sum")), rel=1e-5)


def test_targets_count_masked_tokens_for_the_generator_and_every_real_token_for_the_discriminator(objective):
    batch = batch_of(objective, rows=4)
    counts = objective.targets(batch)
    assert int(counts["mlm"]) == int((batch["labels"] != IGNORE_INDEX).sum())
    assert int(counts["rtd"]) == batch["input_ids"].numel()  # packed blocks: no padding
    padded = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    padded["attention_mask"][:, -10:] = 0
    assert int(objective.targets(padded)["rtd"]) == int(padded["attention_mask"].sum())


def test_a_bad_generator_size_is_a_clear_config_error(cache_dir):
    from sslcore.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.generator_size must be in \(0, 1\]"):
        build_config(CONFIG, tiny(cache_dir, "unused", model={**SMALL, "generator_size": 1.5}))
    with pytest.raises(ConfigError, match="not a multiple of its"):
        build_config(CONFIG, tiny(cache_dir, "unused", model={**SMALL, "hidden_size": 80, "num_attention_heads": 8,
                                                              "generator_size": 0.35}))


# -- trained briefly: learning and the exports ----------------------------------------------------------------
@pytest.fixture(scope="module")
def electra_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("electra_rtd")
    overrides = tiny(cache_dir, out, max_steps=20, save_every=10, eval_batches=4)
    return pretrain(CONFIG, overrides), out


def test_export_is_a_stock_discriminator_and_generator_pair_offline(electra_run, objective):
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForPreTraining,
        AutoModelForSequenceClassification,
        ElectraForMaskedLM,
        ElectraForPreTraining,
        ElectraForSequenceClassification,
        pipeline,
    )

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    result, out = electra_run
    model_dir, generator_dir = out / "model", out / "generator"
    assert result.export_dir == model_dir
    for folder in (model_dir, generator_dir):
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
        assert (folder / "tokenizer.json").is_file() and (folder / "README.md").is_file()
    trained = load_file(str(out / "checkpoints" / "step-000020" / "model.safetensors"))
    discriminator = AutoModelForPreTraining.from_pretrained(model_dir)
    assert type(discriminator) is ElectraForPreTraining
    for name, value in discriminator.state_dict().items():
        if f"discriminator.{name}" in trained:  # the shared embeddings are stored once, under either model's name
            assert torch.equal(value, trained[f"discriminator.{name}"]), name
    generator = AutoModelForMaskedLM.from_pretrained(generator_dir)
    assert type(generator) is ElectraForMaskedLM and generator.config.hidden_size == 8
    # The embeddings the two were trained with are one table, and the generator's output layer is tied to it.
    embeddings = discriminator.electra.embeddings.state_dict()
    assert all(torch.equal(v, embeddings[k]) for k, v in generator.electra.embeddings.state_dict().items())
    assert torch.equal(generator.generator_lm_head.weight, embeddings["word_embeddings.weight"])
    # The discriminator flags tokens; the generator fills masks; both as stock pipelines/classes load them.
    with torch.no_grad():
        inputs = batch_of(objective, rows=2)
        assert discriminator(input_ids=inputs["input_ids"]).logits.shape == inputs["input_ids"].shape
    fill = pipeline("fill-mask", model=str(generator_dir))
    predictions = fill(f"the government said it would {fill.tokenizer.mask_token} the plan.")
    assert len(predictions) == 5 and all(p["token_str"] for p in predictions)
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    assert type(classifier) is ElectraForSequenceClassification
    assert torch.equal(classifier.electra.encoder.layer[0].output.dense.weight,
                       discriminator.electra.encoder.layer[0].output.dense.weight)
    card, generator_card = (model_dir / "README.md").read_text(), (generator_dir / "README.md").read_text()
    assert "ELECTRA discriminator" in card and "AutoModelForSequenceClassification" in card and "gensim-wiki" in card
    assert "pipeline_tag: fill-mask" in generator_card and "final_loss" in generator_card


def test_textssl_finetune_fine_tunes_the_discriminator(electra_run, cache_dir, tmp_path):
    import textssl

    _, out = electra_run
    result = textssl.finetune(model=str(out / "model"), task="tiny-polarity", protocol="full", seeds=[0], overrides={
        "task": {"cache_dir": cache_dir}, "train": {"max_steps": 6, "eval_every": 3, "per_device_batch_size": 16,
                                                     "progress_bar": False, "output_dir": str(tmp_path / "ft")}})
    assert 0.0 <= result.test["accuracy"][0] <= 1.0
    assert (Path(result.model_dirs[0]) / "config.json").read_text().count("ElectraForSequenceClassification") == 1


def test_logs_report_the_generator_the_discriminator_and_the_baseline(electra_run):
    result, _ = electra_run
    logged = result.history[-2]  # the last train record (the final eval follows it)
    for key in ("mlm_loss", "mlm_accuracy", "rtd_loss", "rtd_bce", "rtd_accuracy", "rtd_baseline_accuracy",
                "rtd_replaced_recall", "replaced_fraction"):
        assert key in logged and math.isfinite(logged[key]), key
    # rtd_loss is the term's share of the total (weight 50 x the mean binary cross-entropy).
    assert logged["rtd_loss"] == pytest.approx(50 * logged["rtd_bce"], rel=1e-6)
    assert logged["loss"] == pytest.approx(logged["mlm_loss"] + logged["rtd_loss"], rel=1e-6)
    assert logged["rtd_baseline_accuracy"] == pytest.approx(1 - logged["replaced_fraction"], abs=1e-9)
    assert 0.0 < logged["replaced_fraction"] <= 0.15 * 62 / 64 + 0.01  # at most the masked positions
    assert {"eval_rtd_accuracy", "eval_rtd_baseline_accuracy", "eval_mlm_loss", "eval_rtd_loss"} <= set(result.eval)


RTD_STEPS = 80
"""At ELECTRA's 15% masking a discriminator this small sits on the all-"original" plateau for hundreds of
steps (its loss falls to the prior's entropy, ~0.41, and stays: 1 x 32 at 80 steps, 2 x 128 at 400): the
generator learns the unigram distribution in ~50 steps, and unigram samples are hard to spot without much
context. Masking half the tokens keeps the generator weak and the prior near 0.5, so a discriminator that
learns anything beats the baseline within 80 steps (measured: eval accuracy 0.683 vs baseline 0.516, 8k
tokens, standard error 0.006)."""


def test_rtd_accuracy_rises_above_the_all_original_baseline(cache_dir, tmp_path):
    result = pretrain(CONFIG, {**tiny(cache_dir, tmp_path, max_steps=RTD_STEPS, log_every=RTD_STEPS // 4,
                                      eval_batches=8, export=False), "masking": {"mlm_probability": 0.5}})
    accuracy, baseline = result.eval["eval_rtd_accuracy"], result.eval["eval_rtd_baseline_accuracy"]
    tokens = 8 * 16 * 64
    print(f"eval RTD accuracy {accuracy:.4f}, all-original baseline {baseline:.4f} over {tokens} tokens")
    assert 0.4 < baseline < 0.6  # half the tokens masked, nearly all of them replaced
    assert accuracy > baseline + 5 * math.sqrt(0.25 / tokens), (accuracy, baseline)
    first, last = result.history[0], result.history[-2]
    assert last["rtd_accuracy"] - last["rtd_baseline_accuracy"] > first["rtd_accuracy"] - first["rtd_baseline_accuracy"]


# -- several processes, resume --------------------------------------------------------------------------------
TWO_PROCESS_MODEL = {**SMALL, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TWO_PROCESS_TOLERANCE = 1e-4
"""L2 norm of the whole weight difference allowed between 1 and 2 processes after 6 steps (as for the other
text objectives): float rounding is ~1e-7, a different sample or a per-process mean ~1e-2 and more."""


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(cache_dir, tmp_path):
    from test_text_objectives import as_cli

    def overrides(out, batch):
        return tiny(cache_dir, out, model=TWO_PROCESS_MODEL, max_steps=6, save_every=3, per_device_batch_size=batch,
                    lr_schedule="constant", log_every=2, export=False)

    pretrain(CONFIG, overrides(tmp_path / "one", 8))
    recipe = Path(__file__).parent.parent / "recipes" / "pretrain.py"
    two = subprocess.run(
        # torchrun through `--multi_gpu` is the CPU multi-process route (`--cpu` starts one process).
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(recipe), "--config", str(CONFIG),
         *as_cli(overrides(tmp_path / "two", 4))],
        capture_output=True, text=True, check=False, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 4" in two.stderr

    def weights(run, step):
        values = load_file(tmp_path / run / "checkpoints" / f"step-{step:06d}" / "model.safetensors")
        return torch.cat([value.flatten().double() for _, value in sorted(values.items())])

    halfway, a, b = weights("one", 3), weights("one", 6), weights("two", 6)
    # The same masks and the same samples (uniforms from the example seeds) on both, and each term is the
    # mean over the whole step's masked / real tokens: the runs differ only by float rounding.
    moved, difference = (a - halfway).norm().item(), (a - b).norm().item()
    print(f"1 vs 2 processes: L2 difference {difference:.3g}; the last 3 steps moved the weights by {moved:.3g}")
    assert moved > 1000 * TWO_PROCESS_TOLERANCE, f"the weights barely moved ({moved:.3g}): the test shows nothing"
    assert difference < TWO_PROCESS_TOLERANCE, f"1 vs 2 processes differ by {difference:.3g} (L2); 3 steps move {moved:.3g}"


@pytest.mark.slow
def test_resumes_exactly(cache_dir, tmp_path):
    from test_resume import assert_resumes_exactly
    from test_resume import tiny as resume_overrides

    # Dropout on (the RNG streams matter) and one torch thread (bit-exact sums); the generator's samples
    # come from the example seeds, so the resumed half corrupts the same tokens.
    assert_resumes_exactly(CONFIG.name, lambda out, **train: resume_overrides(
        cache_dir, out, SMALL, num_threads=1, **train), tmp_path)
