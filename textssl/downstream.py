"""Did pretraining pay off? The same encoder fine-tuned from a checkpoint and from random init.

    from textssl.downstream import compare_with_scratch, write_report
    rows = compare_with_scratch("runs/bert_mlm_tiny/model", tasks=["movie-sentiment"], seeds=[0, 1, 2])
    print(write_report(rows, "runs/bert_mlm_tiny/model", "runs/downstream/RESULTS.md"))

For each task and protocol (full fine-tuning, frozen-encoder linear probe), the model config of a
pretrained checkpoint is trained (a) from the checkpoint and (b) from fresh weights, with the same
tokenizer, budget and seeds (`textssl.finetune`). Pretrained minus scratch is reported with
sigma = sqrt(std_pretrained^2 + std_scratch^2), the spread of a difference of two single-seed
runs; "pretraining helps" means delta > 2 sigma. `benchmarks/downstream.py` is the command line,
and the README demo ends with this table for the model it just pretrained.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from textssl.finetune import PROTOCOL_NAMES, FinetuneResult, add_scores_to_model_card, finetune


@dataclass
class Comparison:
    """One task and protocol: the pretrained arm against the scratch arm, over the same seeds."""

    task: str
    protocol: str
    pretrained: FinetuneResult
    scratch: FinetuneResult

    @property
    def metric(self) -> str:
        return self.pretrained.main_metric

    @property
    def delta(self) -> float:
        return self.pretrained.mean() - self.scratch.mean()

    @property
    def sigma(self) -> float:
        return math.hypot(self.pretrained.std(), self.scratch.std())

    @property
    def helps(self) -> bool:
        return self.delta > 2 * self.sigma

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "protocol": self.protocol, "delta": self.delta, "sigma": self.sigma,
                "helps": self.helps, "pretrained": self.pretrained.to_dict(), "scratch": self.scratch.to_dict()}


def compare_with_scratch(model: str | Path, tasks: Sequence[str], protocols: Sequence[str] = ("full", "probe"),
                         seeds: Sequence[int] = (0, 1, 2), work_dir: str | Path = "runs/downstream",
                         overrides: dict[str, Any] | None = None, verbose: bool = True) -> list[Comparison]:
    """Fine-tune `model` and its randomly initialised twin on every task x protocol (finished seeds are
    reused, see `textssl.finetune`). `overrides` go to every fine-tuning config (e.g. {"train": {"max_steps": 500}})."""
    overrides = {"train": {"progress_bar": False}} if overrides is None else overrides
    rows = []
    for task in tasks:
        for protocol in protocols:
            results = {}
            for init in ("pretrained", "random"):
                results[init] = finetune(model=str(model), task=task, protocol=protocol, init=init, seeds=list(seeds),
                                         output_dir=str(Path(work_dir) / "finetune" / task), overrides=overrides)
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
                      encoder=config.get("model"), vocab_size=config.get("tokenizer", {}).get("vocab_size"))
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


def comparison_table(rows: Sequence[Comparison], budget: dict[str, Any], command: str,
                     plot_name: str = "downstream.png") -> str:
    """The markdown report: summary table, then every seed's score."""
    seconds = sum(row.pretrained.seconds + row.scratch.seconds for row in rows)
    lines = [
        "# Downstream: pretrained vs scratch",
        "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
        f"fine-tuning and probing took {seconds / 60:.1f} min (every run, as measured when it ran).",
        "",
        f"Pretrained checkpoint: `{budget['checkpoint']}` ({budget.get('objective', '?')} on "
        f"{', '.join(budget.get('sources') or ['?'])}; {describe_budget(budget)}"
        + (f"; final eval loss {budget['final_eval_loss']:.3f}" if "final_eval_loss" in budget else "") + "). "
        "Scratch = the same config with fresh weights and the same tokenizer; both arms get the same fine-tuning "
        "budget and seeds. Scores are on each task's fixed test split: mean ± sample std over seeds. "
        "sigma = sqrt(std_pretrained^2 + std_scratch^2); pretraining helps where delta > 2 sigma.",
        "",
        "| task | protocol | metric | pretrained | scratch | delta | delta / sigma | seeds | pretraining budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row.delta / row.sigma if row.sigma > 0 else math.inf
        lines.append(
            f"| {row.task} | {PROTOCOL_NAMES[row.protocol]} | {row.metric} | "
            f"{row.pretrained.mean():.4f} ± {row.pretrained.std():.4f} | {row.scratch.mean():.4f} ± {row.scratch.std():.4f} | "
            f"{row.delta:+.4f} | {ratio:+.1f}{' (helps)' if row.helps else ''} | {len(row.pretrained.seeds)} | "
            f"{describe_budget(budget)} |")
    lines += ["", "Per seed (test, main metric; full fine-tuning also lists the optimizer steps each run trained):", ""]
    for row in rows:
        for name, result in (("pretrained", row.pretrained), ("scratch", row.scratch)):
            steps = f", steps {result.steps}" if row.protocol == "full" else ""
            lines.append(f"- {row.task}, {row.protocol}, {name}: "
                         f"{[round(v, 4) for v in result.test[result.main_metric]]}{steps}; {result.seconds:.0f} s")
    lines += ["", f"![pretrained vs scratch]({plot_name})", ""]
    return "\n".join(lines)


def plot_comparison(rows: Sequence[Comparison], path: str | Path, title: str) -> None:
    """Every seed's test score (dots) and the mean ± std (bar), pretrained beside scratch, per task x protocol.
    The y axis spans the scores, not [0, 1]: the gaps that matter are a few points wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 2.4 * len(rows)), 4.4))
    values = []
    for position, row in enumerate(rows):
        for offset, name, color in ((-0.18, "pretrained", "#1f77b4"), (0.18, "scratch", "#7f7f7f")):
            result = getattr(row, name)
            scores = result.test[result.main_metric]
            values += scores
            ax.scatter([position + offset] * len(scores), scores, color=color, alpha=0.5, s=18, zorder=3)
            ax.errorbar(position + offset, result.mean(), yerr=result.std(), fmt="_", markersize=22, capsize=5,
                        color=color, label=name if position == 0 else None, zorder=4)
    ax.set_xticks(range(len(rows)), [f"{row.task}\n{PROTOCOL_NAMES[row.protocol]}\n({row.metric}, "
                                     f"delta {row.delta:+.3f})" for row in rows], fontsize=8)
    spread = max(values) - min(values) if values else 1.0
    ax.set_ylim(min(values) - 0.15 * spread - 0.01, max(values) + 0.15 * spread + 0.01)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("test score (dots: seeds; bar: mean ± std)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[Comparison], model: str | Path, results_path: str | Path, command: str = "") -> str:
    """Write the markdown table, the bar chart beside it (same name, .png), a JSON of every score, and add
    the pretrained arm's scores to the model's card. Returns the markdown."""
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    budget = pretraining_budget(model)
    plot_path = results_path.with_suffix(".png")
    text = comparison_table(rows, budget, command or "textssl.downstream.write_report", plot_path.name)
    results_path.write_text(text)
    plot_comparison(rows, plot_path, f"{budget['checkpoint']}\npretrained ({describe_budget(budget)}) vs random init")
    results_path.with_suffix(".json").write_text(json.dumps(
        {"budget": budget, "rows": [row.to_dict() for row in rows]}, indent=1, default=str))
    add_scores_to_model_card(model, [row.pretrained for row in rows])
    return text


__all__ = ["Comparison", "compare_with_scratch", "comparison_table", "describe_budget", "plot_comparison",
           "pretraining_budget", "write_report"]
