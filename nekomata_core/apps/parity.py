"""Parity report: run the same tokens through nekomata_core and an independent reference, layer by layer.

    nekomata parity MODEL [--reference qwen2|remote-code] [--dtype float32|bfloat16|float16]
        [--prompt TEXT ...] [--random-tokens N] [--max-new-tokens N] [--atol-logits X] [--json]

What is compared, for every input sequence (each run on its own, batch size 1, no padding):

* every hidden state: the embeddings, the output of each block 0 … L-1 (before ln_f) and the final
  norm output (ln_f of the last block): max |Δ|, mean |Δ|, max |ref| and the relative error
  rel = max |Δ| / max |ref|;
* the logits: the same four numbers;
* top-1 agreement: the share of positions whose argmax is the same in both;
* greedy continuation: `max_new_tokens` tokens chosen by argmax, ours through `generate()` and the
  static KV cache, the reference by a plain full forward per step (no cache at all, so the cache is
  checked too); reported as the number of identical leading tokens. It runs past seq_length too,
  where ports go wrong: Qwen v1 keeps the NTK alpha of the prefill for every decode step, so the
  reference is run with the alpha of the prompt's length (see References).

Verdict (exit code 0 pass, 1 divergence, 2 no verdict: a usage error, a reference that could not be
built or run — `ReferenceFailed` — or zero greedy tokens compared, which is never a pass):

* each state (and the logits) must have rel ≤ `rel` (for the logits: max |Δ| ≤ `--atol-logits` instead,
  when that is given). The first state in forward order that fails is *the first diverging layer*:
  everything before it agrees, so the bug (or the perturbed weight) lives in that layer.
* bf16/fp16 only: a state beyond `rel` still passes when it is within the reference's own rounding noise.
  The reference is run once more in float32 (the "exact" answer) and the state passes if
  max |ours − ref_fp32| ≤ 2 × max |ref − ref_fp32|: our rounding error is no more than twice
  transformers' rounding error in the same dtype (ratios measured on random models: 0.7–1.3). A
  fixed bound alone would wrongly fail deep or badly conditioned models, where honest bf16 rounding
  grows past any fixed share of the largest value. `--no-fp32-baseline` skips this (and the memory
  for a float32 copy).
* top-1 agreement ≥ `min_top1`, and every greedy continuation identical. A disagreement is excused
  as a *near-tie* when the reference itself ranks the two tokens within twice the logits tolerance
  (rel × max |ref logit|, or --atol-logits; each side may be off by the tolerance): it shows
  rounding, not a bug.

Default thresholds by dtype (both sides run in that dtype; `DEFAULT_THRESHOLDS` below):

    float32   rel 1e-5,  top-1 ≥ 1.00   two correct fp32 implementations differ by ~1e-7 – 1e-6
    bfloat16  rel 2e-2,  top-1 ≥ 0.98   unit roundoff 2^-8 ≈ 3.9e-3: a few ulps of the largest value,
                                        then the 2× fp32-noise rule above
    float16   rel 5e-3,  top-1 ≥ 0.98   unit roundoff 2^-11 ≈ 4.9e-4: about ten ulps, then the same rule

References:

* `qwen2` (default): transformers' built-in `Qwen2ForCausalLM` holding the checkpoint's weights through
  the mapping of `nekomata_core.reference` (read with the `safetensors` library, not our loader). It
  computes what Qwen v1 computes while the total length is ≤ seq_length; past it, its RoPE
  frequencies are set to those of the NTK alpha of each prompt's length (frozen at prefill, as Qwen v1
  decodes) and a hook on q_proj applies logn scaling, both from the formulas in
  `nekomata_core.reference`. Works with transformers 4.45 and later.
* `remote-code`: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, i.e. the
  original `modeling_qwen.py` shipped in the checkpoint folder. This EXECUTES that code; it is used only
  when asked for explicitly. Past seq_length its greedy continuation runs through its own KV cache
  (a cache-less forward would re-choose alpha from the whole length). The original targets transformers 4.32–4.3x; a newer transformers may
  fail to load it, which is reported as one clear error.

`--reference-dir` loads the reference's weights from another folder (e.g. the original checkpoint when
MODEL is a converted or re-sharded copy); by default both sides read MODEL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import ATTENTION_CHOICES, OPS_CHOICES
from ..errors import NekomataError

if TYPE_CHECKING:
    import torch

    from ..pretrained import QwenForCausalLM

# torch is imported inside the functions that use it, so that registering this command in the CLI
# does not slow down `nekomata --help`.

REFERENCES = ("qwen2", "remote-code")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEFAULT_PROMPTS = (
    "西田幾多郎は、",  # the example prompt of rinna's nekomata model card
    "The capital of Japan is Tokyo, and the capital of France is",
)
DEFAULT_RANDOM_TOKENS = 32
DEFAULT_MAX_NEW_TOKENS = 16


class ParityError(NekomataError):
    """The comparison cannot be run as asked (bad inputs, too long, no usable reference)."""


class ReferenceFailed(ParityError):
    """The reference could not be built or run: no verdict either way (exit 2, not 1)."""


# Exit codes of `nekomata parity` (documented in its --help).
EXIT_PASS, EXIT_DIVERGENCE, EXIT_NOT_RUN = 0, 1, 2


@dataclass(frozen=True)
class Thresholds:
    """What counts as agreement. `rel` bounds max |Δ| / max |ref| of every hidden state and the logits;
    `atol_logits`, if set, replaces the logits' relative bound by an absolute one on max |Δ|."""

    rel: float
    min_top1: float
    atol_logits: float | None = None
    # bf16/fp16: a state also passes when its error against a float32 reference is at most this many
    # times the reference's own error against float32 (None: fixed bounds only).
    noise_factor: float | None = None


DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "float32": Thresholds(rel=1e-5, min_top1=1.0),
    "bfloat16": Thresholds(rel=2e-2, min_top1=0.98, noise_factor=2.0),
    "float16": Thresholds(rel=5e-3, min_top1=0.98, noise_factor=2.0),
}


@dataclass
class StateRow:
    """One compared tensor (aggregated over the inputs: maxima of the maxima, token-weighted means)."""

    name: str  # "embeddings", "block i", "final norm", "logits"
    max_abs: float
    mean_abs: float
    ref_max: float
    rel: float  # the largest per-input max |Δ| / max |ref|
    limit: float
    limit_kind: str  # "rel" or "abs" (logits with --atol-logits)
    ours_vs_fp32: float | None = None  # max |ours − ref_fp32| (bf16/fp16 with the fp32 baseline)
    ref_vs_fp32: float | None = None  # max |ref − ref_fp32|: the reference's own rounding noise
    noise_factor: float | None = None

    @property
    def within_limit(self) -> bool:
        value = self.max_abs if self.limit_kind == "abs" else self.rel
        return math.isfinite(value) and value <= self.limit

    @property
    def noise_ratio(self) -> float | None:
        """max |ours − ref_fp32| / max |ref − ref_fp32|, or None without the fp32 baseline."""
        if self.ours_vs_fp32 is None or self.ref_vs_fp32 is None:
            return None
        if self.ref_vs_fp32 == 0:
            return 0.0 if self.ours_vs_fp32 == 0 else math.inf
        return self.ours_vs_fp32 / self.ref_vs_fp32

    @property
    def within_noise(self) -> bool:
        ratio = self.noise_ratio
        return self.noise_factor is not None and ratio is not None and ratio <= self.noise_factor

    @property
    def ok(self) -> bool:
        return self.within_limit or self.within_noise


@dataclass
class GreedyResult:
    """Greedy continuation of one input by both sides."""

    ours: list[int]
    reference: list[int]
    tie_tolerance: float  # a first difference whose reference margin is ≤ this is a near-tie
    margin: float | None = None  # reference logit(ref token) − logit(our token) at the first difference

    @property
    def agree(self) -> int:
        """How many leading tokens are identical."""
        n = 0
        for a, b in zip(self.ours, self.reference, strict=False):
            if a != b:
                break
            n += 1
        return n

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and self.margin <= self.tie_tolerance

    @property
    def ok(self) -> bool:
        return self.agree == len(self.reference) or self.near_tie


@dataclass
class ParityReport:
    """Everything `nekomata parity` prints; `.passed`, `.first_divergence`, `.to_table()`, `.to_dict()`."""

    model_dir: str
    reference: str
    reference_dir: str
    reference_label: str
    ours_label: str
    dtype: str
    device: str
    thresholds: Thresholds
    rows: list[StateRow]
    top1_agree: int
    top1_near_ties: int
    top1_total: int
    greedy: list[GreedyResult]
    inputs: list[list[int]]
    prompts: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def top1_rate(self) -> float:
        """Agreeing positions, near-ties counted as agreeing, over all positions."""
        return (self.top1_agree + self.top1_near_ties) / self.top1_total if self.top1_total else 1.0

    @property
    def top1_ok(self) -> bool:
        return self.top1_rate >= self.thresholds.min_top1

    @property
    def greedy_ok(self) -> bool:
        return all(g.ok for g in self.greedy)

    @property
    def first_divergence(self) -> str | None:
        """The first failing state in forward order, else the first failing check, else None."""
        for row in self.rows:
            if not row.ok:
                return row.name
        if not self.top1_ok:
            return "top-1 agreement"
        if not self.greedy_ok:
            return "greedy continuation"
        return None

    @property
    def greedy_compared(self) -> int:
        """Greedy tokens compared in all (0: the continuation was not checked at all)."""
        return sum(len(g.reference) for g in self.greedy)

    @property
    def passed(self) -> bool:
        """Everything agrees, and something of the greedy continuation was compared: a report that
        compared zero greedy tokens never passes (it checked nothing of decoding)."""
        return self.first_divergence is None and self.greedy_compared > 0

    @property
    def exit_code(self) -> int:
        """0 pass, 1 a divergence (conclusive even without greedy tokens), 2 nothing of the greedy
        continuation compared (no verdict)."""
        if self.first_divergence is not None:
            return EXIT_DIVERGENCE
        return EXIT_PASS if self.passed else EXIT_NOT_RUN

    def verdict(self) -> str:
        logits = self.rows[-1]
        greedy_agree = sum(g.agree for g in self.greedy)
        ties = f" (+{self.top1_near_ties} near-tie)" if self.top1_near_ties else ""
        summary = (
            f"logits rel err {logits.rel:.1e}, top-1 {self.top1_agree}/{self.top1_total}{ties}, "
            f"greedy {greedy_agree}/{self.greedy_compared} identical"
        )
        first = self.first_divergence
        if first is None and self.greedy_compared == 0:
            return (
                f"NOT RUN: no greedy tokens were compared, so decoding was not checked; {summary}. "
                "Give --max-new-tokens N ≥ 1 (and inputs shorter than max_position_embeddings)"
            )
        if first is None:
            by_noise = sum(not r.within_limit for r in self.rows)
            how = f"within rel {self.thresholds.rel:g}"
            if by_noise:
                how += f" ({by_noise} by the ≤ {self.thresholds.noise_factor:g}× fp32-noise rule)"
            return f"PASS: all {len(self.rows)} states {how}; {summary}"
        row = next((r for r in self.rows if r.name == first), None)
        if row is not None:
            measured = f"max |Δ| {row.max_abs:.2e}" if row.limit_kind == "abs" else f"rel err {row.rel:.2e}"
            detail = f"{measured} > limit {row.limit:g}"
            if row.noise_ratio is not None:
                detail += f", {row.noise_ratio:.2f}× the reference's fp32 noise > {row.noise_factor:g}×"
        elif first == "top-1 agreement":
            detail = f"{self.top1_rate:.3f} < {self.thresholds.min_top1:g}"
        else:
            bad = next(i for i, g in enumerate(self.greedy) if not g.ok)
            g = self.greedy[bad]
            detail = f"input {bad + 1} differs at new token {g.agree + 1} (reference margin {g.margin:.3g})"
        return f"FAIL: first divergence at {first} ({detail}); {summary}"

    def to_table(self) -> str:
        lines = [
            "nekomata parity",
            f"  ours       {self.ours_label}  {self.model_dir}",
            f"  reference  {self.reference_label}  {self.reference_dir}",
            f"  dtype      {self.dtype} on {self.device}",
            f"  inputs     {self._inputs_summary()}",
            "",
        ]
        baseline = any(row.noise_ratio is not None for row in self.rows)
        header = ("state", "max |Δ|", "mean |Δ|", "max |ref|", "rel err", "limit")
        header += ("vs fp32 noise", "") if baseline else ("",)
        table = [header]
        for row in self.rows:
            cells = (
                row.name,
                f"{row.max_abs:.3e}",
                f"{row.mean_abs:.3e}",
                f"{row.ref_max:.3e}",
                f"{row.rel:.3e}",
                f"{'abs ' if row.limit_kind == 'abs' else ''}{row.limit:g}",
            )
            if baseline:
                cells += (f"{row.noise_ratio:.2f}×" if row.noise_ratio is not None else "-",)
            if row.within_limit:
                result = "ok"
            elif row.ok:
                result = f"ok (≤ {row.noise_factor:g}× fp32 noise)"
            else:
                result = "DIVERGES"
            table.append(cells + (result,))
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
            lines.append("  ".join(cells + [r[-1]]).rstrip())
        lines.append("")
        ties = f", {self.top1_near_ties} near-tie(s) excused" if self.top1_near_ties else ""
        lines.append(
            f"top-1 agreement  {self.top1_agree}/{self.top1_total} positions{ties}  "
            f"(≥ {self.thresholds.min_top1:.2f} required)  {'ok' if self.top1_ok else 'FAILS'}"
        )
        for i, g in enumerate(self.greedy):
            label = "greedy" if i == 0 else ""
            if g.agree == len(g.reference):
                state = "ok"
            elif g.near_tie:
                state = f"ok (near-tie at token {g.agree + 1}: reference margin {g.margin:.3g})"
            else:
                state = f"FAILS (reference margin {g.margin:.3g} at token {g.agree + 1})"
            lines.append(
                f"{label:<16} input {i + 1}: {g.agree}/{len(g.reference)} identical leading tokens  {state}"
            )
        if baseline:
            lines.append(
                "vs fp32 noise = max |ours − ref fp32| / max |ref − ref fp32|: our rounding error over the "
                "reference's own"
            )
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"verdict: {self.verdict()}")
        return "\n".join(lines)

    def _inputs_summary(self) -> str:
        tokens = sum(len(ids) for ids in self.inputs)
        kind = f"{len(self.prompts)} prompt(s)" if self.prompts else f"{len(self.inputs)} random sequence(s)"
        new = max((len(g.reference) for g in self.greedy), default=0)
        return f"{kind}, {tokens} tokens; greedy continuation of {new} token(s) each"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "reference": self.reference,
            "reference_dir": self.reference_dir,
            "reference_label": self.reference_label,
            "ours_label": self.ours_label,
            "dtype": self.dtype,
            "device": self.device,
            "thresholds": {
                "rel": self.thresholds.rel,
                "min_top1": self.thresholds.min_top1,
                "atol_logits": self.thresholds.atol_logits,
                "noise_factor": self.thresholds.noise_factor,
            },
            "rows": [
                {
                    "name": r.name,
                    "max_abs": r.max_abs,
                    "mean_abs": r.mean_abs,
                    "ref_max": r.ref_max,
                    "rel": r.rel,
                    "limit": r.limit,
                    "limit_kind": r.limit_kind,
                    "ours_vs_fp32": r.ours_vs_fp32,
                    "ref_vs_fp32": r.ref_vs_fp32,
                    "noise_ratio": r.noise_ratio,
                    "ok": r.ok,
                }
                for r in self.rows
            ],
            "top1": {
                "agree": self.top1_agree,
                "near_ties": self.top1_near_ties,
                "total": self.top1_total,
                "rate": self.top1_rate,
                "ok": self.top1_ok,
            },
            "greedy": [
                {
                    "ours": g.ours,
                    "reference": g.reference,
                    "agree": g.agree,
                    "margin": g.margin,
                    "near_tie": g.near_tie,
                    "ok": g.ok,
                }
                for g in self.greedy
            ],
            "inputs": self.inputs,
            "prompts": self.prompts,
            "notes": self.notes,
            "first_divergence": self.first_divergence,
            "passed": self.passed,
            "verdict": self.verdict(),
        }


# --------------------------------------------------------------------------------------------------
# References: anything with the transformers call shape, plus the modules whose outputs we record
# --------------------------------------------------------------------------------------------------
class _Reference:
    """A transformers causal LM and where its embedding, blocks and final norm live."""

    def __init__(
        self,
        model: torch.nn.Module,
        embed,
        blocks: Sequence[torch.nn.Module],
        norm,
        label: str,
        *,
        prepare: Callable[[int], None] | None = None,
        cached_greedy: bool = False,
    ):
        self.model, self.embed, self.blocks, self.norm, self.label = model, embed, list(blocks), norm, label
        # prepare(prompt_length): fix what Qwen v1 derives from the prefill (the NTK alpha) before an
        # input and its continuation are run. cached_greedy: continue with the reference's own KV cache
        # (the remote code freezes alpha at prefill only when it decodes through its cache).
        self._prepare, self.cached_greedy = prepare, cached_greedy

    def prepare(self, prompt_length: int) -> None:
        if self._prepare is not None:
            self._prepare(prompt_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def states(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[embeddings, block 0 … L-1 outputs, final norm] and the logits, for ids [1, T].

        Recorded by forward hooks rather than read from `hidden_states`, because transformers returns
        the last block's output only after the final norm, while we compare both.
        """
        recorded: dict[int, torch.Tensor] = {}
        modules = [self.embed, *self.blocks, self.norm]

        def hook_for(index: int):
            def hook(module, args, output):
                recorded[index] = output[0] if isinstance(output, (tuple, list)) else output

            return hook

        handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
        try:
            logits = self.logits(ids)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in range(len(modules)) if i not in recorded]
        if missing:
            raise ParityError(
                f"the reference model never ran some of its modules ({missing}); cannot compare"
            )
        return [recorded[i] for i in range(len(modules))], logits

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def _state_dict_from_files(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read with the safetensors library (torch.load for .bin files).

    Only the file list comes from our loader; the bytes are decoded by independent code.
    """
    import torch
    from safetensors.torch import load_file

    from ..loader import checkpoint_weight_files

    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_weight_files(folder):
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _build_qwen2_reference(folder: Path, dtype: torch.dtype, device: torch.device) -> _Reference:
    import torch
    import transformers
    from transformers import Qwen2ForCausalLM

    from ..config import QwenConfig
    from .qwen2_reference import dtype_keyword, qwen2_config_from_qwen, qwen_to_qwen2_state_dict

    config = QwenConfig.from_json_file(folder / "config.json")
    if config.rotary_dim != config.head_dim:
        raise ParityError(
            f"the checkpoint rotates {config.rotary_dim} of {config.head_dim} head dims (rotary_pct "
            f"{config.rotary_pct}); transformers' Qwen2 rotates them all, so the qwen2 reference cannot "
            "stand for it: use --reference remote-code"
        )
    # Eager attention: the textbook formula with an fp32 softmax, the most independent of our kernels.
    hf_config = qwen2_config_from_qwen(config, attn_implementation="eager")
    try:
        from transformers.initialization import no_init_weights  # transformers ≥ 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights
    # No random init (a 7B model would spend minutes on it), built directly on the target device.
    # _from_config(dtype=...) keeps the RoPE inv_freq buffer in fp32, as from_pretrained does.
    with no_init_weights(), torch.device(device):
        model = Qwen2ForCausalLM._from_config(hf_config, **{dtype_keyword(): dtype})
    try:
        state = qwen_to_qwen2_state_dict(_state_dict_from_files(folder), config)
    except KeyError as exc:
        raise ParityError(
            f"the checkpoint in {str(folder)!r} has no tensor {exc}; cannot build the reference"
        ) from None
    model.load_state_dict(state, strict=True)
    del state
    inner = model.model
    label = f"transformers {transformers.__version__} Qwen2ForCausalLM (weights via nekomata_core.reference)"
    prepare = _qwen2_past_seq_length(model, config)
    return _Reference(model.eval(), inner.embed_tokens, inner.layers, inner.norm, label, prepare=prepare)


def _qwen2_past_seq_length(model: torch.nn.Module, config) -> Callable[[int], None]:
    """Teach Qwen2 what Qwen v1 does past seq_length S, from the formulas of `nekomata_core.reference`:
    logn scaling as a hook on every q_proj (queries at position p ≥ S times log(p+1)/log(S); before
    RoPE equals after it, RoPE being linear), and `prepare(prompt_length)` sets the RoPE frequencies of
    the NTK alpha of that prefill length. A cache-less forward over the prompt and any continuation
    then computes Qwen v1's prefill-then-decode: alpha frozen at prefill, logn by absolute position."""
    import torch

    from .qwen2_reference import formula_inv_freq, formula_logn, formula_ntk_alpha

    S = config.seq_length
    if config.use_logn_attn:

        def logn_hook(module, args, output):
            length = output.shape[-2]  # [B, T, N·D]; positions 0 … T−1 (no cache)
            if length <= S:
                return output
            factors = formula_logn(length, S).to(output.device, torch.float32)[:, None]  # [T, 1]
            return (output.float() * factors).to(output.dtype)

        for layer in model.model.layers:
            layer.self_attn.q_proj.register_forward_hook(logn_hook)

    # transformers 4.45 keeps a rotary module in every attention as well as the model's: set them all.
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]

    def prepare(prompt_length: int) -> None:
        alpha = formula_ntk_alpha(prompt_length, S) if config.use_dynamic_ntk else 1
        inv_freq = formula_inv_freq(float(config.rotary_emb_base), config.head_dim, alpha)
        for rotary in rotaries:
            rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype))

    return prepare


def _build_remote_code_reference(folder: Path, dtype: torch.dtype, device: torch.device) -> _Reference:
    import torch
    import transformers

    code = folder / "modeling_qwen.py"
    if not code.is_file():
        from ..hub import download_command  # the CLI of the installed huggingface_hub (hf or huggingface-cli)

        raise ParityError(
            f"{str(folder)!r} has no modeling_qwen.py, the original remote code that --reference remote-code "
            "runs. Download the repo's *.py files next to the weights (e.g. "
            f"`{download_command('rinna/nekomata-7b', include=repr('*.py'))} --local-dir DIR`) "
            "or use --reference qwen2."
        )
    flags = {
        name: name == {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        for name in ("bf16", "fp16", "fp32")
    }
    # transformers 5 renamed torch_dtype to dtype; the original code picks its precision from the
    # bf16/fp16/fp32 config flags, so those are set as well. use_flash_attn=False: plain attention.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), trust_remote_code=True, use_flash_attn=False, **{dtype_kw: dtype}, **flags
        )
        model = model.to(device).eval()
        body = model.transformer
        blocks, embed, norm = body.h, body.wte, body.ln_f
    except Exception as exc:  # the remote code can fail in any way; all of them mean "no reference"
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ReferenceFailed(
            f"transformers {transformers.__version__} could not load the remote code in {str(folder)!r} "
            f"({type(exc).__name__}: {first_line}). The original modeling_qwen.py was written for "
            "transformers 4.32–4.3x: run the remote-code reference in an environment with such a version, "
            "or use --reference qwen2."
        ) from None
    label = f"original remote code (modeling_qwen.py) on transformers {transformers.__version__}"
    return _Reference(model, embed, blocks, norm, label, cached_greedy=True)


# --------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------
class _Accumulator:
    """max |Δ|, token-weighted mean |Δ|, max |ref| and the worst per-input rel of one state, plus (with
    a float32 baseline) the largest errors of ours and of the reference against that baseline."""

    def __init__(self) -> None:
        self.max_abs = self.ref_max = self.rel = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.ours_vs_fp32: float | None = None
        self.ref_vs_fp32: float | None = None

    def add(self, ours: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None = None) -> None:
        ours, ref = ours.float(), ref.float().to(ours.device)
        diff = (ours - ref).abs()
        max_abs = _max(diff)
        ref_max = _max(ref.abs())
        self.max_abs = max(self.max_abs, max_abs)
        self.ref_max = max(self.ref_max, ref_max)
        rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
        self.rel = max(self.rel, rel)
        self.abs_sum += float(diff.double().sum())
        self.count += diff.numel()
        if baseline is not None:
            baseline = baseline.to(ours.device)
            self.ours_vs_fp32 = max(self.ours_vs_fp32 or 0.0, _max((ours - baseline).abs()))
            self.ref_vs_fp32 = max(self.ref_vs_fp32 or 0.0, _max((ref - baseline).abs()))

    def row(self, name: str, limit: float, kind: str, noise_factor: float | None) -> StateRow:
        mean = self.abs_sum / self.count if self.count else 0.0
        return StateRow(
            name, self.max_abs, mean, self.ref_max, self.rel, limit, kind,
            self.ours_vs_fp32, self.ref_vs_fp32, noise_factor if self.ours_vs_fp32 is not None else None,
        )  # fmt: skip


def _max(t: torch.Tensor) -> float:
    """max of a tensor, where any NaN makes it inf (so that a NaN can never pass a bound)."""
    value = float(t.max())
    return value if math.isfinite(value) else math.inf


def _logits_tolerance(thresholds: Thresholds, ref_logits: torch.Tensor) -> float:
    """The absolute error each side's logits may carry: atol, or rel × max |ref logit|."""
    if thresholds.atol_logits is not None:
        return thresholds.atol_logits
    return thresholds.rel * float(ref_logits.float().abs().max())


def _ref_greedy(
    reference: _Reference, ids: torch.Tensor, steps: int, seq_length: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's fp32 logits [V]: by one full forward per step (no KV cache, so our
    cache is checked too; the alpha is the prefill's, fixed by `reference.prepare`), or, for the remote
    code once the total passes seq_length, through its own KV cache (where it freezes alpha at prefill
    as Qwen v1 does; a cache-less forward would re-choose alpha from the whole length)."""
    import torch

    tokens: list[int] = []
    step_logits: list[torch.Tensor] = []
    if reference.cached_greedy and ids.shape[1] + steps > seq_length:
        out = reference.model(input_ids=ids, use_cache=True)
        for _ in range(steps):
            logits = out.logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            step_logits.append(logits)
            nxt = torch.tensor([[token]], device=ids.device)
            out = reference.model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        return tokens, step_logits
    seq = ids
    for _ in range(steps):
        logits = reference.logits(seq)[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        step_logits.append(logits)
        seq = torch.cat([seq, torch.tensor([[token]], device=seq.device)], dim=1)
    return tokens, step_logits


def _reference_step(fn: Callable[[], Any], what: str, dtype: torch.dtype, device: torch.device) -> Any:
    """Run a reference step; any failure of the reference itself (not a ParityError we raise on
    purpose) becomes ReferenceFailed: the comparison could not run, which is not a divergence."""
    try:
        return _run(fn, dtype, device, what)
    except ParityError:
        raise
    except Exception as exc:
        import transformers

        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ReferenceFailed(
            f"could not run the reference ({what}) with transformers {transformers.__version__}: "
            f"{type(exc).__name__}: {first_line}. No verdict: fix the reference environment "
            "(transformers ≥ 4.45 for --reference qwen2) or try the other --reference"
        ) from exc


def _run(fn: Callable[[], Any], dtype: torch.dtype, device: torch.device, what: str) -> Any:
    """Turn "this dtype is not implemented on this device" into one ParityError naming the way out."""
    import torch

    try:
        return fn()
    except (RuntimeError, NotImplementedError) as exc:
        message = str(exc)
        if (
            dtype == torch.float16
            and device.type == "cpu"
            and ("Half" in message or "not implemented" in message)
        ):
            raise ParityError(
                f"{what} failed in float16 on the CPU ({message.splitlines()[0]}); this PyTorch build "
                "does not support that op in fp16 on CPU: use --dtype bfloat16 or float32, or a CUDA device"
            ) from None
        raise


def _ours_label(model) -> str:
    from ..accelerate import describe

    running = describe(model)
    return f"nekomata_core QwenForCausalLM (attention {running['attention']}, ops {running['ops']})"


def parity_report(
    model_dir: str | os.PathLike[str],
    *,
    reference: str = "qwen2",
    reference_dir: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    prompts: Sequence[str] | None = None,
    random_tokens: int | None = None,
    seed: int = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    thresholds: Thresholds | None = None,
    atol_logits: float | None = None,
    fp32_baseline: bool = True,
    attention_backend: str = "auto",
    ops_backend: str = "auto",
    model: QwenForCausalLM | None = None,
) -> ParityReport:
    """Compare nekomata_core with a reference on the same inputs; see the module docstring.

    Inputs, in order of precedence: `input_ids` (one sequence per row/list), `prompts` (encoded with the
    checkpoint's qwen.tiktoken), `random_tokens` N (one seeded random sequence), else the default prompts
    if the checkpoint has a tokenizer and the full vocabulary, else 32 random tokens. `model` is an
    already-loaded QwenForCausalLM to test instead of loading one from `model_dir` (its dtype and device
    are used).
    `thresholds` defaults by dtype (`DEFAULT_THRESHOLDS`); `atol_logits` overrides its logits bound.
    `fp32_baseline=False` skips the float32 reference of bf16/fp16 runs (fixed bounds only).
    Raises ParityError when the comparison cannot be run as asked.
    """
    import torch

    from ..hub import CHECKPOINT_PATTERNS, resolve_model_dir
    from ..pretrained import QwenForCausalLM, resolve_device, resolve_dtype

    if reference not in REFERENCES:
        raise ParityError(f"reference={reference!r}; choose one of {list(REFERENCES)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ParityError(f"max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}")
    # The remote-code reference needs the repo's *.py files, which resolve_model_dir skips by default.
    patterns = CHECKPOINT_PATTERNS + (("*.py",) if reference == "remote-code" else ())
    folder = resolve_model_dir(model_dir, allow_patterns=patterns)
    ref_folder = (
        folder if reference_dir is None else resolve_model_dir(reference_dir, allow_patterns=patterns)
    )

    notes: list[str] = []
    if model is None:
        from ..config import QwenConfig

        config = QwenConfig.from_json_file(folder / "config.json")
    else:
        config = model.config
    # Inputs and their length are checked before any model is loaded (a 7B load takes minutes).
    sequences, used_prompts = _make_inputs(folder, config.vocab_size, input_ids, prompts, random_tokens, seed)
    longest = max(len(s) for s in sequences)
    limit = config.max_position_embeddings
    if longest > limit:
        # Qwen v1's logn table (and our generation) stops at max_position_embeddings.
        raise ParityError(
            f"an input has {longest} tokens, more than max_position_embeddings {limit} of "
            f"{str(folder / 'config.json')!r}; use shorter inputs"
        )

    if model is None:
        target_device = resolve_device(device)
        model = QwenForCausalLM.from_pretrained(
            folder,
            dtype=resolve_dtype(dtype, config, target_device),
            device=target_device,
            attention_backend=attention_backend,
            ops_backend=ops_backend,
            progress=False,
        )
    target_dtype, target_device = model.dtype, model.device
    dtype_name = str(target_dtype).removeprefix("torch.")
    if dtype_name not in DTYPE_NAMES:
        raise ParityError(f"the model is in {dtype_name}; parity runs in one of {list(DTYPE_NAMES)}")
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLDS[dtype_name]
    if atol_logits is not None:
        thresholds = dataclasses.replace(thresholds, atol_logits=atol_logits)

    room = limit - longest
    if max_new_tokens > room:
        notes.append(
            f"greedy continuation shortened from {max_new_tokens} to {room} tokens to stay within "
            f"max_position_embeddings {limit}"
        )
        max_new_tokens = room
    if longest + max_new_tokens > config.seq_length:
        # Where ports go wrong: past S, Qwen v1 keeps the NTK alpha of the prefill while decoding.
        notes.append(
            f"past seq_length {config.seq_length}: the reference uses the NTK alpha of each prompt's "
            "length (frozen at prefill) and logn-scaled queries"
        )

    if reference == "remote-code":
        notes.append(f"the reference executed the Python code shipped in {str(ref_folder)!r}")
        build_reference = _build_remote_code_reference
    else:
        build_reference = _build_qwen2_reference
    n_layers = config.num_hidden_layers
    names = ["embeddings", *(f"block {i}" for i in range(n_layers)), "final norm"]
    inputs = [torch.tensor([seq], dtype=torch.long, device=target_device) for seq in sequences]

    # bf16/fp16: first the reference in float32, the "exact" answer both low-precision runs are
    # measured against. It is freed before the low-precision reference is built, so at most two
    # models share the memory.
    baselines: list[tuple[list[torch.Tensor], torch.Tensor]] | None = None
    if fp32_baseline and target_dtype != torch.float32 and thresholds.noise_factor is not None:
        exact = _reference_step(
            lambda: build_reference(ref_folder, torch.float32, target_device),
            "building it in float32", torch.float32, target_device,
        )  # fmt: skip
        _check_blocks(exact, n_layers)
        baselines = []
        with torch.inference_mode():
            for ids in inputs:

                def exact_states(ids=ids):
                    exact.prepare(ids.shape[1])
                    return _to_cpu(exact.states(ids.to(exact.device)))

                baselines.append(
                    _reference_step(exact_states, "its float32 forward", torch.float32, target_device)
                )
        del exact
        _free_memory(target_device)

    ref = _reference_step(
        lambda: build_reference(ref_folder, target_dtype, target_device),
        "building it",
        target_dtype,
        target_device,
    )
    _check_blocks(ref, n_layers)
    accumulators = [_Accumulator() for _ in names]
    logits_acc = _Accumulator()
    top1_agree = top1_ties = top1_total = 0
    greedy: list[GreedyResult] = []
    from ..generation import generate

    with torch.inference_mode():
        for index, ids in enumerate(inputs):

            def ours_forward(ids=ids):
                logits, hidden = model(ids, output_hidden_states=True)
                # Our last hidden state is the last block's output before ln_f; add the norm output.
                return [*hidden, model.transformer.ln_f(hidden[-1])], logits

            our_states, our_logits = _run(
                ours_forward, target_dtype, target_device, "nekomata_core's forward"
            )
            ref.prepare(ids.shape[1])  # the NTK alpha of this prompt's length, kept for its continuation
            ref_states, ref_logits = _reference_step(
                lambda ids=ids: ref.states(ids.to(ref.device)), "its forward", target_dtype, target_device
            )
            base_states, base_logits = baselines[index] if baselines else ([None] * len(names), None)
            for acc, a, b, c in zip(accumulators, our_states, ref_states, base_states, strict=True):
                acc.add(a, b, c)
            logits_acc.add(our_logits, ref_logits, base_logits)

            # Top-1 per position; a disagreement within twice the logits tolerance is a near-tie.
            ours32, ref32 = our_logits[0].float(), ref_logits[0].float().to(target_device)
            tie_tol = 2 * _logits_tolerance(thresholds, ref32)
            our_top, ref_top = ours32.argmax(-1), ref32.argmax(-1)
            differ = our_top != ref_top
            margins = ref32.gather(-1, ref_top[:, None]) - ref32.gather(-1, our_top[:, None])
            top1_total += ids.shape[1]
            top1_agree += int((~differ).sum())
            top1_ties += int((differ & (margins[:, 0] <= tie_tol)).sum())

            if max_new_tokens:
                # eos_token_id=(): exactly max_new_tokens tokens, as the reference produces.
                ours_new = _run(
                    lambda ids=ids: generate(
                        model, ids, max_new_tokens=max_new_tokens, eos_token_id=()
                    ).new_tokens[0],
                    target_dtype,
                    target_device,
                    "nekomata_core's generate",
                )
                ref_new, ref_step_logits = _reference_step(
                    lambda ids=ids: _ref_greedy(ref, ids.to(ref.device), max_new_tokens, config.seq_length),
                    "its greedy continuation",
                    target_dtype,
                    target_device,
                )
                result = GreedyResult(list(ours_new), ref_new, tie_tolerance=0.0)
                k = result.agree
                if k < len(ref_new):
                    step = ref_step_logits[k]
                    result.tie_tolerance = 2 * _logits_tolerance(thresholds, step)
                    result.margin = float(step[ref_new[k]] - step[ours_new[k]])
                greedy.append(result)

    factor = thresholds.noise_factor
    rows = [
        acc.row(name, thresholds.rel, "rel", factor) for acc, name in zip(accumulators, names, strict=True)
    ]
    if thresholds.atol_logits is not None:
        rows.append(logits_acc.row("logits", thresholds.atol_logits, "abs", factor))
    else:
        rows.append(logits_acc.row("logits", thresholds.rel, "rel", factor))
    return ParityReport(
        model_dir=str(folder),
        reference=reference,
        reference_dir=str(ref_folder),
        reference_label=ref.label,
        ours_label=_ours_label(model),
        dtype=dtype_name,
        device=str(target_device),
        thresholds=thresholds,
        rows=rows,
        top1_agree=top1_agree,
        top1_near_ties=top1_ties,
        top1_total=top1_total,
        greedy=greedy,
        inputs=[list(s) for s in sequences],
        prompts=used_prompts,
        notes=notes,
    )


def _check_blocks(ref: _Reference, n_layers: int) -> None:
    if len(ref.blocks) != n_layers:
        raise ParityError(f"the reference has {len(ref.blocks)} blocks but the checkpoint {n_layers}")


def _to_cpu(result: tuple[list[torch.Tensor], torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    states, logits = result
    return [s.float().cpu() for s in states], logits.float().cpu()


def _free_memory(device: torch.device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _make_inputs(
    folder: Path,
    vocab_size: int,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    prompts: Sequence[str] | None,
    random_tokens: int | None,
    seed: int,
) -> tuple[list[list[int]], list[str] | None]:
    import torch

    if input_ids is not None:
        rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [list(r) for r in input_ids]
        if rows and isinstance(rows[0], int):  # a single 1-D sequence
            rows = [rows]
        if not rows or any(len(r) == 0 for r in rows):
            raise ParityError("input_ids must hold at least one non-empty sequence")
        _check_ids(rows, vocab_size, "input_ids")
        return [[int(t) for t in r] for r in rows], None

    from ..tokenizer import NUM_MERGEABLE_RANKS

    has_tokenizer = (folder / "qwen.tiktoken").is_file()
    # Default prompts only where they can be embedded: test checkpoints often cut the vocabulary.
    default_prompts = random_tokens is None and has_tokenizer and vocab_size >= NUM_MERGEABLE_RANKS
    if prompts is not None or default_prompts:
        prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        if not has_tokenizer:
            raise ParityError(
                f"{str(folder)!r} has no qwen.tiktoken to encode the prompts; use --random-tokens N instead"
            )
        from ..tokenizer import QwenTokenizer

        tokenizer = QwenTokenizer(folder / "qwen.tiktoken")
        rows = [tokenizer.encode(p) for p in prompts]
        if any(len(r) == 0 for r in rows):
            raise ParityError("a prompt encodes to no tokens; give non-empty prompts")
        _check_ids(rows, vocab_size, "a prompt")
        return rows, prompts

    n = DEFAULT_RANDOM_TOKENS if random_tokens is None else random_tokens
    if not isinstance(n, int) or n <= 0:
        raise ParityError(f"random_tokens must be a positive integer, got {n!r}")

    # Ordinary token ids only: the rows past the vocabulary are untrained in real checkpoints.
    high = min(vocab_size, NUM_MERGEABLE_RANKS)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (n,), generator=generator).tolist()], None


def _check_ids(rows: list[list[int]], vocab_size: int, what: str) -> None:
    bad = [t for r in rows for t in r if not 0 <= int(t) < vocab_size]
    if bad:
        raise ParityError(
            f"{what} holds token id {bad[0]}, outside this checkpoint's vocabulary [0, {vocab_size}); "
            "use --random-tokens N for checkpoints with a reduced vocabulary"
        )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def add_parity_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "parity",
        help="compare nekomata_core with a reference implementation, layer by layer",
        description=(
            "Run the same tokens through nekomata_core and a reference (transformers' Qwen2ForCausalLM with "
            "the mapped weights, or the checkpoint's original remote code) and report the difference of "
            "every hidden state, the logits, top-1 agreement and greedy continuations. Exit 0 when "
            "everything is within the thresholds."
        ),
        epilog=(
            "exit status: 0 PASS (every state, top-1 and at least one greedy token compared, all within "
            "the thresholds); 1 FAIL, a divergence beyond the thresholds (the first diverging layer is "
            "named); 2 no verdict: a usage error, a reference that could not be built or run, or nothing "
            "of the greedy continuation compared (e.g. --max-new-tokens 0)."
        ),
    )
    parser.add_argument("model", help="checkpoint directory or Hub repo id")
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        default="qwen2",
        help="qwen2 (default): transformers' Qwen2ForCausalLM with mapped weights; remote-code: "
        "the checkpoint's own modeling_qwen.py (EXECUTES that code)",
    )
    parser.add_argument(
        "--reference-dir",
        default=None,
        metavar="DIR",
        help="load the reference's weights from this checkpoint instead of MODEL",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="both sides' dtype (default float32)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="a prompt to compare on (repeatable; needs the checkpoint's qwen.tiktoken)",
    )
    parser.add_argument(
        "--random-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"use N seeded random token ids instead of prompts (the default without a "
        f"tokenizer, N={DEFAULT_RANDOM_TOKENS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-tokens (default 0)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"greedy tokens to generate with each side (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        metavar="X",
        help="relative bound on every state and the logits (default by dtype: fp32 1e-5, "
        "bf16 2e-2, fp16 5e-3)",
    )
    parser.add_argument(
        "--atol-logits",
        type=float,
        default=None,
        metavar="X",
        help="absolute bound on the logits' max |Δ| (replaces the relative one for the logits)",
    )
    parser.add_argument(
        "--min-top1",
        type=float,
        default=None,
        metavar="F",
        help="required top-1 agreement (default by dtype: fp32 1.0, bf16/fp16 0.98)",
    )
    parser.add_argument(
        "--no-fp32-baseline",
        dest="fp32_baseline",
        action="store_false",
        help="bf16/fp16: skip the float32 reference (less memory; the verdict uses the fixed bounds only)",
    )
    parser.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_CHOICES), help="ours")
    parser.add_argument("--ops-backend", default="auto", choices=list(OPS_CHOICES), help="ours")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_parity)


def run_parity(args: argparse.Namespace) -> int:
    from .common import EXIT_USAGE, CLIError

    for name in ("random_tokens", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "random_tokens" else 0):
            raise CLIError(
                f"--{name.replace('_', '-')} must be {'positive' if name == 'random_tokens' else '≥ 0'}"
            )
    for name in ("rtol", "atol_logits"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise CLIError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {value}")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 1:
        raise CLIError(f"--min-top1 must be between 0 and 1, got {args.min_top1}")
    if args.prompt is not None and args.random_tokens is not None:
        raise CLIError("give either --prompt or --random-tokens, not both")
    thresholds = None
    if args.rtol is not None or args.min_top1 is not None:
        base = DEFAULT_THRESHOLDS[args.dtype]
        thresholds = dataclasses.replace(
            base,
            rel=args.rtol if args.rtol is not None else base.rel,
            min_top1=args.min_top1 if args.min_top1 is not None else base.min_top1,
        )
    if args.reference == "remote-code":
        print(
            "warning: --reference remote-code executes the Python code shipped with the checkpoint "
            "(modeling_qwen.py); use it only with checkpoints you trust",
            file=sys.stderr,
        )
    from ..inputs import InputError

    try:
        report = parity_report(
            args.model,
            reference=args.reference,
            reference_dir=args.reference_dir,
            dtype=args.dtype,
            device=args.device,
            prompts=args.prompt,
            random_tokens=args.random_tokens,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            thresholds=thresholds,
            atol_logits=args.atol_logits,
            fp32_baseline=args.fp32_baseline,
            attention_backend=args.attention_backend,
            ops_backend=args.ops_backend,
        )
    except (ParityError, InputError, FileNotFoundError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    except ValueError as exc:  # bad --device / backend names, from the loader's checks
        if type(exc) is not ValueError:
            raise
        raise CLIError(str(exc), EXIT_USAGE) from None
    if args.json:
        print(json.dumps(_json_safe(report.to_dict()), indent=2, ensure_ascii=False))
    else:
        print(report.to_table())
    if not report.passed:
        print(f"nekomata parity: {report.verdict()}", file=sys.stderr)
    return report.exit_code


def _json_safe(value: Any) -> Any:
    """inf/NaN (a NaN-producing model, a zero reference) as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
