"""word2vec: sampling statistics, planted neighbours on both backends, export round trip, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslcore.api import build_config
from sslcore.config import ConfigError
from sslcore.data import generator_for
from textssl.corpus import CorpusError
from textssl.word2vec import (
    Vocabulary,
    Word2VecConfig,
    Word2VecDataError,
    Word2VecModel,
    NoiseSampler,
    Word2VecObjective,
    context_slots,
    export_vectors,
    load_vectors,
    train_word2vec,
)
from textssl.word_eval import WordEvalConfig, averaged_vector_probe

REPO = Path(__file__).resolve().parents[1]
GROUPS, GROUP_WORDS, FILLERS = 8, 4, 24
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _topic_word(group: int, index: int) -> str:
    return f"topic{LETTERS[group]}{LETTERS[index]}"


def _planted_corpus(path: Path, sentences: int = 2000, seed: int = 0) -> Path:
    """Sentences that each draw 5 words from one group of 4 "topic" words plus 3 shared fillers: words of a
    group co-occur, words of different groups only ever meet through fillers."""
    rng = np.random.default_rng(seed)
    lines, line = [], []
    for _ in range(sentences):
        group = rng.integers(GROUPS)
        words = [_topic_word(group, i) for i in rng.integers(GROUP_WORDS, size=5)]
        words += [f"filler{LETTERS[i]}" for i in rng.integers(FILLERS, size=3)]
        rng.shuffle(words)
        line.append(" ".join(words) + ".")
        if len(line) == 10:  # one document (line) of ten sentences
            lines.append(" ".join(line))
            line = []
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(corpus: Path, cache_dir: str, tmp: Path, **sections) -> Word2VecConfig:
    values = {
        "objective": "word2vec", "epochs": 5,
        "data": {"corpus": {"sources": [str(corpus)], "cache_dir": cache_dir, "validation_fraction": 0.0},
                 "min_count": 5, "sample": 0.0, "block_words": 250, "num_proc": 1},
        "model": {"vector_size": 24, "window": 3, "negative": 5},
        "evaluation": {"analogies": False, "word_similarity": False, "downstream_task": None},
        "train": {"output_dir": str(tmp / "run"), "per_device_batch_size": 4, "progress_bar": False,
                  "report_to": [], "log_every": 10},
    }
    for section, updates in sections.items():
        values[section] = {**values.get(section, {}), **updates} if isinstance(updates, dict) else updates
    return build_config(overrides=values)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted_corpus(tmp_path_factory.mktemp("planted") / "planted.txt")


@pytest.fixture(scope="module")
def prepared(planted, cache_dir, tmp_path_factory):
    """An objective prepared on the planted corpus, with subsampling on (to test it)."""
    config = _config(planted, cache_dir, tmp_path_factory.mktemp("prepared"), data={"sample": 1e-3})
    objective = Word2VecObjective(config)
    objective.prepare()
    return objective


# -- sampling ---------------------------------------------------------------------------------------


def test_keep_probabilities_match_gensim(planted, prepared):
    from gensim.models import Word2Vec

    from textssl.word2vec import tokenize

    sentences = [tokenize(s) for s in planted.read_text().replace(".", ".\n").splitlines() if s.strip()]
    reference = Word2Vec(min_count=5, sample=1e-3, vector_size=8, workers=1)
    reference.build_vocab(sentences)
    vocabulary = prepared.corpus.vocabulary
    assert sorted(vocabulary.words) == sorted(reference.wv.index_to_key)
    ours = vocabulary.keep_probabilities(1e-3)
    theirs = np.array([reference.wv.get_vecattr(w, "sample_int") / (2**32 - 1) for w in vocabulary.words])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert (ours < 1).any()


def test_subsampling_keeps_the_expected_fraction(prepared):
    blocks = prepared.train_dataset()
    examples = blocks.__getitems__(list(range(8)))
    ids = torch.cat([e["ids"] for e in examples]).long()
    expected = prepared.keep_probability[ids].double()
    assert (expected < 0.9).all(), "the test needs words that subsampling thins out"
    trials = 40
    kept = torch.zeros(len(prepared.corpus.vocabulary), dtype=torch.float64)
    for trial in range(trials):
        sampled = prepared.sample_positions(examples, [generator_for(trial * 100 + i) for i in range(8)])
        kept += torch.bincount(sampled["ids"], minlength=len(kept)).double()
    offered = torch.bincount(ids, minlength=len(kept)).double() * trials
    mean = torch.bincount(ids, weights=expected, minlength=len(kept)) * trials
    std = (torch.bincount(ids, weights=expected * (1 - expected), minlength=len(kept)) * trials).sqrt()
    seen = offered > 0
    z = (kept[seen] - mean[seen]) / std[seen]
    assert z.abs().max() < 4.5, f"kept counts off the binomial expectation: max |z| {z.abs().max():.2f}"
    total_z = (kept.sum() - mean.sum()) / std.pow(2).sum().sqrt()
    assert abs(total_z) < 4


def test_dynamic_window_shrinks_uniformly():
    window, n, trials = 5, 400, 300
    sentence = torch.zeros(n, dtype=torch.long)
    counts = torch.zeros(2 * window)
    for trial in range(trials):
        reduced = torch.randint(0, window, (n,), generator=generator_for(trial))
        positions, valid = context_slots(sentence, reduced, window)
        counts += valid[window:-window].float().sum(0)  # positions far from the ends
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])
    observed = counts / ((n - 2 * window) * trials)
    expected = (window - offsets.abs() + 1).float() / window  # P(shrunk window >= |offset|)
    torch.testing.assert_close(observed, expected, atol=0.01, rtol=0)
    assert torch.equal(positions[7, window:], torch.arange(8, 8 + window))


def test_windows_stop_at_sentence_ends_and_only_there():
    sentence = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    positions, valid = context_slots(sentence, torch.zeros(8, dtype=torch.long), window=2)
    pairs = {(int(i), int(positions[i, s])) for i, s in zip(*valid.nonzero(as_tuple=True))}
    expected = {(i, j) for i in range(8) for j in range(8)
                if i != j and abs(i - j) <= 2 and sentence[i] == sentence[j]}
    assert pairs == expected


def test_noise_follows_unigram_to_the_three_quarters():
    counts = np.array([5000, 1200, 300, 80, 20, 5, 5, 1], dtype=np.int64)
    vocabulary = Vocabulary([f"w{i}" for i in range(len(counts))], counts)
    probabilities = vocabulary.noise_distribution(0.75)
    np.testing.assert_allclose(probabilities, counts**0.75 / (counts**0.75).sum())
    sampler = NoiseSampler.from_probabilities(probabilities)
    # The alias table holds each word's probability exactly: column mass kept + mass lent to it, over n columns.
    held = sampler.accept.numpy().copy()
    np.add.at(held, sampler.alias.numpy(), 1.0 - sampler.accept.numpy())
    np.testing.assert_allclose(held / len(counts), probabilities, rtol=1e-9, atol=1e-15)
    draws = sampler.draw(200_000, generator_for(1))
    assert torch.equal(draws, sampler.draw(200_000, generator_for(1)))  # the seed fixes them
    observed = torch.bincount(draws, minlength=len(counts)).double().numpy() / len(draws)
    std = np.sqrt(probabilities * (1 - probabilities) / len(draws))
    assert np.all(np.abs(observed - probabilities) < 5 * std)


@pytest.mark.parametrize("shared", [False, True])
def test_skipgram_batches_hold_the_window_pairs_and_k_negatives(prepared, shared):
    original, prepared.config.model.shared_negatives = prepared.config.model.shared_negatives, shared
    try:
        examples = prepared.train_dataset().__getitems__([0, 1, 2])
        packed = prepared.collate(examples, [11, 12, 13])
        again = prepared.collate(examples, [11, 12, 13])
        batch = prepared.unpack(packed)
    finally:
        prepared.config.model.shared_negatives = original
    kept = prepared.sample_positions(examples, [generator_for(s) for s in (11, 12, 13)])
    positions, valid = context_slots(kept["sentence"], kept["reduced"], prepared.config.model.window)
    assert int(batch["context_mask"].sum()) == int(valid.sum())  # every (centre, context) pair, once
    negative = prepared.config.model.negative
    assert batch["targets"].shape[1] == 1 + negative
    assert torch.equal(batch["negative_mask"], batch["targets"][:, 1:] != batch["targets"][:, :1])
    assert packed["words"] == sum(len(e["ids"]) for e in examples)
    assert set(packed) == ({"rows", "words", "spans"} if shared else {"rows", "words"})  # one tensor per batch
    assert torch.equal(packed["rows"], again["rows"]) and packed.get("spans") == again.get("spans")  # seeds fix it


@pytest.mark.parametrize("mode,shared,shrink", [("skipgram", True, True), ("skipgram", False, True),
                                                 ("skipgram", True, False), ("cbow", True, True), ("cbow", True, False)])
def test_compiled_batches_equal_the_tensor_op_batches(prepared, compiled_kernel, mode, shared, shrink):
    model = prepared.config.model
    original = (model.mode, model.shared_negatives, model.shrink_windows)
    model.mode, model.shared_negatives, model.shrink_windows = mode, shared, shrink
    try:
        for start in (0, 3):
            examples = prepared.train_dataset().__getitems__(list(range(start, start + 3)))
            seeds = [start + 40, start + 41, start + 42]
            prepared.compiled_batches = False
            expected = prepared.collate(examples, seeds)
            prepared.compiled_batches = True
            built = prepared.collate(examples, seeds)
            assert set(built) == set(expected) and built["words"] == expected["words"]
            assert built.get("spans") == expected.get("spans")
            assert len(built["rows"]) > 10 and torch.equal(built["rows"], expected["rows"])
    finally:
        model.mode, model.shared_negatives, model.shrink_windows = original
        prepared.compiled_batches = True


def test_compiled_batches_refuse_a_word_outside_the_vocabulary(compiled_kernel):
    ids = torch.tensor([1, 2, 9])
    with pytest.raises(IndexError, match="word id 9 is outside the vocabulary of 5 words"):
        compiled_kernel.context_rows(ids, torch.zeros(3), None, torch.tensor([3]), torch.tensor([3]), torch.ones(5), 2, False, 3)


def reference_loss(model: Word2VecModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The negative-sampling loss written the obvious way, for autograd: embedding lookups, CBOW's mean
    with word2vec.c's gradient (every context word gets the whole error), the implicit step's scale as
    gradient hooks on the gathered rows. The fused step must give the same update."""
    inputs, mask, targets, negative_mask = batch["inputs"], batch["context_mask"], batch["targets"], batch["negative_mask"]
    contexts = F.embedding(inputs, model.input_vectors.weight)
    outputs = F.embedding(targets, model.output_vectors.weight)
    if model.mode == "cbow":
        total = (contexts * mask.unsqueeze(-1)).sum(1)
        count = mask.sum(1, keepdim=True).clamp(min=1)
        value, gradient_path = (total / count, total) if model.cbow_mean else (total, total / count)
        hidden = (value.detach() + gradient_path - gradient_path.detach()).unsqueeze(1)
        valid = torch.ones(len(targets), 1, dtype=torch.bool)
    else:
        hidden, valid = contexts, mask
    scores = hidden @ outputs.transpose(1, 2)
    keep = valid.unsqueeze(-1) & torch.cat([torch.ones_like(negative_mask[:, :1]), negative_mask], 1).unsqueeze(1)
    labels = torch.zeros_like(scores)
    labels[..., 0] = 1.0
    loss = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")[keep].sum()
    if model.implicit_updates and torch.is_grad_enabled():
        with torch.no_grad():
            probability = torch.sigmoid(scores)
            curvature = probability * (1 - probability) * keep
            input_curvature = (curvature * outputs.pow(2).sum(-1).unsqueeze(1)).sum(-1)  # (rows, m)
            output_curvature = (curvature * hidden.pow(2).sum(-1, keepdim=True)).sum(1)  # (rows, 1 + K)
            if model.mode == "cbow":
                input_curvature = input_curvature * mask / mask.sum(1, keepdim=True).clamp(min=1)
            vocab, lr = model.input_vectors.num_embeddings, model.learning_rate

            def scale(ids, curvature):
                total = torch.bincount(ids.reshape(-1), weights=curvature.reshape(-1), minlength=vocab)
                return (1.0 / (1.0 + lr * total))[ids].unsqueeze(-1)

            input_scale, output_scale = scale(inputs, input_curvature * mask), scale(targets, output_curvature)
        contexts.register_hook(lambda grad: grad * input_scale)
        outputs.register_hook(lambda grad: grad * output_scale)
    return loss


STEP_CASES = [("skipgram", True, None, True), ("skipgram", False, None, True), ("skipgram", True, False, True),
              ("cbow", True, None, True), ("cbow", True, True, True), ("cbow", True, None, False)]
"""(mode, shared negatives, implicit updates, CBOW mean): the defaults of both modes and each option."""


STEPS = {"compiled": "CompiledNegativeSamplingStepBackward", "tensor ops": "NegativeSamplingStepBackward"}
"""The two implementations of the step (the compiled CPU loop, and the tensor ops GPUs run) by the name
of the autograd node each leaves on the loss."""


@pytest.fixture(scope="module")
def compiled_kernel():
    """The compiled CPU step, built (about a second) or found in torch's extensions cache. The tests need it
    to exist: CI has g++, and a build failure must show, not fall back quietly."""
    from textssl.word2vec import compiled_cpu_step

    kernel = compiled_cpu_step()
    assert kernel is not None, "the compiled word2vec step could not be built (see the log line above)"
    return kernel


@pytest.mark.parametrize("mode,shared,implicit,cbow_mean", STEP_CASES)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("step", list(STEPS))
def test_fused_step_matches_the_autograd_update(prepared, compiled_kernel, mode, shared, implicit, cbow_mean, sparse,
                                                step):
    model_config = prepared.config.model
    saved = (model_config.mode, model_config.shared_negatives, model_config.implicit_updates, model_config.cbow_mean)
    model_config.mode, model_config.shared_negatives = mode, shared
    model_config.implicit_updates, model_config.cbow_mean = implicit, cbow_mean
    try:
        examples = prepared.train_dataset().__getitems__([0, 1, 2, 3])
        packed = prepared.collate(examples, [21, 22, 23, 24])
        batch = prepared.unpack(packed)
        prepared.sparse = sparse
        fused, reference = prepared.build_model(), prepared.build_model()
    finally:
        model_config.mode, model_config.shared_negatives, model_config.implicit_updates, model_config.cbow_mean = saved
        prepared.sparse = True
    fused.compiled = step == "compiled"
    torch.manual_seed(0)
    for table in (fused.input_vectors, fused.output_vectors):  # trained-looking weights, not the zero init
        table.weight.data.normal_(0, 0.3)
    reference.load_state_dict(fused.state_dict())
    start = fused.input_vectors.weight.detach().clone(), fused.output_vectors.weight.detach().clone()

    assert ("spans" in packed) == (mode == "skipgram" and shared)  # rows grouped by window size

    def fused_loss(model):
        return model(batch["inputs"], batch["context_mask"], batch["targets"], batch["negative_mask"], batch["spans"])

    with torch.no_grad():  # the loss alone (evaluation): no gradient work, the same value
        loss_alone = fused_loss(fused)
    losses = []
    for model, loss in ((fused, fused_loss), (reference, lambda model: reference_loss(model, batch))):
        model.learning_rate.fill_(0.025)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.025)
        losses.append(loss(model))
        if model is fused:
            assert type(losses[-1].grad_fn).__name__ == STEPS[step]
        (2.0 * losses[-1]).backward()  # the scale a 2-process LossContext.sum puts on the loss
        assert model.input_vectors.weight.grad.is_sparse == (sparse and model is fused)
        if sparse and model is fused:  # each word's row arrives summed, once: sorted distinct ids
            for grad in (model.input_vectors.weight.grad, model.output_vectors.weight.grad):
                ids = grad._indices()[0]
                assert torch.equal(ids, ids.unique())
        optimizer.step()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_alone, losses[1], rtol=1e-6, atol=0)
    for ours, theirs, before in zip((fused.input_vectors, fused.output_vectors),
                                    (reference.input_vectors, reference.output_vectors), start):
        moved = (theirs.weight.detach() - before).abs().max()
        assert moved > 0.05, "the step barely moved the weights: the comparison shows nothing"
        torch.testing.assert_close(ours.weight.detach(), theirs.weight.detach(), rtol=0, atol=1e-5 * float(moved))


@pytest.mark.parametrize("step", list(STEPS))
def test_implicit_updates_change_rare_words_little_and_tame_frequent_ones(compiled_kernel, step):
    torch.manual_seed(0)
    model = Word2VecModel(50, 8, sparse=False, compiled=step == "compiled")
    model.output_vectors.weight.data.normal_(0, 0.3)
    model.input_vectors.weight.data.normal_(0, 0.3)
    model.learning_rate.fill_(0.025)
    inputs = torch.randint(1, 50, (400, 1))
    targets = torch.cat([torch.randint(1, 50, (400, 1)), torch.zeros(400, 5, dtype=torch.long)], 1)  # word 0: hot
    mask, negative_mask = torch.ones(400, 1, dtype=torch.bool), torch.ones(400, 5, dtype=torch.bool)
    grads = {}
    for implicit in (False, True):
        model.zero_grad()
        model.implicit_updates = implicit
        loss = model(inputs, mask, targets, negative_mask)
        assert type(loss.grad_fn).__name__ == STEPS[step]
        loss.backward()
        grads[implicit] = model.output_vectors.weight.grad.clone()
    ratio = grads[True].norm(dim=1) / grads[False].norm(dim=1).clamp(min=1e-12)
    assert ratio[0] < 0.2  # 2,000 terms on word 0: its step is cut
    assert ratio[1:].min() > 0.9  # a handful of terms: nearly the plain sum


def test_compiled_step_refuses_a_word_outside_the_vocabulary(compiled_kernel):
    model = Word2VecModel(50, 8)
    inputs, mask = torch.tensor([[3, 50]]), torch.ones(1, 2, dtype=torch.bool)
    targets, negative_mask = torch.tensor([[4, 5]]), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(IndexError, match="input word id 50 is outside the vocabulary of 50 words"):
        model(inputs, mask, targets, negative_mask)


def test_without_a_compiler_the_tensor_step_runs_and_the_log_says_why(monkeypatch, caplog):
    from textssl import _word2vec_kernel, word2vec

    def no_compiler(verbose=False):
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")

    monkeypatch.setattr(_word2vec_kernel, "load", no_compiler)
    monkeypatch.setattr(word2vec, "_compiled_step", None)  # as in a fresh process
    model = Word2VecModel(50, 8)
    inputs, mask = torch.tensor([[3, 7]]), torch.ones(1, 2, dtype=torch.bool)
    targets, negative_mask = torch.tensor([[4, 5]]), torch.ones(1, 1, dtype=torch.bool)
    with caplog.at_level("WARNING", logger="textssl.word2vec"):
        for _ in range(2):
            loss = model(inputs, mask, targets, negative_mask)
            assert type(loss.grad_fn).__name__ == STEPS["tensor ops"]
            loss.backward()
    warnings = [r.getMessage() for r in caplog.records if "compiled CPU step" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one line, not one per step
    assert "no C++ compiler found" in warnings[0] and "use tensor ops instead" in warnings[0]
    assert model.input_vectors.weight.grad is not None


# -- training on both backends ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(planted, cache_dir, tmp_path_factory):
    """Both modes on both backends, once per module."""
    runs = {}
    for backend in ("torch", "gensim"):
        for mode in ("skipgram", "cbow"):
            tmp = tmp_path_factory.mktemp(f"{backend}-{mode}")
            config = _config(planted, cache_dir, tmp, backend=backend, model={"mode": mode},
                             gensim={"workers": 2})
            runs[backend, mode] = train_word2vec(config)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "gensim"])
@pytest.mark.parametrize("mode", ["skipgram", "cbow"])
def test_planted_cooccurrences_become_nearest_neighbours(trained, backend, mode):
    vectors = trained[backend, mode].vectors
    topic_words = [_topic_word(g, i) for g in range(GROUPS) for i in range(GROUP_WORDS)]
    right = sum(vectors.most_similar(word, topn=1)[0][0].startswith(word[:6]) for word in topic_words)
    assert right >= 0.9 * len(topic_words), f"{backend} {mode}: {right}/{len(topic_words)} neighbours in the group"


@pytest.mark.slow
def test_torch_loss_falls(trained):
    losses = [h["ns_loss"] for h in trained["torch", "skipgram"].history if "ns_loss" in h]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "gensim"])
def test_export_round_trips_through_gensim(trained, backend, tmp_path):
    from gensim.models import KeyedVectors

    result = trained[backend, "skipgram"]
    folder = result.export_dir
    card = (folder / "README.md").read_text()
    assert "library_name: gensim" in card and "word2vec" in card
    for loaded in (load_vectors(folder), KeyedVectors.load(str(folder / "vectors.kv")),
                   KeyedVectors.load_word2vec_format(str(folder / "vectors.bin"), binary=True)):
        assert loaded.index_to_key == result.vectors.index_to_key
        np.testing.assert_allclose(loaded.vectors, result.vectors.vectors, rtol=1e-6)
    native = KeyedVectors.load(str(folder / "vectors.kv"))
    assert native.get_vecattr(native.index_to_key[0], "count") >= native.get_vecattr(native.index_to_key[-1], "count")
    # A second export writes the text format too, which gensim reads back.
    config = Word2VecConfig(text_format=True, evaluation=WordEvalConfig(analogies=False, word_similarity=False))
    export_vectors(result.vectors, tmp_path, config=config, summary={}, training_data="test")
    text = KeyedVectors.load_word2vec_format(str(tmp_path / "vectors.txt"), binary=False)
    np.testing.assert_allclose(text.vectors, result.vectors.vectors, atol=1e-5)


def test_resume_gives_the_same_vectors(planted, cache_dir, tmp_path):
    def config(folder: str, **train):
        return _config(planted, cache_dir, tmp_path / folder, epochs=None,
                       data={"corpus": {"sources": [str(planted)], "cache_dir": cache_dir,
                                        "validation_fraction": 0.2}},
                       train={"output_dir": str(tmp_path / folder), "max_steps": 6, "eval_every": 3, "save_every": 3,
                              "eval_batches": 1, "export": False, **train})

    def stop_at_three(trainer, step):
        trainer.should_stop = step >= 3
        return {}

    uninterrupted = train_word2vec(config("full"))
    # The interrupted run reads batches ahead in a thread (what the presets do): the same batches, in order,
    # and the ones read past the stop are not consumed.
    train_word2vec(config("resumed", read_ahead=True), callbacks=[stop_at_three])
    resumed = train_word2vec(config("resumed", read_ahead=True, resume="latest"))
    np.testing.assert_array_equal(resumed.vectors.vectors, uninterrupted.vectors.vectors)


def test_load_vectors_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no word vectors"):
        load_vectors(tmp_path)


# -- evaluation ---------------------------------------------------------------------------------------


def test_downstream_probe_finds_a_planted_signal_that_random_vectors_lack():
    from gensim.models import KeyedVectors

    rng = np.random.default_rng(0)
    positive, negative = [f"good{LETTERS[i]}" for i in range(10)], [f"bad{LETTERS[i]}" for i in range(10)]
    neutral = [f"plain{LETTERS[i]}{LETTERS[j]}" for i in range(10) for j in range(10)]
    texts, labels = [], []
    for _ in range(300):
        label = int(rng.integers(2))
        words = list(rng.choice(positive if label else negative, 2)) + list(rng.choice(neutral, 6))
        texts.append(" ".join(words))
        labels.append(label)
    vectors = KeyedVectors(vector_size=16)
    words = positive + negative + neutral
    planted = rng.normal(size=(len(words), 16))
    planted[:, 0] = [3.0] * 10 + [-3.0] * 10 + [0.0] * len(neutral)  # one sentiment direction
    vectors.add_vectors(words, planted)
    labels = np.array(labels)
    scores = averaged_vector_probe(vectors, (texts[:200], labels[:200]), (texts[200:], labels[200:]), random_draws=3)
    assert scores["downstream_accuracy"] > 0.95
    assert scores["downstream_gain_over_random"] > 0.05
    assert scores["downstream_text_coverage"] == 1.0 and scores["downstream_token_oov_rate"] == 0.0


# -- configs and bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["word2vec_skipgram_tiny", "word2vec_cbow_tiny", "word2vec_base"])
def test_shipped_configs_load(name):
    config = build_config(REPO / "recipes" / "configs" / f"{name}.yaml")
    assert isinstance(config, Word2VecConfig)
    assert config.train.max_grad_norm is None and config.train.warmup_steps == 0


def test_clipping_sparse_gradients_is_refused(prepared):
    model = prepared.build_model()
    prepared.config.train.max_grad_norm = 1.0
    try:
        with pytest.raises(ConfigError, match="max_grad_norm"):
            prepared.build_optimizer(model, prepared.config.train)
    finally:
        prepared.config.train.max_grad_norm = None


def test_empty_corpus_is_a_clear_error(cache_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no documents|holds text"):
        train_word2vec(_config(empty, cache_dir, tmp_path))


def test_words_below_min_count_are_a_clear_error(cache_dir, tmp_path):
    rare = tmp_path / "rare.txt"
    rare.write_text("Every word here is new. Nothing repeats at all.\n", encoding="utf-8")
    for backend in ("torch", "gensim"):
        with pytest.raises(Word2VecDataError, match="min_count"):
            train_word2vec(_config(rare, cache_dir, tmp_path, backend=backend))


def test_non_utf8_corpus_is_a_clear_error(cache_dir, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\u00e9 cr\u00e8me, d\u00e9j\u00e0 vu.\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid utf-8"):
        train_word2vec(_config(latin, cache_dir, tmp_path))


def test_gensim_backend_is_not_run_by_the_shared_trainer(planted, cache_dir, tmp_path):
    objective = Word2VecObjective(_config(planted, cache_dir, tmp_path, backend="gensim"))
    with pytest.raises(ConfigError, match="python -m textssl.word2vec"):
        objective.prepare()


# -- several processes ---------------------------------------------------------------------------------


TWO_PROCESS_TOLERANCE = 1e-5
"""Largest |difference| of any vector entry allowed between 1 and 2 processes at the same global batch
after 6 steps. Measured: 4e-8 (skip-gram) and 2e-8 (CBOW), float rounding of the sums in another order,
while the last 3 steps move an entry by up to 0.12 and 0.045. A second process that never steps, an
update averaged over processes instead of summed, or an implicit step that sees only its own process's
curvature is off by a fraction of a step, far above this."""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["skipgram", "cbow"])
def test_two_processes_train_like_one_at_the_same_global_batch(planted, cache_dir, tmp_path, mode):
    from safetensors.torch import load_file

    def arguments(out: Path, batch: int) -> list[str]:
        return [
            "--config", str(REPO / "recipes" / "configs" / f"word2vec_{mode}_tiny.yaml"),
            "--data.corpus.sources", f"[{planted}]", "--data.corpus.cache_dir", cache_dir,
            "--data.corpus.validation_fraction", "0.0", "--data.block_words", "250", "--data.num_proc", "1",
            "--model.vector_size", "16", "--epochs", "null", "--train.max_steps", "6", "--train.save_every", "3",
            "--train.per_device_batch_size", str(batch), "--train.num_threads", "1", "--train.export", "false",
            "--train.lr_schedule", "constant", "--train.learning_rate", "0.05",
            "--train.output_dir", str(out), "--train.progress_bar", "false",
        ]

    recipe = str(REPO / "recipes" / "pretrain.py")
    one = subprocess.run([sys.executable, recipe, *arguments(tmp_path / "one", 4)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    # torchrun through `--multi_gpu` is the CPU multi-process route (`--cpu` starts one process); gloo
    # all-reduces the sparse gradients.
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", recipe,
                          *arguments(tmp_path / "two", 2)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 2" in two.stderr

    def weights(run: str, step: int) -> torch.Tensor:
        values = load_file(tmp_path / run / "checkpoints" / f"step-{step:06d}" / "model.safetensors")
        return torch.cat([values[name].flatten().double() for name in ("input_vectors.weight", "output_vectors.weight")])

    halfway, a, b = weights("one", 3), weights("one", 6), weights("two", 6)
    # Same blocks, windows and negatives on both; the update is the sum over the whole global batch (and
    # the implicit step's curvature is summed over processes): only float rounding differs.
    moved, difference = (a - halfway).abs().max().item(), (a - b).abs().max().item()
    assert moved > 1000 * TWO_PROCESS_TOLERANCE, f"the vectors barely moved ({moved:.3g}): the test shows nothing"
    assert difference < TWO_PROCESS_TOLERANCE, f"1 vs 2 processes differ by {difference:.3g}; 3 steps move {moved:.3g}"
