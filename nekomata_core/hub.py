"""Turn "a local directory or a Hugging Face Hub repo id" into a local directory.

Everything that reads checkpoint files (the weight loader, the tokenizer, the CLI) goes through
`resolve_model_dir`, so a path and a Hub id behave the same everywhere. Only the files we actually
read are downloaded (`allow_patterns`): never the original `*.py` remote code, never pickled weights
unless a caller explicitly asks for them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NekomataError

# What a full nekomata/Qwen checkpoint needs: config, generation defaults, the BPE file, weights.
CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "qwen.tiktoken",
    "*.safetensors",
    "model.safetensors.index.json",
)
TOKENIZER_PATTERNS: tuple[str, ...] = ("qwen.tiktoken", "tokenizer_config.json")


class CheckpointNotFoundError(FileNotFoundError, NekomataError):
    """The path is not a local directory and the Hub could not provide it."""


def hub_cli_name() -> str:
    """The command-line tool of the installed huggingface_hub: `hf` since 0.34 (where `huggingface-cli`
    was deprecated, and later removed), `huggingface-cli` before. `hf` when it is not installed, since
    `pip install huggingface_hub` installs a current one."""
    try:
        from huggingface_hub import __version__
    except ImportError:
        return "hf"
    parts = []
    for piece in __version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return "hf" if tuple(parts) >= (0, 34) else "huggingface-cli"


def download_command(repo_id: str, *, include: str | None = None) -> str:
    """The shell command that downloads `repo_id` with the installed huggingface_hub."""
    return f"{hub_cli_name()} download {repo_id}" + (f" --include {include}" if include else "")


def login_command() -> str:
    """The shell command that logs in to the Hub with the installed huggingface_hub."""
    return "hf auth login" if hub_cli_name() == "hf" else "huggingface-cli login"


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode, read as huggingface_hub itself reads it (at import:
    HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1/ON/YES/TRUE, in any case)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        return bool(constants.HF_HUB_OFFLINE)
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _offline_message(repo_id: str) -> str:
    variable = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return (
        f"Hugging Face offline mode is on ({variable}={os.environ.get(variable, '')!r}), and {repo_id!r} is not "
        "in the local HF cache (HF_HOME / HF_HUB_CACHE). Unset it (or set it to 0) to download the "
        f"checkpoint, or pass the local directory of a downloaded copy (e.g. from `{download_command(repo_id)}` "
        "on a machine with network access)."
    )


def looks_like_repo_id(name: str) -> bool:
    """`owner/name` with no path-only characters: how the Hub spells a repo id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    allow_patterns: tuple[str, ...] | list[str] | None = CHECKPOINT_PATTERNS,
) -> Path:
    """Return a local directory holding the checkpoint.

    A path that exists is used as it is (``revision`` must then be None). Anything else that
    looks like ``owner/name`` is fetched with ``huggingface_hub.snapshot_download``, which honours
    the HF cache, ``HF_HOME`` and ``HF_HUB_OFFLINE``. Failure raises `CheckpointNotFoundError`
    with a message that says what to do instead.
    """
    local = Path(os.fspath(path_or_repo_id)).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} was given for the local directory {str(local)!r}; "
                "revisions only apply to Hub repo ids. Drop revision or pass a repo id."
            )
        return local
    if local.exists():
        raise CheckpointNotFoundError(
            f"{str(local)!r} is a file, not a checkpoint directory. Pass the directory that holds "
            "config.json and the *.safetensors files."
        )
    name = os.fspath(path_or_repo_id)
    if not looks_like_repo_id(name):
        raise CheckpointNotFoundError(
            f"{name!r} is neither an existing directory nor a Hub repo id of the form 'owner/name'. "
            "Pass a local checkpoint directory or a repo id such as 'rinna/nekomata-7b'."
        )
    return _download(name, revision=revision, allow_patterns=allow_patterns)


def _download(repo_id: str, *, revision: str | None, allow_patterns) -> Path:
    # Imported here so that a purely local workflow never touches huggingface_hub's network setup.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline_hint = (
        "If the Hub is unreachable from this machine, download the checkpoint elsewhere "
        f"(e.g. `{download_command(repo_id)}`) and pass its local directory instead."
    )
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except GatedRepoError as exc:
        raise CheckpointNotFoundError(
            f"The Hub repo {repo_id!r} is gated: log in with `{login_command()}` after accepting "
            f"its terms. ({exc.__class__.__name__})"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(
            f"The Hub repo {repo_id!r} has no revision {revision!r}. Check the branch, tag or commit."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"The Hub has no repo {repo_id!r} (or it is private). Check the spelling, or pass a "
            "local directory."
        ) from None
    except (LocalEntryNotFoundError, OSError) as exc:
        # Offline mode first: then nothing was even tried, and "could not reach the Hub" would mislead.
        if hub_offline():
            raise CheckpointNotFoundError(_offline_message(repo_id)) from None
        if isinstance(exc, LocalEntryNotFoundError):
            raise CheckpointNotFoundError(
                f"Could not reach the Hugging Face Hub to fetch {repo_id!r}, and it is not in the local "
                f"HF cache. {offline_hint}"
            ) from None
        # connection errors surface as OSError subclasses (requests/httpx)
        raise CheckpointNotFoundError(
            f"Fetching {repo_id!r} from the Hugging Face Hub failed ({exc.__class__.__name__}: {exc}). "
            f"{offline_hint}"
        ) from None
    return Path(folder)
