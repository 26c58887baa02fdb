"""The README demo: pretrain a small BERT, look at what it learned, then ask whether it paid off.

    python recipes/demo.py                       # ~15 minutes on 2 CPU cores
    python recipes/demo.py --train.max_steps 100 # any pretraining config override works
    python recipes/demo.py --no-downstream       # stop after the fill-mask examples

Builds the corpus (`recipes/configs/bert_mlm_demo.yaml`: the offline `mixed` sources that can be
fetched, gensim's Wikipedia excerpt and Lee news at least, plus the sentiment task's unlabelled
training text), trains a WordPiece tokenizer, pretrains with masked-LM (loss, throughput and ETA
in the log), exports a stock transformers folder, shows fill-mask predictions on held-out
sentences, writes the loss-curve PNG, and ends with the pretrained-vs-random-init table on
movie-review sentiment (full fine-tuning and a linear probe, 3 seeds; `textssl.downstream`),
whose scores also go into the model card.
"""

import random
import sys
from pathlib import Path

from sslcore.api import build_config, pretrain

CONFIG = Path(__file__).parent / "configs" / "bert_mlm_demo.yaml"
TASK = "movie-sentiment"
FINETUNE = {"train": {"learning_rate": 3e-4, "progress_bar": False}}
"""Both arms fine-tune alike; 3e-4 suits a 2-layer encoder (1e-4 leaves the pretrained arm unconverged at 1000 steps)."""


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


def main(argv):
    downstream = "--no-downstream" not in argv
    config = build_config(CONFIG, [a for a in argv if a != "--no-downstream"])
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

        print(f"\ndid pretraining pay off? {TASK}, pretrained vs random init, 3 seeds each:")
        work_dir = result.output_dir / "downstream"
        rows = compare_with_scratch(result.export_dir, tasks=[TASK], work_dir=work_dir, overrides=FINETUNE)
        print("\n" + write_report(rows, result.export_dir, work_dir / "RESULTS.md", "python recipes/demo.py"))


if __name__ == "__main__":
    main(sys.argv[1:])
