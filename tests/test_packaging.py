"""The package installs into a fresh virtual environment and imports without triton."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Makes `import triton` fail as if it were not installed, then imports everything a user would.
NO_TRITON = r"""
import sys
class BlockTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is blocked for this test")
sys.meta_path.insert(0, BlockTriton())
import nekomata_core, nekomata_core.kernels
from nekomata_core import QwenForCausalLM, QwenTokenizer, generate
from nekomata_core.kernels.dispatch import resolve_backend
import torch
assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
assert "triton" not in sys.modules
print("ok", nekomata_core.__version__)
"""


def _site_dirs_of_this_interpreter() -> list[str]:
    """The site-packages folders the running interpreter imports torch & co. from.

    Inside a virtualenv these are the venv's own, not the base interpreter's: a nested venv made with
    `system_site_packages=True` would reach the base interpreter and miss everything installed in the
    venv that runs the tests (the README's test command is run inside one).
    """
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def test_editable_install_in_a_fresh_venv_imports_without_triton(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Torch & co. come from the interpreter running this test (no network needed): a .pth file puts its
    # site-packages on the new venv's path. The project itself is installed into the venv by pip from
    # pyproject.toml, which is what this test checks.
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    (Path(venv_site) / "zz_test_parent_site.pth").write_text(
        "\n".join(_site_dirs_of_this_interpreter()) + "\n"
    )
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "-q", "-e", str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run(
        [str(python), "-c", NO_TRITON], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok")
    script = subprocess.run(
        [str(env_dir / "bin" / "nekomata"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert script.returncode == 0 and "generate" in script.stdout


def test_importing_the_package_is_instant_and_side_effect_free():
    code = "import sys, nekomata_core, nekomata_core.kernels; print('torch' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_the_wheel_installs_no_top_level_name_but_ours(tmp_path):
    # A top-level `kernels` would collide with Hugging Face's `kernels` package (which transformers
    # probes for): the repo's kernels/ folder installs as nekomata_core.kernels.
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("nekomata_core-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "nekomata_core",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    for shipped in (
        "nekomata_core/kernels/cpu/common.h",
        "nekomata_core/kernels/cpu/step.c",
        "nekomata_core/kernels/cpu/rows.c",
        "nekomata_core/kernels/gpu/attention.py",
        "nekomata_core/accelerate/__init__.py",
        "nekomata_core/apps/cli.py",
    ):
        assert shipped in names, shipped


ROOT = Path(__file__).resolve().parents[1]


def _import_kernels_from_the_checkout(extra_path: Path | None) -> subprocess.CompletedProcess:
    """`import kernels` in a fresh interpreter with this checkout's root first on sys.path (as under
    pytest or the tools/ scripts), and `extra_path` (a folder holding another `kernels`) after it."""
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}] + ([{str(extra_path)!r}] if {extra_path is not None} else [])\n"
        "import kernels\n"
        "print('found', kernels.__file__, getattr(kernels, 'MARK', None))\n"
        "import nekomata_core.kernels.dispatch\n"
        "print('ours', nekomata_core.kernels.__name__)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_checkouts_kernels_folder_does_not_take_the_name_of_hugging_faces_package(tmp_path):
    """transformers >= 5.25 depends on and imports Hugging Face's PyPI package `kernels`. With a checkout's
    root on sys.path, `import kernels` must find that package (here a stand-in placed after the root), not
    this folder (nekomata_core.kernels under another name); with no such package it finds this folder, a
    module without a version, which older transformers take for "not installed" (an ImportError would
    escape their probe)."""
    other = tmp_path / "site"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("MARK = 'hugging face'\n")
    found = _import_kernels_from_the_checkout(other)
    assert found.returncode == 0, found.stderr
    assert f"found {other / 'kernels' / '__init__.py'} hugging face" in found.stdout
    assert "ours nekomata_core.kernels" in found.stdout

    site_kernels = [p for p in sys.path if p and (Path(p) / "kernels").is_dir() and Path(p).resolve() != ROOT]
    if site_kernels:  # Hugging Face's own package is installed here: the stand-in test above covers it
        return
    alone = _import_kernels_from_the_checkout(None)
    assert alone.returncode == 0, alone.stderr
    assert f"found {ROOT / 'kernels' / '__init__.py'} None" in alone.stdout
    assert "ours nekomata_core.kernels" in alone.stdout
