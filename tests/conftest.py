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
