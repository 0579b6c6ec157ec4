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
        f"(e.g. `huggingface-cli download {repo_id}`) and pass its local directory instead."
    )
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except GatedRepoError as exc:
        raise CheckpointNotFoundError(
            f"The Hub repo {repo_id!r} is gated: log in with `huggingface-cli login` after accepting "
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
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"Could not reach the Hugging Face Hub to fetch {repo_id!r}, and it is not in the local "
            f"HF cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). {offline_hint}"
        ) from None
    except OSError as exc:  # connection errors surface as OSError subclasses (requests/httpx)
        raise CheckpointNotFoundError(
            f"Fetching {repo_id!r} from the Hugging Face Hub failed ({exc.__class__.__name__}: {exc}). "
            f"{offline_hint}"
        ) from None
    return Path(folder)
