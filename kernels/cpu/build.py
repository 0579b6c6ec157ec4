"""The one build/cache module of the CPU kernels: compile ``gemv.c``, ``q8.c``, ``step.c`` and ``rows.c`` (four
translation units sharing ``common.h``) into one shared library, keep it in a per-user cache, and load it.

`library()` returns the loaded ``ctypes.CDLL`` (or None, with `unavailable_reason()` saying why), with
every exported function prototyped (`_PROTOTYPES`: the C signatures, in one place); `nekomata_core.kernels.cpu.gemv`
and `nekomata_core.kernels.cpu.step` only call it. Nothing is compiled at import: the first call builds, or finds
the library a previous process built, keyed by a hash of every source, the header, the flags, the
machine and the ABI version (so an edited kernel is rebuilt and an unchanged one reused). The loaded
library must report `abi.ABI_VERSION`, else it is a stale build and is not used.

It works on x86-64 Linux with a CPU that has AVX2, FMA and F16C and a C compiler; `available()` says
whether that is so here. The library is built in one ISA variant (`ISA_VARIANTS`: avx512bf16, avx512,
avx2), the best this CPU has (`isa()` says which), each cached under its own name. Environment:
``NEKOMATA_CPU_ISA=avx2`` (or another variant) forces one; ``NEKOMATA_CPU_GEMV=0`` disables the CPU kernels; ``NEKOMATA_CC``
picks the compiler; ``XDG_CACHE_HOME`` moves the cache (``$XDG_CACHE_HOME/nekomata_core``, default
``~/.cache/nekomata_core``).

Where a library may live and which one may be loaded (`trusted_library`):

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
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

# Imported before the library is loaded: the libgomp.so.1 it needs then resolves to the one torch
# already loaded, so both share one OpenMP runtime and one thread pool.
import torch  # noqa: F401

from .abi import ABI_VERSION

__all__ = [
    "CFLAGS",
    "HEADERS",
    "ISA_ENV",
    "ISA_VARIANTS",
    "TILED_VARIANTS",
    "SOURCES",
    "available",
    "cache_dir",
    "compile_flags",
    "folder_problem",
    "isa",
    "library",
    "library_name",
    "library_path",
    "library_problem",
    "platform_problem",
    "read_sources",
    "reset",
    "supported_isas",
    "trusted_library",
    "unavailable_reason",
]

# ---------------------------------------------------------------------------------------------- what to build

_HERE = Path(__file__).resolve().parent
# Compiled as separate translation units and linked into one library; the header is hashed with them.
SOURCES: tuple[Path, ...] = (_HERE / "gemv.c", _HERE / "q8.c", _HERE / "step.c", _HERE / "rows.c")
HEADERS: tuple[Path, ...] = (_HERE / "common.h",)
# Explicit ISA flags, not -march=native: the cached library may be loaded on another machine sharing the
# home directory, and the CPU flags are checked at run time instead.
# -ffp-contract=off: `a * b + c` stays two roundings, as in PyTorch's elementwise ops (fused multiply-adds
# are written out as intrinsics where they are wanted).
# -fvisibility=hidden: only the NK_EXPORT entry points leave the library (see common.h).
# -flto: gemv.c, q8.c, step.c and rows.c are four translation units; link-time optimisation lets the step inline
# the row kernels as it could if they were one file.
CFLAGS = (
    "-O3", "-flto", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-fPIC",
    "-shared",
)  # fmt: skip
_CPU_FLAGS = ("avx2", "fma", "f16c")

# The ISA variants, best first: for each, the extra compiler flags and the CPU flags (/proc/cpuinfo
# names) it needs on top of the base ones. The C code chooses its kernels with #ifdef on what the flags
# define (see common.h). `isa()` picks the first one this CPU has; NEKOMATA_CPU_ISA names one instead
# (so that every variant the CPU has can be run and tested here, e.g. NEKOMATA_CPU_ISA=avx2).
# Every CPU with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later) also has AVX512-VNNI, so
# avx512bf16 includes it; avx512vnni is Cascade Lake / Ice Lake; avx512 is Skylake-SP.
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl")
ISA_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512bf16": (
        (*_AVX512_FLAGS, "-mavx512vnni", "-mavx512bf16"),
        (*_AVX512, "avx512_vnni", "avx512_bf16"),
    ),
    "avx512vnni": ((*_AVX512_FLAGS, "-mavx512vnni"), (*_AVX512, "avx512_vnni")),
    "avx512": (_AVX512_FLAGS, _AVX512),
    "avx2": ((), ()),
}
ISA_ENV = "NEKOMATA_CPU_ISA"
# The variants whose int8 and int4 GEMVs have register tiles for many rows (q8.c, AVX512-VNNI): there a
# prefill multiplies quantized weights faster in the GEMVs than expanded into PyTorch's matmul.
TILED_VARIANTS = ("avx512bf16", "avx512vnni")
_COMPILE_TIMEOUT_S = 120
_LIBRARY_PREFIX = "nekomata_cpu"

# The exported functions and their C signatures (common.h, gemv.c, step.c, rows.c): declared once, on load. Struct
# pointers (the step's model and step arguments, laid out in kernels/cpu/step.py) travel as void*.
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_PROTOTYPES: dict[str, tuple[type, list[type]]] = {
    "nekomata_abi_version": (_I32, []),
    # W, x, bias, y, N, K, M (rows of x), flags
    "nekomata_gemv_bf16": (_I32, [_P, _P, _P, _P, _I64, _I64, _I64, _I32]),
    # W, scales, x, bias, y, N, K, M, flags
    "nekomata_gemv_int8": (_I32, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I32]),
    # W, scales, mins, scale_units, min_units, x, bias, y, N, K, M, flags
    "nekomata_gemv_int4": (_I32, [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I32]),
    # W, scales, mins, scale_units, min_units, out, out dtype, N, K, threads
    "nekomata_dequantize_int4": (_I32, [_P, _P, _P, _P, _P, _P, _I32, _I64, _I64, _I32]),
    # W, out, out dtype, N, K, threads
    "nekomata_expand_int8": (_I32, [_P, _P, _I32, _I64, _I64, _I32]),
    "nekomata_step": (_I32, [_P, _P]),  # const nk_model*, const nk_step*
    "nekomata_step_scratch_bytes": (_I64, [_P, _I64]),  # const nk_model*, batch
    "nekomata_stream_read": (_I64, [_P, _I64, _I32]),  # data, nbytes, nthreads
    # rows.c: x, w, out, rows, H, eps, act dtype, threads
    "nekomata_rms_norm_rows": (None, [_P, _P, _P, _I64, _I64, ctypes.c_float, _I32, _I32]),
    # x, its strides (b, t, n), out, cos, sin, B, T, N, D, R, per-row tables, act dtype, threads
    "nekomata_rotary_rows": (None, [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I32, _I32, _I32]),
    # h1, h2, out, n, act dtype, threads
    "nekomata_swiglu_rows": (None, [_P, _P, _P, _I64, _I32, _I32]),
}

# ---------------------------------------------------------------------------------------------- where it lives

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


# ---------------------------------------------------------------------------------------------- building


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def supported_isas() -> list[str]:
    """The ISA variants this CPU can run, best first (empty if it lacks even AVX2/FMA/F16C)."""
    flags = _cpu_flags()
    if any(flag not in flags for flag in _CPU_FLAGS):
        return []
    return [name for name, (_, needs) in ISA_VARIANTS.items() if all(flag in flags for flag in needs)]


def _isa_choice() -> tuple[str | None, str | None]:
    """(the variant to build, None) or (None, why none can be)."""
    supported = supported_isas()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return (supported[0], None) if supported else (None, None)
    if forced not in ISA_VARIANTS:
        return None, (
            f"{ISA_ENV}={forced!r} is not a CPU kernel variant; use one of {', '.join(ISA_VARIANTS)} "
            f"(or unset it to pick the best this CPU has)"
        )
    if forced not in supported:
        missing = [flag for flag in ISA_VARIANTS[forced][1] if flag not in _cpu_flags()]
        return None, (
            f"{ISA_ENV}={forced} needs CPU flags this CPU lacks ({', '.join(missing)}); this CPU runs "
            f"{', '.join(supported) or 'none of them'} (unset {ISA_ENV} to pick the best)"
        )
    return forced, None


def isa() -> str | None:
    """The ISA variant of the CPU kernels this process uses (None when they are unavailable)."""
    return _isa if available() else None


def platform_problem() -> str | None:
    """None if the CPU kernels may be built and run here, else why not (opt-out, OS/arch, CPU flags,
    a NEKOMATA_CPU_ISA this CPU cannot run)."""
    if os.environ.get("NEKOMATA_CPU_GEMV", "").strip().lower() in ("0", "false", "off", "no"):
        return "disabled by NEKOMATA_CPU_GEMV=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels need x86-64 Linux (this is {sys.platform}/{platform.machine()})"
    missing = [flag for flag in _CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)} (the CPU kernels need AVX2, FMA and F16C)"
    return _isa_choice()[1]


def compile_flags(variant: str) -> tuple[str, ...]:
    """The compiler flags of one ISA variant: CFLAGS plus the variant's own."""
    return (*CFLAGS, *ISA_VARIANTS[variant][0])


def _compiler() -> str | None:
    override = os.environ.get("NEKOMATA_CC")
    if override:
        return shutil.which(override)
    return shutil.which("cc") or shutil.which("gcc")


def read_sources() -> dict[str, bytes]:
    """Every file the library is built from (SOURCES, then HEADERS), by file name."""
    files: dict[str, bytes] = {}
    for path in (*SOURCES, *HEADERS):
        if path.name in files:
            raise ValueError(f"two kernel files are named {path.name}; each must have its own name")
        files[path.name] = path.read_bytes()
    return files


def library_name(files: Mapping[str, bytes], variant: str | None = None) -> str:
    """The cache file name of the `variant` library (default: the one this process would build) built
    from `files`: the variant's name, then a hash of every file (name and bytes), the variant's flags, the
    machine and the ABI version."""
    variant = variant or _isa_choice()[0] or "avx2"
    key = hashlib.sha256()
    parts = [part for name, data in files.items() for part in (name.encode(), data)]
    flags = " ".join(compile_flags(variant)).encode()
    for part in (*parts, flags, platform.machine().encode(), str(ABI_VERSION).encode()):
        key.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two lists hash alike
        key.update(part)
    return f"{_LIBRARY_PREFIX}-{variant}-{key.hexdigest()[:16]}.so"


def _compile(cc: str, files: Mapping[str, bytes], output: Path, variant: str = "avx2") -> str | None:
    """Compile `files` into `output` (a temporary name: `trusted_library` renames it into place); return
    None, or the reason it failed.

    The compiler reads a private copy of exactly the bytes that were hashed (a folder of its own next to
    `output`, mode 0700, removed afterwards), so an edit made meanwhile cannot end up under this name.
    """
    global _build_count
    names = " + ".join(files)
    c_files = [name for name in files if name.endswith(".c")]
    try:
        with tempfile.TemporaryDirectory(prefix=f".{output.stem}.src-", dir=output.parent) as folder:
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            proc = subprocess.run(
                [cc, *compile_flags(variant), *c_files, "-o", str(output), "-lm"],
                cwd=folder,
                capture_output=True,
                timeout=_COMPILE_TIMEOUT_S,
                check=False,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"compiling {names} with {cc} failed: {type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        return f"compiling {names} ({variant}) with {cc} failed (exit {proc.returncode}): {err[-2000:]}"
    _build_count += 1
    return None


def _build(variant: str) -> tuple[Path | None, str | None]:
    """The path of an up-to-date `variant` library that is safe to load (building it if needed), or None
    and the reason."""
    try:
        files = read_sources()
    except (OSError, ValueError) as exc:
        return None, f"cannot read the kernel sources: {exc}"
    cc = _compiler()

    def compile_to(output: Path) -> str | None:
        if cc is None:
            wanted = os.environ.get("NEKOMATA_CC") or "cc or gcc"
            return f"no C compiler found ({wanted} is not on PATH); install gcc to use the CPU kernels"
        return _compile(cc, files, output, variant)

    return trusted_library(library_name(files, variant), compile_to)


# ---------------------------------------------------------------------------------------------- loading
#
# Process-wide, like any loaded shared object: built or found once, on first use, under a lock (two
# threads may ask at once). `reset` forgets it, for tests.

_lock = threading.Lock()
_loaded = False  # the build/load below has been attempted (successfully or not)
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_path: Path | None = None
_isa: str | None = None  # the variant loaded
_build_count = 0  # compilations done by this process (the tests check that a cached build is reused)


def _prototyped(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """Load `path`, check its ABI version and declare every export; or None and why not."""
    lib = ctypes.CDLL(str(path))
    missing = [name for name in _PROTOTYPES if not hasattr(lib, name)]
    if "nekomata_abi_version" not in missing:
        version_fn = lib.nekomata_abi_version
        version_fn.restype, version_fn.argtypes = _PROTOTYPES["nekomata_abi_version"]
        version = version_fn()
        if version != ABI_VERSION:
            return None, f"{path} has ABI version {version}, expected {ABI_VERSION} (a stale build)"
    if missing:
        return None, f"{path} lacks {', '.join(missing)} (not a build of these sources)"
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib, None


def _load() -> None:
    global _loaded, _lib, _reason, _path, _isa
    with _lock:
        if _loaded:
            return
        try:
            _reason = platform_problem()
            if _reason is None:
                _isa = _isa_choice()[0]
                _path, _reason = _build(_isa)
            if _reason is None:
                _lib, _reason = _prototyped(_path)
        except Exception as exc:  # never let a broken toolchain or cache escape as an exception
            _lib, _reason = None, f"loading the CPU kernels failed: {type(exc).__name__}: {exc}"
        _loaded = True


def library() -> ctypes.CDLL | None:
    """The loaded library with its functions prototyped, building it on the first call; None when the
    CPU kernels are unavailable here (`unavailable_reason()` says why). Never raises."""
    if not _loaded:
        _load()
    return _lib


def available() -> bool:
    """True when the CPU kernels can run here (builds the library on the first call, then cached)."""
    return library() is not None


def unavailable_reason() -> str | None:
    """None when `available()`, else one sentence saying why not (platform, CPU, compiler, build error)."""
    library()
    return _reason


def library_path() -> Path | None:
    """The shared library in use (None when unavailable)."""
    return _path if available() else None


def reset() -> None:
    """Forget the loaded library so the next call builds/loads again (for tests; the old handle stays
    mapped, ctypes never unloads)."""
    global _loaded, _lib, _reason, _path, _isa
    with _lock:
        _loaded, _lib, _reason, _path, _isa = False, None, None, None, None
