"""Build C sources into a shared library and find it again, without ever loading code someone else planted.

A shared library runs code the moment it is loaded (its constructors), so where it comes from matters
as much as what it contains. The rules, all in this one module:

* Libraries live in the user's own cache only: ``$XDG_CACHE_HOME/nekomata_core`` (an absolute path;
  default ``~/.cache/nekomata_core``). Never a shared folder such as ``/tmp``, where anyone can create
  the folder or the file first.
* That folder is trusted only if the user owns it and its parent, and neither is writable by group or
  others; every folder above them must belong to the user or root and be writable by no one else, or
  carry the sticky bit (like ``/tmp``: others cannot rename or delete what they do not own there).
  The check runs on the resolved path, so a symlinked ``~/.cache`` is judged where it really lives.
* A cached library is loaded only if it is a regular file (not a symlink), owned by the user and not
  writable by group or others. Otherwise it is refused with a warning naming the problem and rebuilt
  in place (the folder itself passed the check, so the user may replace what lies in it).
* A build compiles to a fresh temporary name in the same folder (``mkstemp``, mode 0600) and is then
  renamed over the final name with ``os.replace``: concurrent builders and readers see no file or a
  complete one, never a half-written library.
* When the cache folder is unusable (untrusted, or cannot be created), the library is built into a
  fresh private folder from ``tempfile.mkdtemp`` (mode 0700, created by this process with a random name,
  so nobody can have planted anything in it), used by this process only and removed at exit; a warning
  says so once, naming the folder, the problem and the fix.

`trusted_library(name, compile_to)` applies all of this; the kernels modules only say what to compile.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "folder_problem", "library_problem", "trusted_library"]

CACHE_SUBDIR = "nekomata_core"
# Group/other write bits: with either set, someone else could replace what the path holds.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_LIBRARY_MODE = 0o755

_private: Path | None = None  # this process's fallback build folder, created on first need


def _uid() -> int:
    return os.getuid()


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nekomata_core``, or ``~/.cache/nekomata_core`` (the XDG spec ignores a relative
    XDG_CACHE_HOME, and so do we: it would depend on the current directory)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_SUBDIR


def _owner_problem(path: Path, st: os.stat_result, *, root_ok: bool) -> str | None:
    uid = _uid()
    if st.st_uid != uid and not (root_ok and st.st_uid == 0):
        whom = "you or root" if root_ok else "you"
        return f"{path} is owned by uid {st.st_uid}, not by {whom} (uid {uid})"
    return None


def folder_problem(folder: Path) -> str | None:
    """None if native code may be loaded from `folder`, else why not (one sentence naming the path).

    `folder` and its parent must be owned by the user and not group/other-writable; every folder above
    must be owned by the user or root and not group/other-writable unless sticky (``/tmp``).
    """
    try:
        real = Path(os.path.realpath(folder))
        chain = [real, *real.parents]
        for depth, path in enumerate(chain):
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                return f"{path} is not a directory"
            strict = depth <= 1  # the cache folder and its parent: the user's own, nobody else's
            problem = _owner_problem(path, st, root_ok=not strict)
            if problem:
                return problem
            writable_by_others = st.st_mode & _OTHERS_WRITE
            if writable_by_others and (strict or not st.st_mode & stat.S_ISVTX):
                return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    except OSError as exc:
        return f"cannot check {folder}: {exc.strerror or exc}"
    return None


def library_problem(path: Path) -> str | None:
    """None if the library file may be loaded, else why not: it must be a regular file (not a symlink),
    owned by the user, not group/other-writable. Call it after `folder_problem` passed for its folder."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    problem = _owner_problem(path, st, root_ok=False)
    if problem:
        return problem
    if st.st_mode & _OTHERS_WRITE:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _private_dir() -> tuple[Path, bool]:
    """This process's own build folder (mkdtemp: mode 0700, random name, created here), removed at exit;
    and whether it was created just now."""
    global _private
    if _private is not None and _private.is_dir():
        return _private, False
    _private = Path(tempfile.mkdtemp(prefix="nekomata_core-build-"))
    # The loaded library stays mapped after its file is removed (Linux semantics).
    atexit.register(shutil.rmtree, _private, ignore_errors=True)
    return _private, True


def _make_private_dirs(folder: Path) -> None:
    """Create `folder` and its missing parents with mode 0700 (a umask can only remove bits from that,
    so even umask 0 leaves nothing others can write). Existing folders are judged as they are, never
    chmod'ed behind the user's back."""
    missing = []
    path = folder
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # another process created it meanwhile: judged like any existing one
            pass


def _compile_atomically(compile_to: Callable[[Path], str | None], target: Path) -> str | None:
    """Compile to a temporary name next to `target`, then rename it into place.

    Returns None, or the compiler's error; raises OSError when the folder cannot be written.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        error = compile_to(tmp)
        if error:
            return error
        # The compiler's umask decides the mode it writes: set it, so that the check on the next load
        # passes whatever the umask (a group-writable library would be refused).
        os.chmod(tmp, _LIBRARY_MODE)
        os.replace(tmp, target)
        return None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def trusted_library(name: str, compile_to: Callable[[Path], str | None]) -> tuple[Path | None, str | None]:
    """The path of a library called `name` that is safe to load, building it if needed.

    `compile_to(path)` writes the library to `path` and returns None, or a one-sentence error. Returns
    (path, None), or (None, why not) when building failed. Untrusted cache contents are never returned:
    see the module docstring for the rules and the fallback.
    """
    folder = cache_dir()
    problem: str | None
    try:
        _make_private_dirs(folder)
        problem = folder_problem(folder)
    except OSError as exc:
        problem = f"cannot create {folder}: {exc.strerror or exc}"
    if problem is None:
        target = folder / name
        if os.path.lexists(target):
            refused = library_problem(target)
            if refused is None:
                return target, None
            warnings.warn(
                f"refusing to load the cached native library {target}: {refused}; rebuilding it "
                "(remove it, or make it yours and not group/other-writable, to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
        if problem is None:
            try:
                error = _compile_atomically(compile_to, target)
            except OSError as exc:
                problem = f"cannot write {target}: {exc.strerror or exc}"
            else:
                if error:
                    return None, error  # a compiler failure is not fixed by building elsewhere
                return _checked(target)
    # The user cache cannot be trusted or written: build into a private folder for this process.
    try:
        private, created = _private_dir()
    except OSError as exc:
        return None, f"{problem}; and no private temporary folder could be created: {exc.strerror or exc}"
    if created:  # once per process, not once per library
        warnings.warn(
            f"not using the native library cache {folder}: {problem}. Building into the private folder "
            f"{private} for this process only (fix: `chmod go-w` the folder, or make it yours, or point "
            "XDG_CACHE_HOME at a folder only you can write)",
            RuntimeWarning,
            stacklevel=3,
        )
    target = private / name
    if os.path.lexists(target) and library_problem(target) is None:
        return target, None  # built by this process earlier (the folder is ours alone)
    try:
        error = _compile_atomically(compile_to, target)
    except OSError as exc:
        return None, f"cannot write {target}: {exc.strerror or exc}"
    return (None, error) if error else _checked(target)


def _checked(target: Path) -> tuple[Path | None, str | None]:
    """The freshly built `target`, checked once more as a cached one would be."""
    refused = library_problem(target)
    return (target, None) if refused is None else (None, f"refusing to load the new build: {refused}")
