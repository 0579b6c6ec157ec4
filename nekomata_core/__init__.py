"""nekomata_core: the Qwen (v1) architecture in plain PyTorch, for rinna/nekomata and its siblings.

    from nekomata_core import QwenForCausalLM, QwenTokenizer, generate
    model = QwenForCausalLM.from_pretrained("rinna/nekomata-7b")
    tokenizer = QwenTokenizer.from_pretrained("rinna/nekomata-7b")

Names are imported on first use, so `import nekomata_core` (and `nekomata --help`) stays instant and
never imports torch or triton until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AutoModelForCausalLM": ".compat",
    "AutoTokenizer": ".compat",
    "GenerationOutput": ".generation",
    "KVCache": ".cache",
    "PRESETS": ".config",
    "QwenConfig": ".config",
    "QwenForCausalLM": ".pretrained",
    "QwenTokenizer": ".tokenizer",
    "SamplingParams": ".sampling",
    "generate": ".generation",
    "stream": ".generation",
}
__all__ = [
    "PRESETS",
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "GenerationOutput",
    "KVCache",
    "QwenConfig",
    "QwenForCausalLM",
    "QwenTokenizer",
    "SamplingParams",
    "generate",
    "stream",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nekomata_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from .cache import KVCache
    from .compat import AutoModelForCausalLM, AutoTokenizer
    from .config import PRESETS, QwenConfig
    from .generation import GenerationOutput, generate, stream
    from .pretrained import QwenForCausalLM
    from .sampling import SamplingParams
    from .tokenizer import QwenTokenizer
