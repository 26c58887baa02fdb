"""Shared test setup: offline, CPU, and one corpus/tokenizer cache per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub call fails at once instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs a package registry (npm/PyPI); run with SELFSUP_NETWORK_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SELFSUP_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs a package registry; set SELFSUP_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Corpora and tokenizers built once per session, shared by every test that needs them."""
    return str(tmp_path_factory.mktemp("selfsup-cache"))


def build_tiny_encoder(out, cache_dir: str) -> str:
    """An exported-looking BERT folder (BertForMaskedLM + a tokenizer trained on the tiny polarity task),
    small enough to fine-tune in seconds; returns its path."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from textssl.tasks import TaskConfig, load_task
    from textssl.tokenizer import TokenizerConfig, train_tokenizer

    task = load_task(TaskConfig(name="tiny-polarity", cache_dir=cache_dir))
    tokenizer = train_tokenizer(task.splits["train"]["text"], TokenizerConfig(vocab_size=400, min_frequency=1),
                                out / "tokenizer", model_max_length=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                       pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return str(out / "model")
