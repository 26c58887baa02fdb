"""Start a transformer's token embeddings from word2vec vectors of the tokenizer's own pieces.

A small encoder pretrained for half an hour on a CPU learns word order and frequent words from masked-LM,
but little about what content words mean; skip-gram learns that from the same text in minutes (demo corpus,
movie sentiment, linear probe of the mean-pooled embedding layer: 0.685 when the masked-LM started from skip-gram,
0.635 from its own random start, 0.614 for random embeddings; benchmarks/RESULTS.md, section 6). So the masked-LM
can start from them: skip-gram (gensim) is trained on the training blocks the masked-LM will read, with the
pieces as words, and its vectors, rescaled to the model's init scale, replace the random rows of the embedding
table (tied to the output layer, so the vocab projection starts from them too). Pieces word2vec never saw, and
special tokens, keep their random rows. gensim directly, not `textssl.word2vec`: that one trains on words it
tokenizes itself, and here the units are the tokenizer's piece ids of already-packed blocks.

The vectors are computed once per run and cached in the run folder, so a resumed run and the other
processes of a launch (which prepare after the main one) read them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sslcore.config import ConfigError

logger = logging.getLogger(__name__)

CACHE_NAME = "word2vec_init.safetensors"


@dataclass
class Word2VecInitConfig:
    """Skip-gram vectors of the tokenizer's pieces as the starting token embeddings (0 epochs = random init)."""

    epochs: int = 0
    """Passes of skip-gram over the training blocks before pretraining; 0 = off (random embeddings)."""
    window: int = 5
    """Context pieces on each side."""
    negative: int = 5
    """Negative samples per prediction."""
    sample: float = 1e-4
    """Down-sampling threshold of frequent pieces (word2vec's `sample`)."""
    workers: int = 1
    """gensim threads; 1 keeps the vectors deterministic for a given seed."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.window < 1 or self.negative < 1 or self.workers < 1:
            raise ConfigError(f"embedding_init: epochs must be >= 0 and window, negative, workers >= 1, got {self}")


def piece_vectors(blocks: datasets.Dataset, vocab_size: int, special_ids: list[int], width: int,
                  config: Word2VecInitConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip-gram vectors (vocab_size x width) of the pieces in `blocks["input_ids"]` and a mask of the rows it
    trained (pieces that occur; special tokens are dropped from the sentences)."""
    from gensim.models import Word2Vec

    special = np.asarray(special_ids)
    ids = blocks.with_format("numpy")["input_ids"]
    sentences = [[str(piece) for piece in row[~np.isin(row, special)]] for row in ids]
    model = Word2Vec(vector_size=width, window=config.window, min_count=1, sg=1, negative=config.negative,
                     sample=config.sample, workers=config.workers, seed=seed)
    model.build_vocab(sentences)
    model.train(sentences, total_examples=len(sentences), epochs=config.epochs)
    vectors = torch.zeros(vocab_size, width)
    trained = torch.zeros(vocab_size, dtype=torch.bool)
    rows = torch.tensor([int(piece) for piece in model.wv.index_to_key])
    vectors[rows] = torch.from_numpy(model.wv.vectors.copy())
    trained[rows] = True
    return vectors, trained


def cached_piece_vectors(run_dir: str | Path, blocks: datasets.Dataset, vocab_size: int, special_ids: list[int],
                         width: int, config: Word2VecInitConfig, seed: int,
                         tokenizer_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`piece_vectors`, read from `<run_dir>/word2vec_init.safetensors` when it was made from the same blocks
    (their `datasets` fingerprint and `tokenizer_key`), config and seed."""
    if not isinstance(blocks, datasets.Dataset):
        raise ConfigError("embedding_init.epochs > 0 needs the training corpus in memory, not streamed; set "
                          "data.corpus.streaming false or embedding_init.epochs 0")
    data_key = [tokenizer_key, blocks._fingerprint, len(blocks)]
    key = hashlib.sha256(json.dumps([data_key, asdict(config), seed, width, vocab_size]).encode()).hexdigest()[:16]
    path = Path(run_dir) / CACHE_NAME
    if path.is_file():
        saved = load_file(str(path))
        if bytes(saved["key"].tolist()).decode() == key:
            logger.info("word2vec embedding init read from %s", path)
            return saved["vectors"], saved["trained"]
    started = time.perf_counter()
    vectors, trained = piece_vectors(blocks, vocab_size, special_ids, width, config, seed)
    logger.info("word2vec embedding init: %d of %d pieces, %d epochs in %.0f s", int(trained.sum()), vocab_size,
                config.epochs, time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": vectors, "trained": trained, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)},
              str(path))
    return vectors, trained


def load_into(embedding: nn.Embedding, vectors: torch.Tensor, trained: torch.Tensor, std: float) -> None:
    """Copy the trained rows of `vectors`, centred and rescaled so their entries have standard deviation `std`
    (the model's init scale, so position embeddings keep their weight after the embedding LayerNorm), into
    `embedding`."""
    if vectors.shape != embedding.weight.shape:
        raise ValueError(f"word2vec vectors {tuple(vectors.shape)} do not fit the embedding table "
                         f"{tuple(embedding.weight.shape)}")
    rows = vectors[trained]
    rows = rows - rows.mean(0)  # skip-gram vectors share a common direction; it carries no meaning
    with torch.no_grad():
        embedding.weight[trained] = rows * (std / rows.std().clamp(min=1e-12))
