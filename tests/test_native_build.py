"""Native code is loaded only from where nobody else could have put it (`nekomata_core.kernels.cpu.build`).

A planted library is a real shared object whose constructor writes a marker file the moment anything
dlopens it (checked once in a subprocess, so the tests below can fail). It is planted in every place an
attacker could reach: the old shared temp location, a group/world-writable cache folder or parent, a
group/world-writable or foreign-owned library file, a symlink. Each time the loader must refuse it,
load a library it built itself, and the marker must never appear.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from nekomata_core.kernels.cpu import build

requires_kernels = pytest.mark.skipif(
    not build.available(), reason=f"CPU kernels unavailable: {build.unavailable_reason()}"
)

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("NEKOMATA_TEST_MARKER");
    if (marker) { FILE *f = fopen(marker, "w"); if (f) { fputs("loaded", f); fclose(f); } }
}
int nekomata_abi_version(void) { return 3; }
"""

OTHER_UID = 65534  # nobody


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory) -> Path:
    """A shared library that announces being loaded, verified to do so."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted library")
    folder = tmp_path_factory.mktemp("planted")
    source, library = folder / "planted.c", folder / "planted.so"
    source.write_text(PLANTED_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    marker = folder / "proof"
    env = {**os.environ, "NEKOMATA_TEST_MARKER": str(marker)}
    subprocess.run(
        [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"], env=env, check=True
    )
    assert marker.read_text() == "loaded"  # the planted library really runs code when loaded
    return library


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Fresh cache (XDG_CACHE_HOME), temp dir and loader state; the marker file path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(build, "_private", None)
    marker = tmp_path / "marker"
    monkeypatch.setenv("NEKOMATA_TEST_MARKER", str(marker))
    build.reset()
    yield marker
    build.reset()


def _library_name() -> str:
    return build.library_name(build.read_sources())


def _plant(planted: Path, tmp_path: Path, where: str) -> tuple[Path, str]:
    """Put the planted library where `where` says; return its path and the refusal the loader must give
    (empty when the loader should simply never look there)."""
    cache = tmp_path / "home-cache" / "nekomata_core"
    name = _library_name()
    if where == "old shared temp folder":  # $TMPDIR/nekomata_core-<uid>/, where it used to be looked for
        target = tmp_path / "tmp" / f"nekomata_core-{os.getuid()}" / name
        target.parent.mkdir(parents=True)
        shutil.copy(planted, target)
        return target, ""
    cache.mkdir(parents=True)
    target = cache / name
    if where == "symlink in the cache":
        target.symlink_to(planted)
        return target, "symbolic link"
    shutil.copy(planted, target)
    os.chmod(target, 0o755)
    if where == "world-writable cache folder":
        os.chmod(cache, 0o777)
        return target, "writable by group or others"
    if where == "world-writable cache parent":
        os.chmod(cache.parent, 0o777)
        return target, "writable by group or others"
    if where == "group-writable library":
        os.chmod(target, 0o775)
        return target, "writable by group or others"
    if where == "library owned by another user":
        os.chown(target, OTHER_UID, -1)
        return target, f"owned by uid {OTHER_UID}"
    if where == "cache folder owned by another user":
        os.chown(cache, OTHER_UID, -1)
        return target, f"owned by uid {OTHER_UID}"
    raise AssertionError(where)


UNTRUSTED_FOLDERS = (
    "world-writable cache folder",
    "world-writable cache parent",
    "cache folder owned by another user",
)
PLACES = [
    "old shared temp folder",
    "symlink in the cache",
    "world-writable cache folder",
    "world-writable cache parent",
    "group-writable library",
    "library owned by another user",
    "cache folder owned by another user",
]


@requires_kernels
@pytest.mark.parametrize("where", PLACES)
def test_a_planted_library_is_never_loaded(planted_library, isolated, tmp_path, where):
    if "owned by another" in where and os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    planted, refusal = _plant(planted_library, tmp_path, where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build.available(), build.unavailable_reason()
    assert not isolated.exists(), f"the library planted in the {where} was loaded"
    used = build.library_path()
    assert build.library_problem(used) is None
    assert build.folder_problem(used.parent) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if refusal:  # the refusal is said, naming the path and the problem
        assert any(refusal in m and str(planted.parent) in m for m in messages), messages
    if where in UNTRUSTED_FOLDERS:  # the untrusted cache is left alone; a private per-process folder is used
        assert used.parent.parent == tmp_path / "tmp" and used.parent.name.startswith("nekomata_core-build-")
        assert (used.parent.stat().st_mode & 0o777) == 0o700
        assert any("private folder" in m and "XDG_CACHE_HOME" in m for m in messages), messages
    else:  # a trusted cache folder: the library is rebuilt there, replacing the bad file
        assert used == tmp_path / "home-cache" / "nekomata_core" / _library_name()
        assert not used.is_symlink() and build.library_problem(used) is None
    # And a later process does not load it either (a fresh state, the same folders).
    build.reset()
    assert build.available() and not isolated.exists()


def test_the_checks_name_the_path_and_the_problem(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    assert build.folder_problem(folder) is None
    os.chmod(folder, 0o777)
    assert f"{folder} is writable by group or others (mode 0777)" in build.folder_problem(folder)
    os.chmod(folder, 0o700)
    library = folder / "x.so"
    library.write_bytes(b"")
    os.chmod(library, 0o644)
    assert build.library_problem(library) is None
    os.chmod(library, 0o646)
    assert "writable by group or others" in build.library_problem(library)
    (folder / "dir.so").mkdir()
    assert "not a regular file" in build.library_problem(folder / "dir.so")
    assert "cannot check" in build.library_problem(folder / "missing.so")


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert build.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "nekomata_core"


@requires_kernels
def test_a_build_is_renamed_into_place_with_a_safe_mode_whatever_the_umask(isolated, tmp_path):
    old = os.umask(0o000)  # a compiler honouring this umask writes a world-writable file
    try:
        assert build.available(), build.unavailable_reason()
    finally:
        os.umask(old)
    used = build.library_path()
    assert (used.stat().st_mode & 0o777) == 0o755
    assert [p.name for p in used.parent.iterdir()] == [used.name]  # no temporary name left behind
