"""word2vec speed: words/s of the torch backend (the shared trainer) against gensim, in one run.

Both train the same corpus, vocabulary and options (100-d, window 5, 5 negatives by default) for the
same number of epochs; words/s = in-vocabulary corpus words x epochs / training wall time (data
already tokenized and cached, no export or evaluation on either side). gensim uses one worker
thread per core. torch's time is the trainer's own clock over its training loop (as gensim's is its
`train()` call); the whole `fit()` (model building, the final checkpoint, the loss plot) is printed
beside it. Runs alternate (gensim, torch, gensim, torch, ...) so background load hits both
alike; the ratio is the median over repeats of torch / gensim within each repeat.

To show what limits the torch backend, the script also times its batch building alone (`collate`:
subsampling, windows, negatives; the compiled loop training uses, and the tensor ops it replaced, which
build the same rows) and one training step split into forward, backward and the
sparse SGD update -- for the step training runs (on CPU the compiled loop,
`CompiledNegativeSamplingStep`) and, interleaved on the same batches, for the tensor-op step
(`NegativeSamplingStep`, what GPUs run), for the autograd formulation both replaced (`autograd_loss`)
and, with `--baseline REV`, for the step as textssl/word2vec.py had it at git revision REV (the
before/after profile). "training loop ms per batch" is the loop's wall time per batch of that size
(from its words/s); what it holds beyond the step is the trainer's own work between steps (receiving
the batch, counts, optimizer and scheduler calls, logging).

On up to 4 cores batches are built in the training process, read ahead by a thread while the step runs
(`train.read_ahead`, as the presets do); on more, by DataLoader workers. Runs unchanged on a GPU machine:
Accelerate puts the model on the GPU, collate stays on the CPU.

    python benchmarks/word2vec_speed.py                       # skip-gram and CBOW, 3 repeats, 1 epoch
    python benchmarks/word2vec_speed.py --sources mixed --epochs 1 --repeats 5 --modes skipgram
    python benchmarks/word2vec_speed.py --batch 64 --workers 8   # a GPU: bigger steps, more collate workers
    python benchmarks/word2vec_speed.py --modes cbow --sharing-strategy file_system   # how workers hand batches over
    python benchmarks/word2vec_speed.py --baseline 44d11b4   # also profile the step as it was at that commit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sslcore.config import ConfigError  # noqa: E402
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
                  "num_workers": args.workers, "num_threads": args.threads, "read_ahead": args.read_ahead,
                  "progress_bar": False, "export": False,
                  "log_every": 10**9,
                  "save_every": 0},
    }


def autograd_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`batch`: the step's inputs (`Word2VecObjective.unpack` of a collated batch). The step as the torch backend ran it before `NegativeSamplingStep`: autograd through (sparse)
    embedding lookups, CBOW's mean with word2vec.c's gradient, the implicit scale as gradient hooks.
    The same maths (tests/test_word2vec.py checks the two updates agree); kept here as the baseline."""
    import torch.nn.functional as F

    inputs, mask, targets, negative_mask = batch["inputs"], batch["context_mask"], batch["targets"], batch["negative_mask"]
    contexts = F.embedding(inputs, model.input_vectors.weight, sparse=model.sparse)
    outputs = F.embedding(targets, model.output_vectors.weight, sparse=model.sparse)
    if model.mode == "cbow":
        total = (contexts * mask.unsqueeze(-1)).sum(1)
        count = mask.sum(1, keepdim=True).clamp(min=1)
        value, gradient_path = (total / count, total) if model.cbow_mean else (total, total / count)
        hidden = (value.detach() + gradient_path - gradient_path.detach()).unsqueeze(1)
        valid = torch.ones(len(targets), 1, dtype=torch.bool, device=targets.device)
    else:
        hidden, valid = contexts, mask
    scores = hidden @ outputs.transpose(1, 2)
    keep = valid.unsqueeze(-1) & torch.cat([torch.ones_like(negative_mask[:, :1]), negative_mask], 1).unsqueeze(1)
    signed = torch.cat([-scores[..., :1], scores[..., 1:]], -1)
    loss = (F.softplus(signed) * keep).sum()
    if model.implicit_updates:
        with torch.no_grad():
            probability = torch.sigmoid(scores)
            curvature = probability * (1 - probability) * keep
            input_curvature = (curvature * outputs.pow(2).sum(-1).unsqueeze(1)).sum(-1)
            output_curvature = (curvature * hidden.pow(2).sum(-1, keepdim=True)).sum(1)
            if model.mode == "cbow":
                input_curvature = input_curvature * mask / mask.sum(1, keepdim=True).clamp(min=1)
            vocab, lr = model.input_vectors.num_embeddings, model.learning_rate

            def scale(ids, curvature):
                total = torch.bincount(ids.reshape(-1), weights=curvature.reshape(-1).float(), minlength=vocab)
                return (1.0 / (1.0 + lr * total))[ids].unsqueeze(-1)

            input_scale, output_scale = scale(inputs, input_curvature * mask), scale(targets, output_curvature)
        contexts.register_hook(lambda grad: grad * input_scale)
        outputs.register_hook(lambda grad: grad * output_scale)
    return loss


def model_class_at(revision: str) -> type:
    """`Word2VecModel` as textssl/word2vec.py had it at git `revision` (its step included), to time an
    earlier step on today's batches; the batch layout must be the same."""
    shown = subprocess.run(["git", "show", f"{revision}:textssl/word2vec.py"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    if shown.returncode != 0:
        raise ConfigError(f"--baseline {revision}: git cannot show textssl/word2vec.py at that revision "
                          f"({shown.stderr.strip()}); pass a commit of this repository, e.g. 44d11b4")
    source = shown.stdout
    module = types.ModuleType(f"word2vec_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    # Not registered: the objective name belongs to today's module.
    source = source.replace("register_objective(Word2VecObjective)", "None")
    exec(compile(source, f"{revision}:textssl/word2vec.py", "exec"), module.__dict__)
    return module.Word2VecModel


def profile_torch_step(config_path: str, overrides: dict, steps: int = 20, baseline: str | None = None) -> dict:
    """Seconds per batch of collate alone, and of forward / backward / SGD update for the step training
    runs ("training": on CPU the compiled loop), for the tensor-op step (CPU only: it is the training step
    elsewhere), for the autograd formulation they replaced and (`baseline`, a git revision) for the step as
    it was then, interleaved on the same batches. On CPU the clock is the thread's CPU
    time (other processes' load does not count; one torch thread). Medians, and the fastest whole step."""
    from sslcore import config as cfg
    from sslcore.objective import LossContext
    from textssl.word2vec import Word2VecConfig

    config = cfg.load(Word2VecConfig, config_path, overrides)
    objective = Word2VecObjective(config)
    objective.prepare()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    models = {"training": objective.build_model().to(device)}
    if device.type == "cpu":  # the tensor ops, which training runs on GPUs
        models["tensor ops"] = objective.build_model().to(device)
        models["tensor ops"].compiled = False
    models["autograd"] = objective.build_model().to(device)
    if baseline:
        models[baseline] = objective.build_model().to(device)
        models[baseline].__class__ = model_class_at(baseline)  # same parameters and buffers, its own forward
    for model in models.values():
        model.load_state_dict(models["training"].state_dict())
    optimizers = {name: objective.build_optimizer(model, config.train) for name, model in models.items()}
    losses = {name: lambda model, batch: objective.loss(model, batch, LossContext({}, 1))[0] for name in models}
    losses["autograd"] = lambda model, batch: autograd_loss(model, objective.unpack(batch))
    dataset, size = objective.train_dataset(), config.train.per_device_batch_size
    collate: list[float] = []
    tensor_collate: list[float] = []
    timings = {name: {"forward": [], "backward": [], "update": []} for name in models}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in range(steps + 1):
        rows = dataset.__getitems__(list(range(step * size, (step + 1) * size)))
        started = clock()
        batch = objective.collate(rows, [step * size + i for i in range(size)])
        if step:  # the first step warms up allocators and kernels
            collate.append(clock() - started)
        objective.compiled_batches, started = False, clock()
        objective.collate(rows, [step * size + i for i in range(size)])
        objective.compiled_batches = True
        if step:
            tensor_collate.append(clock() - started)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        names = list(models)  # each step starts with another one: the first after collate meets colder caches
        for name in names[step % len(names):] + names[:step % len(names)]:
            model = models[name]
            sync()
            started = clock()
            loss = losses[name](model, batch)
            sync()
            forward = clock()
            loss.backward()
            sync()
            backward = clock()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            sync()
            if step:
                for key, seconds in (("forward", forward - started), ("backward", backward - forward),
                                     ("update", clock() - backward)):
                    timings[name][key].append(seconds)
    report = {"words_per_batch": int(batch["words"]), "steps": steps, "collate": statistics.median(collate),
              "collate_tensor_ops": statistics.median(tensor_collate)}
    for name, parts in timings.items():
        report[name] = {key: statistics.median(values) for key, values in parts.items()}
        report[name]["fastest_step"] = min(map(sum, zip(*parts.values())))
    return report


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
                        help="torch DataLoader workers (default: 0 on <= 4 cores, batches read ahead by a thread; else 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default on CPU: the cores the collate workers or the read-ahead thread "
                             "leave, at least 1)")
    parser.add_argument("--read-ahead", action=argparse.BooleanOptionalAction, default=True,
                        help="with --workers 0: build the next batch in a thread while the step runs (default on)")
    parser.add_argument("--pair-negatives", action="store_true",
                        help="skip-gram negatives per (context, centre) pair, as word2vec.c (default: per window)")
    parser.add_argument("--sharing-strategy", default=None, choices=sorted(torch.multiprocessing.get_all_sharing_strategies()),
                        help="how DataLoader workers hand tensors over (default: torch's, file_descriptor on Linux)")
    parser.add_argument("--baseline", default=None, metavar="GIT_REV",
                        help="also profile the step as textssl/word2vec.py had it at this git revision")
    parser.add_argument("--output", default="runs/word2vec_speed")
    args = parser.parse_args(argv)
    if args.sharing_strategy:
        torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)
    cores = cpu_cores()
    if args.workers is None:
        args.workers = 0 if cores <= 4 else 4
    if args.threads is None and not torch.cuda.is_available():
        # The collate workers (or the read-ahead thread) take their cores; intra-op threads get the rest
        # (oversubscribing 2 cores makes every parallel op wait on the scheduler).
        args.threads = max(1, cores - (args.workers or int(args.read_ahead)))
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the step profile below runs outside the trainer
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {cores} cores"
    loading = (f"collate workers {args.workers}" if args.workers else
               "batches built in the training process" + (", read ahead by a thread" if args.read_ahead else ""))
    print(f"device: {device}; torch threads {torch.get_num_threads()}, {loading}; gensim workers {cores}")
    report: dict = {"device": device, "load_average": os.getloadavg()[0], "modes": {}}
    for mode in args.modes:
        speeds: dict[str, list[float]] = {"gensim": [], "torch": [], "torch_fit": []}
        for run in range(args.repeats):
            for backend in ("gensim", "torch"):
                result = train_word2vec(args.config, _overrides(args, backend, mode, run))
                if backend == "torch":
                    # The trainer's own clock over its loop (one log window: the whole run), like gensim's
                    # train(); fit() also builds the model, writes the final checkpoint and plots the loss.
                    speeds["torch"].append(next(h["words_per_s"] for h in reversed(result.history) if "words_per_s" in h))
                    speeds["torch_fit"].append(result.words_per_second)
                else:
                    speeds["gensim"].append(result.words_per_second)
                print(f"{mode} {backend} run {run}: {result.words:,} words in {result.train_seconds:.1f} s = "
                      f"{result.words_per_second:,.0f} words/s"
                      + (f" (training loop {speeds['torch'][-1]:,.0f} words/s)" if backend == "torch" else ""), flush=True)
        ratios = [t / g for t, g in zip(speeds["torch"], speeds["gensim"])]
        fit_ratios = [t / g for t, g in zip(speeds["torch_fit"], speeds["gensim"])]
        profile = profile_torch_step(args.config, _overrides(args, "torch", mode, 0), baseline=args.baseline)
        step = sum(profile["training"][key] for key in ("forward", "backward", "update"))
        report["modes"][mode] = {
            "gensim_words_per_s": statistics.median(speeds["gensim"]),
            "torch_words_per_s": statistics.median(speeds["torch"]),
            "torch_fit_words_per_s": statistics.median(speeds["torch_fit"]),
            "torch_over_gensim": statistics.median(ratios), "ratios": ratios,
            "torch_fit_over_gensim": statistics.median(fit_ratios), "fit_ratios": fit_ratios,
            "torch_step_profile": profile,
            "collate_words_per_s": profile["words_per_batch"] / profile["collate"],
            "train_step_words_per_s": profile["words_per_batch"] / step,
            "loop_seconds_per_batch": profile["words_per_batch"] / statistics.median(speeds["torch"]),
        }
    print(f"\nload average {report['load_average']:.1f} on {cores} cores at the start")
    print(f"| mode | gensim words/s | torch words/s (training loop) | torch / gensim (median of {args.repeats}) "
          "| torch words/s (whole fit) | fit / gensim | torch collate alone words/s | torch fwd+bwd+update alone words/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in report["modes"].items():
        print(f"| {mode} | {r['gensim_words_per_s']:,.0f} | {r['torch_words_per_s']:,.0f} | "
              f"{r['torch_over_gensim']:.2f}x | {r['torch_fit_words_per_s']:,.0f} | {r['torch_fit_over_gensim']:.2f}x | "
              f"{r['collate_words_per_s']:,.0f} | {r['train_step_words_per_s']:,.0f} |")
    for mode, r in report["modes"].items():
        p = r["torch_step_profile"]
        print(f"\n{mode} torch step of {p['words_per_batch']:,} words, medians of {p['steps']} (collate alone "
              f"{p['collate'] * 1e3:.2f} ms, {p['collate_tensor_ops'] * 1e3:.2f} ms with tensor ops; training loop {r['loop_seconds_per_batch'] * 1e3:.1f} ms per batch "
              "of these words):\n| step | forward ms | backward ms | SGD update ms | total ms | fastest ms |"
              "\n|---|---|---|---|---|---|")
        for name in ("autograd", *([args.baseline] if args.baseline else []), *[n for n in ("tensor ops", "training")
                                                                                   if n in p]):
            q = p[name]
            total = q["forward"] + q["backward"] + q["update"]
            print(f"| {name} | {q['forward'] * 1e3:.1f} | {q['backward'] * 1e3:.1f} | {q['update'] * 1e3:.1f} | "
                  f"{total * 1e3:.1f} | {q['fastest_step'] * 1e3:.1f} |")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
