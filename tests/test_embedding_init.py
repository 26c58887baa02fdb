"""word2vec-initialised token embeddings for masked-LM and ELECTRA: the table starts from skip-gram vectors of
the tokenizer's pieces (rescaled), the vectors are cached in the run folder, and a resumed run reads them."""

import pytest
import torch

from sslcore.api import build_config
from sslcore.config import ConfigError
from sslcore.registry import get_objective
from textssl.embedding_init import CACHE_NAME, Word2VecInitConfig
from tests.test_mlm_e2e import CONFIG, tiny

ELECTRA_CONFIG = CONFIG.replace("bert_mlm_tiny", "electra_rtd_tiny")


def prepared(config_path, cache_dir, out, epochs=2):
    args = tiny(cache_dir, out, **{"embedding_init.epochs": epochs})
    if config_path == ELECTRA_CONFIG:
        args += ["--model.embedding_size", "32", "--model.generator_size", "0.5"]
    config = build_config(config_path, args)
    objective = get_objective(config.objective)(config)
    objective.prepare()
    return objective


@pytest.mark.parametrize("config_path", [CONFIG, ELECTRA_CONFIG], ids=["bert_mlm", "electra_rtd"])
def test_embeddings_start_from_the_cached_skipgram_vectors_rescaled(cache_dir, tmp_path, config_path):
    objective = prepared(config_path, cache_dir, tmp_path)
    vectors, trained = objective.piece_vectors
    assert (tmp_path / CACHE_NAME).is_file()
    special = torch.tensor(objective.tokenizer.all_special_ids)
    assert not trained[special].any() and trained.sum() > 100  # the corpus's pieces, never [MASK]/[CLS]
    model = objective.build_model()
    table = (model.model if config_path == CONFIG else model.discriminator).get_input_embeddings()
    rows = table.weight.detach()[trained]
    expected = vectors[trained] - vectors[trained].mean(0)
    assert rows.std().item() == pytest.approx(0.02, rel=1e-3)  # the model's init scale
    assert torch.allclose(rows / rows.std(), expected / expected.std(), atol=1e-5)
    # Pieces word2vec never saw keep the random init.
    assert table.weight.detach()[~trained].std().item() == pytest.approx(0.02, rel=0.5)


def test_a_resumed_prepare_reads_the_cache_and_another_seed_does_not(cache_dir, tmp_path, monkeypatch):
    first = prepared(CONFIG, cache_dir, tmp_path).piece_vectors
    import textssl.embedding_init as module

    def fail(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(module, "piece_vectors", fail)
    again = prepared(CONFIG, cache_dir, tmp_path).piece_vectors
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    with pytest.raises(AssertionError, match="trained again"):  # a different config is not served the cache
        prepared(CONFIG, cache_dir, tmp_path, epochs=1)


def test_off_by_default_and_bad_values_are_refused():
    assert Word2VecInitConfig().epochs == 0
    with pytest.raises(ConfigError, match="embedding_init"):
        Word2VecInitConfig(epochs=-1)


def test_a_streamed_corpus_is_a_clear_error(cache_dir, tmp_path):
    args = tiny(cache_dir, tmp_path, **{"embedding_init.epochs": 1, "data.corpus.streaming": "true",
                                        "data.corpus.sources": "[gensim-lee]"})
    config = build_config(CONFIG, args)
    objective = get_objective(config.objective)(config)
    with pytest.raises(ConfigError, match="streaming false or embedding_init.epochs 0"):
        objective.prepare()
