"""Did pretraining pay off? The same encoder fine-tuned from our checkpoint and from random init.

For each task and protocol (full fine-tuning, frozen-encoder linear probe), the model config of a
pretrained checkpoint is trained (a) from the checkpoint and (b) from fresh weights, with the same
tokenizer, budget and seeds. Writes a markdown table (benchmarks/RESULTS.md) and a bar chart, and
adds the pretrained model's scores to its model card.

    # the README demo: after `accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml`
    python benchmarks/downstream.py --quick --model runs/bert_mlm_tiny/model
    # every task, 3 seeds
    python benchmarks/downstream.py --model runs/bert_mlm_tiny/model
    # pretrain first (reused when <work-dir>/pretrain/model exists for the same config)
    python benchmarks/downstream.py --pretrain recipes/configs/bert_mlm_tiny.yaml -- --train.max_steps 3000
    # anything after `--` overrides the pretraining config; `--set key=value` the fine-tuning config

Pretrained minus scratch is reported with sigma = sqrt(std_pretrained^2 + std_scratch^2), the
spread of a difference of two single-seed runs; "pretraining helps" means delta > 2 sigma.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


from sslcore import config as cfg
from textssl.finetune import PROTOCOL_NAMES, FinetuneResult, add_scores_to_model_card, finetune

ALL_TASKS = ["movie-sentiment", "trec-coarse", "sms-spam"]
QUICK_TASKS = ["movie-sentiment"]
HERE = Path(__file__).resolve().parent


@dataclass
class Row:
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


def pretraining_budget(model_dir: Path) -> dict:
    """What went into the checkpoint, from the run folder the trainer wrote around `model/`."""
    run_dir = model_dir.parent
    budget: dict = {"checkpoint": str(model_dir)}
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


def describe_budget(budget: dict) -> str:
    parts = []
    if budget.get("steps"):
        parts.append(f"{budget['steps']} steps")
    if budget.get("tokens"):
        parts.append(f"{budget['tokens'] / 1e6:.1f}M tokens")
    if budget.get("seconds"):
        parts.append(f"{budget['seconds'] / 60:.0f} min CPU")
    return ", ".join(parts) or "unknown"


def pretrain_if_needed(args: argparse.Namespace) -> Path:
    if args.model:
        model = Path(args.model)
        if not (model / "config.json").is_file():
            sys.exit(f"--model {model}: not an exported model folder (no config.json); pretrain one with "
                     "`accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml`")
        return model
    from sslcore.api import build_config, pretrain

    output_dir = Path(args.work_dir) / "pretrain"
    config = build_config(args.pretrain, [*args.pretrain_overrides, "--train.output_dir", str(output_dir)])
    wanted = json.loads(json.dumps(cfg.to_dict(config)))
    previous = output_dir / "config.json"
    if (output_dir / "model" / "config.json").is_file() and previous.is_file() \
            and json.loads(previous.read_text()) == wanted:
        print(f"reusing the pretrained model in {output_dir / 'model'}")
        return output_dir / "model"
    started = time.perf_counter()
    result = pretrain(config)
    (output_dir / "pretrain_seconds.json").write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    return Path(result.export_dir)


def run(args: argparse.Namespace) -> list[Row]:
    model = pretrain_if_needed(args)
    overrides = cfg.parse_overrides(["--train.progress_bar=false",
                                     *(f"--{item.partition('=')[0]}={item.partition('=')[2]}" for item in args.set)])
    rows = []
    for task in args.tasks:
        for protocol in args.protocols:
            results = {}
            for init in ("pretrained", "random"):
                started = time.perf_counter()
                results[init] = finetune(
                    model=str(model), task=task, protocol=protocol, init=init, seeds=args.seeds,
                    output_dir=str(Path(args.work_dir) / "finetune" / task), overrides=overrides)
                print(f"{results[init].summary()} ({time.perf_counter() - started:.0f} s)", flush=True)
            rows.append(Row(task, protocol, results["pretrained"], results["random"]))
    return rows


def markdown(rows: list[Row], budget: dict, args: argparse.Namespace, seconds: float) -> str:
    command = " ".join(["python", "benchmarks/downstream.py", *sys.argv[1:]])
    lines = [
        "# Downstream: pretrained vs scratch",
        "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
        f"the benchmark took {seconds / 60:.1f} min.",
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
    lines += ["", "Per seed (test, main metric; full fine-tuning also lists the optimizer steps early stopping kept):", ""]
    for row in rows:
        for name, result in (("pretrained", row.pretrained), ("scratch", row.scratch)):
            steps = f", steps {result.steps}" if row.protocol == "full" else ""
            lines.append(f"- {row.task}, {row.protocol}, {name}: "
                         f"{[round(v, 4) for v in result.test[result.main_metric]]}{steps}; {result.seconds:.0f} s")
    lines += ["", "![pretrained vs scratch](downstream.png)", ""]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row.task}\n{row.protocol} ({row.metric})" for row in rows]
    positions = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(rows)), 4.2))
    for offset, name, color in ((-width / 2, "pretrained", "#1f77b4"), (width / 2, "scratch", "#b0b0b0")):
        results = [getattr(row, name) for row in rows]
        ax.bar([p + offset for p in positions], [r.mean() for r in results], width, yerr=[r.std() for r in results],
               capsize=4, label=name, color=color)
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_ylabel("test score (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    pretrain_overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="exported pretrained model folder (a pretraining run's output_dir/model)")
    parser.add_argument("--pretrain", default="recipes/configs/bert_mlm_tiny.yaml",
                        help="pretraining config to run first when --model is not given")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_TASKS} (the README demo)")
    parser.add_argument("--tasks", nargs="+", help=f"default {ALL_TASKS} ({QUICK_TASKS} with --quick)")
    parser.add_argument("--protocols", nargs="+", default=["full", "probe"], choices=["full", "probe"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fine-tuning config override, e.g. --set train.max_steps=500 (repeatable)")
    parser.add_argument("--work-dir", default="runs/downstream", help="where runs and fine-tuned models go")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown table to write")
    args = parser.parse_args(argv)
    args.pretrain_overrides = pretrain_overrides
    args.tasks = args.tasks or (QUICK_TASKS if args.quick else ALL_TASKS)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    rows = run(args)
    model = Path(args.model) if args.model else Path(args.work_dir) / "pretrain" / "model"
    budget = pretraining_budget(model)
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(markdown(rows, budget, args, time.perf_counter() - started))
    plot(rows, results_path.with_name("downstream.png"),
         f"{Path(budget['checkpoint']).parent.name}: pretrained ({describe_budget(budget)}) vs random init")
    add_scores_to_model_card(model, [row.pretrained for row in rows])
    (Path(args.work_dir) / "downstream.json").write_text(json.dumps(
        {"budget": budget, "rows": [{"task": r.task, "protocol": r.protocol, "pretrained": r.pretrained.to_dict(),
                                     "scratch": r.scratch.to_dict()} for r in rows]}, indent=1, default=str))
    print(results_path.read_text())
    print(f"wrote {results_path}, {results_path.with_name('downstream.png')}; scores added to {model / 'README.md'}")
    return rows


if __name__ == "__main__":
    main()
