"""word2vec quality: the torch backend against gensim on the same corpus and budget.

Trains skip-gram and CBOW on both backends with one preset (default: recipes/configs/word2vec_base.yaml:
100-d, window 5, 5 negatives, 5 epochs), evaluates each with textssl.word_eval (WS353 Spearman, analogy
accuracy, their OOV rates, the movie-review sentiment probe against random vectors) and prints the
table with torch - gensim differences.

    python benchmarks/word2vec_quality.py                                   # the mixed corpus (~10M words)
    python benchmarks/word2vec_quality.py --sources gensim-wiki gensim-lee brown sotu --modes skipgram
    python benchmarks/word2vec_quality.py --train.per_device_batch_size 8   # any config override
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from textssl.word2vec import train_word2vec  # noqa: E402

TOLERANCE = 0.02
"""The bar: torch within this of gensim on WS353 Spearman and analogy accuracy."""
COLUMNS = [("ws353_spearman", "WS353 ρ"), ("ws353_oov_rate", "WS353 OOV"), ("analogy_accuracy", "analogy acc"),
           ("analogy_oov_rate", "analogy OOV"), ("downstream_accuracy", "sentiment acc"),
           ("downstream_random_accuracy", "random-vector acc")]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/word2vec_base.yaml")
    parser.add_argument("--sources", nargs="+", help="corpus sources (default: the preset's)")
    parser.add_argument("--modes", nargs="+", default=["skipgram", "cbow"], choices=["skipgram", "cbow"])
    parser.add_argument("--backends", nargs="+", default=["gensim", "torch"], choices=["gensim", "torch"])
    parser.add_argument("--output", default="runs/word2vec_quality", help="run folders and results.json")
    args, overrides = parser.parse_known_args(argv)
    if args.sources:
        overrides += ["--data.corpus.sources", json.dumps(args.sources)]
    results = []
    for mode in args.modes:
        for backend in args.backends:
            run = train_word2vec(args.config, [*overrides, "--backend", backend, "--model.mode", mode,
                                               "--train.output_dir", f"{args.output}/{mode}-{backend}",
                                               "--train.progress_bar", "false"])
            results.append({"mode": mode, "backend": backend, "words": run.words, "train_seconds": run.train_seconds,
                            "words_per_second": run.words_per_second, **run.scores})
            print(json.dumps(results[-1]), flush=True)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{results[0]['words'] if results else 0:,} in-vocabulary words trained on (epochs x corpus)\n")
    header = ["mode", "backend", *(name for _, name in COLUMNS), "train s", "words/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [r["mode"], r["backend"], *(f"{r[key]:.3f}" if key in r else "-" for key, _ in COLUMNS),
                 f"{r['train_seconds']:.0f}", f"{r['words_per_second']:,.0f}"]
        print("| " + " | ".join(cells) + " |")
    by_key = {(r["mode"], r["backend"]): r for r in results}
    print()
    for mode in dict.fromkeys(r["mode"] for r in results):
        torch_run, gensim_run = by_key.get((mode, "torch")), by_key.get((mode, "gensim"))
        if not (torch_run and gensim_run):
            continue
        for key in ("ws353_spearman", "analogy_accuracy"):
            delta = torch_run[key] - gensim_run[key]
            verdict = "within" if abs(delta) <= TOLERANCE or delta > 0 else "NOT within"
            print(f"{mode} {key}: torch - gensim = {delta:+.3f} ({verdict} {TOLERANCE} of gensim)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
