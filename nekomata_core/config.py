"""QwenConfig: the shape and behaviour switches of a Qwen (v1) checkpoint, read from config.json.

The field names are the original's (the `QWenConfig` of the remote code), so a config.json from the
Hub parses as it is. Unknown keys are kept in `extra` and written back out, never dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NekomataError
from .hub import resolve_model_dir
from .safe_files import SMALL_JSON_MAX_BYTES, json_value_problem, read_json_file

# The decode paths (nekomata_core.decode.make_decoder), defined here, torch-free, so that the CLI parsers
# can list them without importing torch.


class ConfigError(NekomataError):
    """A config file (config.json, generation_config.json) is unreadable, has a key missing or of the
    wrong type, is inconsistent, or does not match the checkpoint's tensors."""


class MissingConfigError(FileNotFoundError, ConfigError):
    """The checkpoint folder has no config.json."""


# Keys without which the architecture is undefined: no silent defaults for these.
REQUIRED_KEYS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


@dataclass
class QwenConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # Qwen quirk: twice the real MLP width; see `mlp_width`.
    kv_channels: int | None = None  # head dim D; the original defaults it to hidden_size // heads
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 8192  # S: the trained context; NTK and logn switch on past it
    max_position_embeddings: int = 32768
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    scale_attn_weights: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    use_flash_attn: str | bool = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    @property
    def mlp_width(self) -> int:
        # Qwen quirk: config.json stores twice the width of w1/w2 (22016 for 7B, real width 11008),
        # because the original splits `intermediate_size` between the two input projections.
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        # RoPE touches only the first rotary_pct of each head's dims (all of them for every release).
        return int(self.head_dim * self.rotary_pct)

    @property
    def torch_dtype_name(self) -> str | None:
        """The dtype config.json asks for (bf16/fp16/fp32 flags), or None for "pick automatically"."""
        for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
            if getattr(self, flag):
                return name
        return None

    def num_parameters(self) -> int:
        """Exact parameter count of the checkpoint (what `QwenForCausalLM` allocates).

        Computed from one layer's shapes × num_hidden_layers, never by listing every layer: the loader
        calls it on untrusted configs (num_hidden_layers: 10**9) before anything is checked."""
        per_layer = sum(math.prod(shape) for shape in self.layer_parameter_shapes(0).values())
        outside = sum(math.prod(shape) for shape in self.outer_parameter_shapes().values())
        return outside + self.num_hidden_layers * per_layer

    def num_tensors(self) -> int:
        """How many tensors `parameter_shapes()` lists, without listing them."""
        return len(self.outer_parameter_shapes()) + self.num_hidden_layers * len(
            self.layer_parameter_shapes(0)
        )

    def outer_parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors outside the transformer blocks: embedding, final norm, lm_head."""
        h, v = self.hidden_size, self.vocab_size
        return {"transformer.wte.weight": (v, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (v, h)}

    def layer_parameter_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """The tensors of block `i`, by safetensors key, as `[out, in]` like nn.Linear."""
        h, f = self.hidden_size, self.mlp_width
        prefix = f"transformer.h.{i}."
        shapes: dict[str, tuple[int, ...]] = {
            prefix + "ln_1.weight": (h,),
            prefix + "attn.c_attn.weight": (3 * h, h),
            prefix + "attn.c_attn.bias": (3 * h,),
            prefix + "attn.c_proj.weight": (h, h),
            prefix + "ln_2.weight": (h,),
            prefix + "mlp.w1.weight": (f, h),
            prefix + "mlp.w2.weight": (f, h),
            prefix + "mlp.c_proj.weight": (h, f),
        }
        if not self.no_bias:  # every release has no_bias=true; the other linears get biases otherwise
            shapes[prefix + "attn.c_proj.bias"] = (h,)
            shapes[prefix + "mlp.w1.bias"] = (f,)
            shapes[prefix + "mlp.w2.bias"] = (f,)
            shapes[prefix + "mlp.c_proj.bias"] = (h,)
        return shapes

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint must hold, by its safetensors key, as `[out, in]` like nn.Linear.

        `QwenForCausalLM` allocates exactly these (a test checks it); the loader and the tiny
        checkpoint builder use this table so that all three agree on the file layout. It has one
        entry per tensor: check an untrusted config against the files first (the loader does).
        """
        outer = self.outer_parameter_shapes()
        shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": outer["transformer.wte.weight"]}
        for i in range(self.num_hidden_layers):
            shapes.update(self.layer_parameter_shapes(i))
        shapes["transformer.ln_f.weight"] = outer["transformer.ln_f.weight"]
        shapes["lm_head.weight"] = outer["lm_head.weight"]
        return shapes

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config key {name!r} must be a positive integer, got {value!r}")

        for name in (*REQUIRED_KEYS, "kv_channels", "seq_length", "max_position_embeddings"):
            positive_int(name)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key {f.name!r} is {value!r}; every number must be finite")
        if self.hidden_size != self.num_attention_heads * self.kv_channels:
            raise ConfigError(
                f"config key 'hidden_size' ({self.hidden_size}) must equal num_attention_heads "
                f"({self.num_attention_heads}) × kv_channels ({self.kv_channels}); fix one of the three."
            )
        if self.intermediate_size % 2:
            raise ConfigError(
                f"config key 'intermediate_size' ({self.intermediate_size}) must be even: Qwen stores "
                "twice the MLP width there."
            )
        if not 0.0 < float(self.rotary_pct) <= 1.0:
            raise ConfigError(f"config key 'rotary_pct' must be in (0, 1], got {self.rotary_pct!r}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(
                f"config key 'rotary_pct' ({self.rotary_pct}) gives {self.rotary_dim} rotary dims of "
                f"{self.head_dim}; rotate-half needs a positive even number."
            )
        if self.head_dim % 2:
            raise ConfigError(f"config key 'kv_channels' must be even, got {self.head_dim}")
        if not float(self.layer_norm_epsilon) > 0:
            raise ConfigError(f"config key 'layer_norm_epsilon' must be > 0, got {self.layer_norm_epsilon!r}")
        if not float(self.rotary_emb_base) > 1:
            raise ConfigError(f"config key 'rotary_emb_base' must be > 1, got {self.rotary_emb_base!r}")
        if self.seq_length < 2 and self.use_logn_attn:
            # logn divides by log(seq_length).
            raise ConfigError("config key 'seq_length' must be ≥ 2 when use_logn_attn is true")
        flags = [name for name in ("bf16", "fp16", "fp32") if getattr(self, name)]
        if len(flags) > 1:
            raise ConfigError(
                f"config keys {flags} are all true; at most one of 'bf16', 'fp16', 'fp32' may be set "
                "(all false means pick automatically)."
            )
        if self.tie_word_embeddings:
            raise ConfigError(
                "config key 'tie_word_embeddings' is true, but every Qwen v1 release has an untied "
                "lm_head; this checkpoint is not a Qwen v1 model."
            )

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QwenConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        problem = json_value_problem(data)  # non-finite numbers anywhere, also in keys we do not model
        if problem:
            raise ConfigError(f"config {problem}")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ConfigError(f"config.json is missing the required key(s) {missing}")
        model_type = data.get("model_type", "qwen")
        if model_type != "qwen":
            raise ConfigError(
                f"config key 'model_type' is {model_type!r}; nekomata_core runs Qwen v1 ('qwen') "
                "checkpoints only (Qwen1.5/Qwen2 are a different architecture)."
            )
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = _coerce(key, value, known[key].type)
            else:
                extra[key] = value
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> QwenConfig:
        """Read and validate config.json (bounded in size, links followed only inside its folder)."""
        path = Path(path)
        if not path.is_file():
            raise MissingConfigError(f"no config.json at {str(path)!r}; a checkpoint directory needs one")
        data = read_json_file(
            path,
            max_bytes=SMALL_JSON_MAX_BYTES,
            error=ConfigError,
            fix="use the config.json of the checkpoint",
        )
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{str(path)!r}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike[str], *, revision: str | None = None):
        folder = resolve_model_dir(path_or_repo_id, revision=revision, allow_patterns=("config.json",))
        return cls.from_json_file(folder / "config.json")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> QwenConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The config.json the original remote code expects (with `architectures`, `auto_map`)."""
        data = {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
            },
            "model_type": "qwen",
        }
        data.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        return data


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check the JSON type of one known key; ints stored as floats (e.g. 10000.0) are fine."""
    kind = str(annotation)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if value is None and "None" in kind:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if kind == "str | bool" and not isinstance(value, (str, bool)):
        raise ConfigError(f"config key {key!r} must be a string or true/false, got {value!r}")
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    return value


# The real shapes of the released checkpoints (config.json of each Hub repo). seq_length differs
# between releases and revisions: a checkpoint's own config.json always wins over a preset.
_QWEN_COMMON: dict[str, Any] = {
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "tie_word_embeddings": False,
    "scale_attn_weights": True,
    "use_flash_attn": "auto",
}
PRESETS: dict[str, dict[str, Any]] = {
    "qwen-1.8b": {
        **_QWEN_COMMON,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 11008,
        "seq_length": 8192,
        "max_position_embeddings": 8192,
    },
    "qwen-7b": {
        **_QWEN_COMMON,
        "vocab_size": 151936,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 22016,
        "seq_length": 8192,
        "max_position_embeddings": 32768,
    },
    "qwen-14b": {
        **_QWEN_COMMON,
        "vocab_size": 152064,
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "intermediate_size": 27392,
        "seq_length": 2048,
        "max_position_embeddings": 8192,
    },
    "qwen-72b": {
        **_QWEN_COMMON,
        "vocab_size": 152064,
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "intermediate_size": 49152,
        "seq_length": 32768,
        "max_position_embeddings": 32768,
    },
    # The benchmark shape: a 620M-parameter Qwen-shaped model (random weights).
    "bench-620m": {
        **_QWEN_COMMON,
        "vocab_size": 151936,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "kv_channels": 64,
        "intermediate_size": 5632,
        "seq_length": 8192,
        "max_position_embeddings": 32768,
    },
    # For tests and demos: the real vocabulary (so the real qwen.tiktoken works), everything else tiny.
    "tiny": {
        **_QWEN_COMMON,
        "vocab_size": 151936,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "intermediate_size": 256,
        "seq_length": 64,
        "max_position_embeddings": 32768,
    },
}
# rinna's continual pre-training keeps the base model's architecture exactly.
PRESETS["nekomata-7b"] = dict(PRESETS["qwen-7b"])
PRESETS["nekomata-14b"] = dict(PRESETS["qwen-14b"])
