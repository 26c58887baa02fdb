"""Did speech pretraining pay? A wav2vec 2.0 upstream against the same architecture from random init, on the
SUPERB-style speech tasks, with both protocols, over seeds.

Optionally pretrains first (`--pretrain-steps N`): the `wav2vec2` objective on `--pretrain-sources` (default
`speech-mixed`, 9.5 h; `asterisk-en` is the quick 0.4 h one) minus every validation/test clip of the tasks
(`speechssl.tasks.write_pretraining_folder`), so no score is on audio the upstream heard. Then, for each task x protocol, `speechssl.finetune` runs the pretrained and the
scratch arm with the same budget and seeds; the table, the seed plot and the statistics (delta, sigma,
Welch p, verdict; lower CER is better) are `sslcore.compare`'s, shared with text and vision. A second plot
shows the probe's learned layer weights.

    # the full benchmark (6000 steps: 53 min of pretraining on 2 shared cores, then 3 seeds per arm):
    OMP_NUM_THREADS=1 python benchmarks/speech_downstream.py --pretrain-steps 6000 --seeds 0 1 2
    # the probe table in benchmarks/RESULTS_speech.md (keywords and speaker ID; the ASR probe takes much longer):
    OMP_NUM_THREADS=1 python benchmarks/speech_downstream.py --pretrain-steps 6000 --protocols probe \
        --tasks speech-keywords asterisk-speakers --seeds 0 1 2
    # a smoke run on an existing upstream:
    python benchmarks/speech_downstream.py --model runs/wav2vec2_tiny/model --tasks asterisk-speakers \
        --protocols probe --seeds 0 1 --results runs/speech_smoke/RESULTS_speech.md
    # an interrupted run, started again with the same arguments, reuses every seed it finished (probe and full)
    # anything after `--` goes to every fine-tuning config, e.g. -- --probe.epochs 50 --train.max_steps 300
    # per-arm learning rates for full fine-tuning, and label-budget curves (utterances per seed; `all` = every one):
    python benchmarks/speech_downstream.py --model runs/wav2vec2_tiny/model --learning-rates 3e-5 1e-4 3e-4 \
        --labels 100 300 all
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from sslcore.compare import Comparison, write_report
from sslcore.finetune import label_budget
from speechssl.finetune import PROTOCOL_NAMES, finetune

TASKS = ("speech-keywords", "asterisk-speakers", "asterisk-en-asr")


def pretrain_upstream(work_dir: Path, steps: int, seed: int, extra: list[str],
                      sources: tuple[str, ...] = ("speech-mixed",)) -> Path:
    """The tiny wav2vec2 preset for `steps` steps on `sources` minus every validation/test clip of the tasks; its
    model folder."""
    from sslcore.api import build_config, pretrain
    from speechssl.tasks import write_pretraining_folder

    corpus = work_dir / "pretraining_audio"
    if not corpus.is_dir():  # ~15k WAV files for speech-mixed: written once per work dir
        write_pretraining_folder(corpus, sources=sources)
    out = work_dir / "wav2vec2_tiny"
    if (out / "model" / "config.json").is_file() and (out / "pretrain_seconds.json").is_file():
        print(f"reusing the pretrained upstream in {out}", flush=True)
        return out / "model"
    config = build_config("recipes/configs/wav2vec2_tiny.yaml", [
        "--data.sources", f"[{corpus}]", "--train.max_steps", str(steps), "--train.seed", str(seed),
        "--train.output_dir", str(out), "--train.report_to", "[]", "--train.progress_bar", "false",
        "--train.save_every", "500", "--train.resume", "auto", "--train.eval_every", str(max(steps // 6, 1)), *extra])
    started = time.perf_counter()
    pretrain(config)
    (out / "pretrain_seconds.json").write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    return out / "model"


def budget_note(model: Path) -> tuple[str, str]:
    """(a sentence on the upstream, a short budget) from its run folder, as the trainer wrote it."""
    run = model.parent
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    train, data, shape = config.get("train", {}), config.get("data", {}), config.get("model", {})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (run / "metrics.jsonl").is_file() else []
    steps = max((r["step"] for r in records if "loss" in r), default=train.get("max_steps"))
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    seconds = json.loads((run / "pretrain_seconds.json").read_text())["seconds"] if (run / "pretrain_seconds.json").is_file() else None
    budget = f"{steps} steps x {train.get('per_device_batch_size', '?')} clips" + (f", {seconds / 60:.0f} min" if seconds else "")
    last_eval = {k: round(v, 4) for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
    note = (f"Upstream: `{model}` (wav2vec2, hidden {shape.get('hidden_size', '?')}, {shape.get('num_hidden_layers', '?')} "
            f"layers; pretrained on {', '.join(data.get('sources', ['?']))} for {budget}; last eval {last_eval}).")
    return note, budget


def plot_layer_weights(rows: list[Comparison], path: Path) -> bool:
    """Mean learned layer weight (over seeds) per hidden state, pretrained vs scratch, one panel per probe row."""
    probes = [row for row in rows if row.protocol == "probe" and row.pretrained.layer_weights]
    if not probes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probes), figsize=(3.6 * len(probes), 3.2), squeeze=False)
    for ax, row in zip(axes[0], probes):
        for offset, name, arm, color in ((-0.2, "pretrained", row.pretrained, "#1f77b4"),
                                         (0.2, "scratch", row.scratch, "#7f7f7f")):
            means = [statistics.fmean(values) for values in zip(*arm.layer_weights)]
            ax.bar([i + offset for i in range(len(means))], means, width=0.4, color=color, label=name)
        ax.set_title(row.task + ("" if row.label_budget is None else f", {row.label_budget} labels"), fontsize=9)
        ax.set_xlabel("hidden state (0 = CNN features)")
        ax.set_ylabel("softmax layer weight")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an existing wav2vec2 model folder (else --pretrain-steps pretrains one)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="pretrain the tiny preset this many steps first")
    parser.add_argument("--pretrain-sources", nargs="+", default=["speech-mixed"],
                        help="audio sources to pretrain on, minus every validation/test clip of the tasks "
                             "(default: %(default)s; asterisk-en is the quick one)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--protocols", nargs="+", default=["probe", "full"], choices=["probe", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--labels", nargs="+", type=label_budget, default=[None], metavar="N|all",
                        help="label budgets: training utterances per seed (stratified, fixed per seed, nested), e.g. "
                             "--labels 100 300 all; default all. Several draw the label-budget curves")
    parser.add_argument("--learning-rates", nargs="+", type=float, metavar="LR",
                        help="full fine-tuning's per-arm grid (grid.learning_rates), chosen on validation per arm")
    parser.add_argument("--work-dir", default="runs/speech_downstream")
    parser.add_argument("--results", default="benchmarks/RESULTS_speech.md")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    work_dir = Path(args.work_dir)
    if args.model:
        model = Path(args.model)
    elif args.pretrain_steps:
        model = pretrain_upstream(work_dir, args.pretrain_steps, seed=0, extra=[], sources=tuple(args.pretrain_sources))
    else:
        parser.error("give --model (a wav2vec2 folder) or --pretrain-steps N")

    if args.learning_rates:
        extra += ["--grid.learning_rates", "[" + ",".join(map(str, args.learning_rates)) + "]"]
    rows = []
    for task in args.tasks:
        for protocol in args.protocols:
            for budget in dict.fromkeys(args.labels):
                arms = {}
                for init in ("pretrained", "random"):
                    arms[init] = finetune(model=str(model), task=task, protocol=protocol, init=init, seeds=args.seeds,
                                          output_dir=str(work_dir / "finetune" / task),
                                          overrides=[*extra, "--label_budget", "null" if budget is None else str(budget)])
                    print(f"{arms[init].summary()} ({arms[init].seconds:.0f} s)"
                          + (f"; layer weights {arms[init].layer_weights}" if protocol == "probe" else ""), flush=True)
                rows.append(Comparison(task, protocol, arms["pretrained"], arms["random"]))

    note, budget = budget_note(model)
    command = "python benchmarks/speech_downstream.py " + shlex.join(sys.argv[1:])
    results = Path(args.results)
    text = write_report(rows, results, command=command, checkpoint_note=note, budget_note=budget,
                        protocol_names=PROTOCOL_NAMES, plot_title=f"{model}\npretrained ({budget}) vs random init",
                        extra={"upstream": str(model), "budget": budget})
    layers_png = results.with_name(results.stem + "_layers.png")
    if plot_layer_weights(rows, layers_png):
        weights = "\n".join(
            f"- {row.task}{'' if row.label_budget is None else f' ({row.label_budget} labels)'}: pretrained "
            f"{[round(statistics.fmean(v), 3) for v in zip(*row.pretrained.layer_weights)]}, "
            f"scratch {[round(statistics.fmean(v), 3) for v in zip(*row.scratch.layer_weights)]}"
            for row in rows if row.protocol == "probe")
        text += (f"\nLearned layer weights of the weighted-layer probe (mean over seeds; hidden state 0 = the CNN "
                 f"features, then each transformer layer):\n\n{weights}\n\n![layer weights]({layers_png.name})\n")
        results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
