"""Did pretraining pay off? The same text encoder fine-tuned from a checkpoint and from random init.

    from textssl.downstream import compare_with_scratch, write_report
    rows = compare_with_scratch("runs/bert_mlm_tiny/model", tasks=["movie-sentiment"], seeds=[0, 1, 2, 3, 4])
    print(write_report(rows, "runs/bert_mlm_tiny/model", "runs/downstream/RESULTS.md"))

For each task and protocol (full fine-tuning, frozen-encoder linear probe), the model config of a
pretrained checkpoint is trained (a) from the checkpoint and (b) from fresh weights, with the same
tokenizer, budget and seeds (`textssl.finetune`). This is the text layer: it runs the arms and reads
the pretraining budget from the run folder; the statistics (delta, sigma, Welch's t-test, the
verdict), the report and the seed plot are `sslcore.compare`'s, shared with speech and vision.
`benchmarks/downstream.py` is the command line, and the README demo ends with this table for the
model it just pretrained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslcore.compare import Comparison
from sslcore.compare import write_report as write_comparison_report
from textssl.finetune import PROTOCOL_NAMES, add_scores_to_model_card, finetune


def compare_with_scratch(model: str | Path, tasks: Sequence[str], protocols: Sequence[str] = ("full", "probe"),
                         seeds: Sequence[int] = (0, 1, 2), work_dir: str | Path = "runs/downstream",
                         overrides: dict[str, Any] | None = None, verbose: bool = True,
                         label_budgets: Sequence[int | None] = (None,)) -> list[Comparison]:
    """Fine-tune `model` and its randomly initialised twin on every task x protocol x label budget (finished
    seeds are reused, see `textssl.finetune`). `overrides` go to every fine-tuning config (e.g.
    {"train": {"max_steps": 500}}, or {"grid": {"learning_rates": [1e-4, 3e-4, 1e-3]}} for per-arm model
    selection); `label_budgets`: labelled training examples per seed, None = all (e.g. (100, 300, 1000, None)
    for the label-budget curves)."""
    overrides = {"train": {"progress_bar": False}} if overrides is None else overrides
    rows = []
    for task in tasks:
        for protocol in protocols:
            for budget in label_budgets:
                results = {}
                for init in ("pretrained", "random"):
                    results[init] = finetune(model=str(model), task=task, protocol=protocol, init=init,
                                             seeds=list(seeds), output_dir=str(Path(work_dir) / "finetune" / task),
                                             overrides={**overrides, "label_budget": budget})
                    if verbose:  # seconds as measured when each seed ran (finished seeds are reused)
                        print(f"{results[init].summary()} ({results[init].seconds:.0f} s)", flush=True)
                rows.append(Comparison(task, protocol, results["pretrained"], results["random"]))
    return rows


def pretraining_budget(model_dir: str | Path) -> dict[str, Any]:
    """What went into the checkpoint, from the run folder the trainer wrote around `model/`."""
    model_dir = Path(model_dir)
    run_dir = model_dir.parent
    budget: dict[str, Any] = {"checkpoint": str(model_dir)}
    run_config = run_dir / "config.json"
    if run_config.is_file():
        config = json.loads(run_config.read_text())
        train, data = config.get("train", {}), config.get("data", {})
        budget.update(objective=config.get("objective"), max_steps=train.get("max_steps"),
                      batch=train.get("per_device_batch_size", 0) * train.get("gradient_accumulation_steps", 1),
                      seq_len=data.get("max_seq_length"), sources=data.get("corpus", {}).get("sources"),
                      encoder=config.get("model"), vocab_size=config.get("tokenizer", {}).get("vocab_size"),
                      word2vec_init_epochs=config.get("embedding_init", {}).get("epochs", 0))
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        if steps:
            budget["steps"] = max(steps)
        if evals:
            budget["final_eval_loss"] = evals[-1]["eval_loss"]
            budget.update({k: v for k, v in evals[-1].items() if k.endswith("accuracy")})
    timing = run_dir / "pretrain_seconds.json"
    if timing.is_file():
        budget.update(json.loads(timing.read_text()))
    if budget.get("steps") and budget.get("batch") and budget.get("seq_len"):
        budget["tokens"] = budget["steps"] * budget["batch"] * budget["seq_len"]
    return budget


def describe_budget(budget: dict[str, Any]) -> str:
    parts = []
    if budget.get("steps"):
        parts.append(f"{budget['steps']} steps")
    if budget.get("tokens"):
        parts.append(f"{budget['tokens'] / 1e6:.1f}M tokens")
    if budget.get("seconds"):
        parts.append(f"{budget['seconds'] / 60:.0f} min CPU")
    return ", ".join(parts) or "unknown"


def checkpoint_note(budget: dict[str, Any]) -> str:
    """One sentence on the pretrained checkpoint for the report."""
    start = (f", token embeddings started from {budget['word2vec_init_epochs']} epochs of skip-gram"
             if budget.get("word2vec_init_epochs") else "")
    return (f"Pretrained checkpoint: `{budget['checkpoint']}` ({budget.get('objective', '?')} on "
            f"{', '.join(budget.get('sources') or ['?'])}{start}; {describe_budget(budget)}"
            + (f"; final eval loss {budget['final_eval_loss']:.3f}" if "final_eval_loss" in budget else "") + ").")


def write_report(rows: Sequence[Comparison], model: str | Path, results_path: str | Path, command: str = "") -> str:
    """Write the markdown table, the seed plot beside it (same name, .png) and a JSON of every score
    (`sslcore.compare.write_report`), and add the pretrained arm's scores to the model's card. Returns the markdown."""
    budget = pretraining_budget(model)
    text = write_comparison_report(
        rows, results_path, command=command or "textssl.downstream.write_report", checkpoint_note=checkpoint_note(budget),
        budget_note=describe_budget(budget), protocol_names=PROTOCOL_NAMES,
        plot_title=f"{budget['checkpoint']}\npretrained ({describe_budget(budget)}) vs random init", extra={"budget": budget})
    add_scores_to_model_card(model, [row.pretrained for row in rows])
    return text


__all__ = ["checkpoint_note", "compare_with_scratch", "describe_budget", "pretraining_budget", "write_report"]
