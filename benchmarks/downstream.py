"""Did pretraining pay off? The same encoder fine-tuned from our checkpoint and from random init.

For each task and protocol (full fine-tuning, frozen-encoder linear probe), the model config of a
pretrained checkpoint is trained (a) from the checkpoint and (b) from fresh weights, with the same
tokenizer, budget and seeds. Writes a markdown table (`<work-dir>/RESULTS.md`, or the file `--results`
names: e.g. `--results benchmarks/RESULTS.md` to update the tracked one), a seed plot and a JSON beside
it, and adds the pretrained model's scores to its model card.

    # the README demo: after `accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml`
    python benchmarks/downstream.py --quick --model runs/bert_mlm_tiny/model
    # every task, 5 seeds per arm
    python benchmarks/downstream.py --model runs/bert_mlm_tiny/model
    # pretrain first (reused when <work-dir>/pretrain/model exists for the same config)
    python benchmarks/downstream.py --pretrain recipes/configs/bert_mlm_tiny.yaml -- --train.max_steps 3000
    # anything after `--` overrides the pretraining config; `--set key=value` the fine-tuning config
    # per-arm model selection (each arm its own learning rate, chosen on validation; test scored once with it)
    python benchmarks/downstream.py --model runs/bert_mlm_tiny/model --learning-rates 1e-4 3e-4 1e-3
    # label-budget curves: both protocols at 100, 300, 1000 labels and the whole training split
    python benchmarks/downstream.py --model runs/bert_mlm_tiny/model --labels 100 300 1000 all

With `--labels`, each seed trains on a stratified subset of the training split of that size, fixed per seed
and nested (a seed's 100 are among its 300; `sslcore.splits.stratified_subset`), in both arms alike;
validation and test stay whole. The curves (test score vs labels, pretrained vs scratch, mean ± std bands)
go beside the table as `<results>_labels.png`.

Pretrained minus scratch is reported with sigma = sqrt(std_pretrained^2 + std_scratch^2), the
spread of a difference of two single-seed runs, and Welch's t-test p-value; "helps" needs >= 2 seeds
per arm, delta > 2 sigma and p < 0.05 (`sslcore.compare`). A mistake in the arguments prints one
line and exits with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from sslcore import config as cfg
from sslcore.errors import DEBUG_HELP, MissingPathError, run_cli
from sslcore.finetune import label_budget
from textssl.downstream import compare_with_scratch, write_report

ALL_TASKS = ["movie-sentiment", "trec-coarse", "sms-spam"]
QUICK_TASKS = ["movie-sentiment"]


def pretrain_if_needed(args: argparse.Namespace) -> Path:
    if args.model:
        model = Path(args.model)
        if not (model / "config.json").is_file():
            raise MissingPathError(f"--model {model}: {'not an exported model folder (no config.json)' if model.is_dir() else 'no such folder'}; "
                                   "pretrain one with `accelerate launch recipes/pretrain.py --config "
                                   "recipes/configs/bert_mlm_tiny.yaml`")
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    pretrain_overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, epilog=DEBUG_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="exported pretrained model folder (a pretraining run's output_dir/model)")
    parser.add_argument("--pretrain", default="recipes/configs/bert_mlm_tiny.yaml",
                        help="pretraining config to run first when --model is not given")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_TASKS} (the README demo)")
    parser.add_argument("--tasks", nargs="+", help=f"default {ALL_TASKS} ({QUICK_TASKS} with --quick)")
    parser.add_argument("--protocols", nargs="+", default=["full", "probe"], choices=["full", "probe"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="fine-tuning seeds per arm (default 5; a claim needs >= 2)")
    parser.add_argument("--labels", nargs="+", type=label_budget, default=[None], metavar="N|all",
                        help="label budgets: labelled training examples per seed (stratified, fixed per seed, "
                             "nested), e.g. --labels 100 300 1000 all; default all")
    parser.add_argument("--learning-rates", nargs="+", type=float, metavar="LR",
                        help="full fine-tuning's per-arm grid (grid.learning_rates): each arm keeps the rate with the "
                             "best mean validation score; default: train.learning_rate alone")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fine-tuning config override, e.g. --set train.max_steps=500 (repeatable)")
    parser.add_argument("--work-dir", default="runs/downstream", help="where runs and fine-tuned models go")
    parser.add_argument("--results", help="markdown table to write (default <work-dir>/RESULTS.md; the plot and JSON "
                                          "go beside it)")
    args = parser.parse_args(argv)
    args.results = args.results or str(Path(args.work_dir) / "RESULTS.md")
    args.pretrain_overrides = pretrain_overrides
    args.tasks = args.tasks or (QUICK_TASKS if args.quick else ALL_TASKS)
    return args


def _main(argv: list[str]):
    args = parse_args(argv)
    model = pretrain_if_needed(args)
    overrides = cfg.parse_overrides(["--train.progress_bar=false",
                                     *(f"--{item.partition('=')[0]}={item.partition('=')[2]}" for item in args.set)])
    if args.learning_rates:
        overrides = cfg.merge(overrides, {"grid": {"learning_rates": args.learning_rates}})
    rows = compare_with_scratch(model, args.tasks, args.protocols, args.seeds, args.work_dir, overrides,
                                label_budgets=list(dict.fromkeys(args.labels)))
    command = shlex.join(["python", "benchmarks/downstream.py", *argv])
    print(write_report(rows, model, args.results, command))
    results = Path(args.results)
    curves = results.with_name(results.stem + "_labels.png")
    print(f"wrote {results} and {results.with_suffix('.png')}" + (f" and {curves}" if curves.is_file() and len(set(args.labels)) > 1 else "")
          + f"; scores added to {model / 'README.md'}")
    return rows


def main(argv: list[str] | None = None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
