"""word2vec speed: words/s of the torch backend (the shared trainer) against gensim, in one run.

Both train the same corpus, vocabulary and options (100-d, window 5, 5 negatives by default) for the
same number of epochs; words/s = in-vocabulary corpus words x epochs / training wall time (data
already tokenized and cached, no export or evaluation on either side). gensim uses one worker
thread per core. Runs alternate (gensim, torch, gensim, torch, ...) so background load hits both
alike; the ratio is the median over repeats of torch / gensim within each repeat.

To show what limits the torch backend, the script also times its batch building alone (`collate`:
subsampling, windows, negatives) and one training step split into forward, backward and the
sparse SGD update.

Runs unchanged on a GPU machine: Accelerate puts the model on the GPU, collate stays on CPU
DataLoader workers.

    python benchmarks/word2vec_speed.py                       # skip-gram and CBOW, 3 repeats, 1 epoch
    python benchmarks/word2vec_speed.py --sources mixed --epochs 1 --repeats 5 --modes skipgram
    python benchmarks/word2vec_speed.py --batch 64 --workers 8   # a GPU: bigger steps, more collate workers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from textssl.word2vec import Word2VecObjective, cpu_cores, train_word2vec  # noqa: E402


def _overrides(args, backend: str, mode: str, run: int) -> dict:
    return {
        "backend": backend, "epochs": args.epochs,
        "data": {"corpus": {"sources": args.sources}, "block_words": args.block_words},
        "model": {"mode": mode, "vector_size": args.vector_size, "window": 5, "negative": 5,
                  "shared_negatives": not args.pair_negatives},
        "evaluation": {"analogies": False, "word_similarity": False, "downstream_task": None},
        "gensim": {"workers": cpu_cores()},
        "train": {"output_dir": f"{args.output}/{mode}-{backend}-{run}", "per_device_batch_size": args.batch,
                  "num_workers": args.workers, "progress_bar": False, "export": False, "log_every": 10**9,
                  "save_every": 0},
    }


def profile_torch_step(config_path: str, overrides: dict, steps: int = 5) -> dict[str, float]:
    """Seconds per batch of collate alone, and of forward / backward / SGD step (medians)."""
    from sslcore import config as cfg
    from textssl.word2vec import Word2VecConfig

    config = cfg.load(Word2VecConfig, config_path, overrides)
    objective = Word2VecObjective(config)
    objective.prepare()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = objective.build_model().to(device)
    optimizer = objective.build_optimizer(model, config.train)
    dataset, size = objective.train_dataset(), config.train.per_device_batch_size
    timings: dict[str, list[float]] = {"collate": [], "forward": [], "backward": [], "update": []}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in range(steps + 1):
        rows = dataset.__getitems__(list(range(step * size, (step + 1) * size)))
        started = time.perf_counter()
        batch = objective.collate(rows, [step * size + i for i in range(size)])
        collated = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        sync()
        moved = time.perf_counter()
        loss, _ = objective.loss(model, batch)
        sync()
        forward = time.perf_counter()
        loss.backward()
        sync()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        done = time.perf_counter()
        if step:  # the first step warms up allocators and kernels
            for key, seconds in (("collate", collated - started), ("forward", forward - moved),
                                 ("backward", backward - forward), ("update", done - backward)):
                timings[key].append(seconds)
    words = int(batch["words"])
    return {"words_per_batch": words, **{k: statistics.median(v) for k, v in timings.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/word2vec_skipgram_tiny.yaml")
    parser.add_argument("--sources", nargs="+", default=["gensim-wiki", "gensim-lee"])
    parser.add_argument("--modes", nargs="+", default=["skipgram", "cbow"], choices=["skipgram", "cbow"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vector-size", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4, help="blocks per step (torch)")
    parser.add_argument("--block-words", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None,
                        help="torch DataLoader workers (default: 1 on <= 4 cores, else 4)")
    parser.add_argument("--pair-negatives", action="store_true",
                        help="skip-gram negatives per (context, centre) pair, as word2vec.c (default: per window)")
    parser.add_argument("--output", default="runs/word2vec_speed")
    args = parser.parse_args(argv)
    cores = cpu_cores()
    if args.workers is None:
        args.workers = 1 if cores <= 4 else 4
    if not torch.cuda.is_available():
        # The collate workers take their cores; intra-op threads get the rest (oversubscribing 2 cores
        # makes every parallel op wait on the scheduler).
        torch.set_num_threads(max(1, cores - args.workers))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {cores} cores"
    print(f"device: {device}; torch threads {torch.get_num_threads()}, collate workers {args.workers}; "
          f"gensim workers {cores}")
    report: dict = {"device": device, "modes": {}}
    for mode in args.modes:
        speeds: dict[str, list[float]] = {"gensim": [], "torch": []}
        for run in range(args.repeats):
            for backend in ("gensim", "torch"):
                result = train_word2vec(args.config, _overrides(args, backend, mode, run))
                speeds[backend].append(result.words_per_second)
                print(f"{mode} {backend} run {run}: {result.words:,} words in {result.train_seconds:.1f} s = "
                      f"{result.words_per_second:,.0f} words/s", flush=True)
        ratios = [t / g for t, g in zip(speeds["torch"], speeds["gensim"])]
        profile = profile_torch_step(args.config, _overrides(args, "torch", mode, 0))
        step = profile["forward"] + profile["backward"] + profile["update"]
        report["modes"][mode] = {
            "gensim_words_per_s": statistics.median(speeds["gensim"]),
            "torch_words_per_s": statistics.median(speeds["torch"]),
            "torch_over_gensim": statistics.median(ratios), "ratios": ratios, "torch_step_profile": profile,
            "collate_words_per_s": profile["words_per_batch"] / profile["collate"],
            "train_step_words_per_s": profile["words_per_batch"] / step,
        }
    print(f"\n| mode | gensim words/s | torch words/s | torch / gensim (median of {args.repeats}) "
          "| torch collate alone words/s | torch fwd+bwd+update alone words/s |")
    print("|---|---|---|---|---|---|")
    for mode, r in report["modes"].items():
        print(f"| {mode} | {r['gensim_words_per_s']:,.0f} | {r['torch_words_per_s']:,.0f} | "
              f"{r['torch_over_gensim']:.2f}x | {r['collate_words_per_s']:,.0f} | {r['train_step_words_per_s']:,.0f} |")
    for mode, r in report["modes"].items():
        p = r["torch_step_profile"]
        print(f"{mode} torch step of {p['words_per_batch']:,} words: collate {p['collate'] * 1e3:.0f} ms, forward "
              f"{p['forward'] * 1e3:.0f} ms, backward {p['backward'] * 1e3:.0f} ms, SGD update {p['update'] * 1e3:.0f} ms")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
