"""The README demo: pretrain a small BERT, look at what it learned, then ask whether it paid off.

    python recipes/demo.py                       # ~16 minutes on 2 free CPU cores (measured 2026-12-03, README)
    python recipes/demo.py --train.max_steps 100 # any pretraining config override works
    python recipes/demo.py --no-downstream       # stop after the fill-mask examples
    python recipes/demo.py --seeds [0,1,2,3,4]   # more seeds per arm for the pretrained-vs-scratch table
    python recipes/demo.py --help                # every option, with the value the demo would use

Builds the corpus (`recipes/configs/bert_mlm_demo.yaml`: the offline `mixed` sources that can be
fetched, gensim's Wikipedia excerpt and Lee news at least, plus the sentiment task's unlabelled
training text), trains a WordPiece tokenizer, starts the token embeddings from skip-gram vectors of its pieces,
pretrains with masked-LM (loss, throughput and ETA in the log), exports a stock transformers folder, shows fill-mask predictions on held-out
sentences, writes the loss-curve PNG, and ends with the pretrained-vs-random-init table (`textssl.downstream`):
a linear probe of the frozen encoder, 3 seeds per arm by default, on movie-review sentiment (whose unlabelled
training text is in the corpus) and on question type (trec-coarse) and SMS spam, whose text the corpus never
contains: transfer. Its scores also go into the model card. Full fine-tuning, per-arm learning rates and
label-budget curves take longer: `benchmarks/downstream.py` (README, "Downstream results"). A mistake in an
option prints one line and exits with status 2 (`--debug` shows the traceback).
"""

import random
from pathlib import Path

import yaml

from sslcore import config as cfg
from sslcore.api import build_config, pretrain
from sslcore.errors import DEBUG_HELP, run_cli

CONFIG = Path(__file__).parent / "configs" / "bert_mlm_demo.yaml"
TASK = "movie-sentiment"
"""The task whose unlabelled training text the demo corpus adds (task-adaptive pretraining)."""
TRANSFER_TASKS = ["trec-coarse", "sms-spam"]
"""Tasks whose text the demo corpus never contains."""
PROTOCOLS = ["probe"]
"""The frozen-encoder probe: about a minute for all three tasks, both arms, 3 seeds on 2 cores. Full fine-tuning with a
learning-rate grid is ~50 minutes per task on this encoder, so it lives in benchmarks/downstream.py."""
FINETUNE = {"model": {"max_seq_length": 64}, "train": {"progress_bar": False}}
"""Fine-tuning inputs as long as the pretraining blocks (the README's benchmark commands: --set model.max_seq_length=64)."""
DEFAULT_SEEDS = [0, 1, 2]


def held_out_examples(config, tokenizer, n=6, seed=0):
    """Held-out sentences with one whole, in-vocabulary content word masked."""
    from textssl.corpus import load_corpus

    validation = load_corpus(config.data.corpus)["validation"]
    rng, vocab, examples = random.Random(seed), tokenizer.get_vocab(), []
    sentences = [s for doc in validation["sentences"] for s in doc if 8 <= len(s.split()) <= 25]
    for sentence in rng.sample(sentences, min(len(sentences), 200)):
        words = sentence.split()
        candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 3 and w.lower() in vocab]
        if candidates:
            i = rng.choice(candidates)
            examples.append((" ".join(words[:i] + [tokenizer.mask_token] + words[i + 1:]), words[i].lower()))
        if len(examples) == n:
            break
    return examples


USAGE = f"""usage: python recipes/demo.py [--no-downstream] [--seeds LIST] [--section.key VALUE ...] [--debug] [--help]

  --no-downstream  stop after the fill-mask examples (no pretrained-vs-scratch table)
  --seeds LIST     fine-tuning seeds per arm of the table, e.g. [0,1,2,3,4] (default {DEFAULT_SEEDS})
  --section.key    any pretraining option below, over the preset {CONFIG.relative_to(Path(__file__).parent.parent)}

{DEBUG_HELP}."""


def split_argv(argv: list[str]) -> tuple[bool, list[int], bool, list[str]]:
    """(downstream, seeds, show_help, the pretraining overrides) from the demo's command line."""
    downstream, seeds, show_help, overrides, i = True, list(DEFAULT_SEEDS), False, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if argv[i] in ("-h", "--help"):
            show_help = True
        elif argv[i] == "--no-downstream":
            downstream = False
        elif name == "--seeds":
            if not eq:
                if i + 1 >= len(argv):
                    raise cfg.ConfigError("--seeds needs a list of seeds, e.g. --seeds [0,1,2,3,4]")
                value, i = argv[i + 1], i + 1
            parsed = yaml.safe_load(value)
            parsed = [parsed] if isinstance(parsed, int) else parsed
            if not isinstance(parsed, list) or not parsed or not all(isinstance(s, int) for s in parsed):
                raise cfg.ConfigError(f"--seeds {value}: give a list of integers, e.g. --seeds [0,1,2,3,4]")
            seeds = parsed
        else:
            overrides.append(argv[i])
        i += 1
    return downstream, seeds, show_help, overrides


def _main(argv: list[str]):
    downstream, seeds, show_help, overrides = split_argv(argv)
    config = build_config(CONFIG, overrides)
    if show_help:
        print(USAGE + "\n\npretraining options, with the values the demo would use (defaults, then the preset, then "
              "your overrides; `default` shown where it differs):")
        print("\n".join(cfg.describe(config)))
        return None
    in_domain = [s for s in config.data.corpus.sources if s.endswith(f"{TASK}-train.txt")]
    if in_domain and not Path(in_domain[0]).is_file():
        from textssl.tasks import write_unlabelled_text

        # Task-adaptive pretraining: the task's training sentences, without labels (never its test text).
        write_unlabelled_text(TASK, in_domain[0], split="train")
    result = pretrain(config)
    if result.export_dir is None:
        return
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(result.export_dir), device="cpu")
    print(f"\nfill-mask on held-out sentences (model: {result.export_dir}):")
    hits = 0
    examples = held_out_examples(config, fill.tokenizer)
    for text, answer in examples:
        guesses = [p["token_str"] for p in fill(text, top_k=5)]
        hits += answer in guesses
        print(f"  {text}\n    true: {answer:<14} top-5: {', '.join(guesses)}")
    print(f"  true word in top-5: {hits}/{len(examples)}")
    print(f"\nfinal train loss {result.final_loss:.3f}; eval: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.eval.items()))
    print(f"loss curve: {result.output_dir / 'loss_curve.png'}\nmodel: {result.export_dir}")
    if downstream:
        from textssl.downstream import compare_with_scratch, write_report

        tasks = [TASK, *TRANSFER_TASKS]
        print(f"\ndid pretraining pay off? {', '.join(tasks)}: linear probe, pretrained vs random init, "
              f"{len(seeds)} seeds each:")
        work_dir = result.output_dir / "downstream"
        rows = compare_with_scratch(result.export_dir, tasks=tasks, protocols=PROTOCOLS, seeds=seeds,
                                    work_dir=work_dir, overrides=FINETUNE)
        print("\n" + write_report(rows, result.export_dir, work_dir / "RESULTS.md", "python recipes/demo.py"))
    return result


def main(argv: list[str] | None = None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
