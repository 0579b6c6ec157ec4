"""The parity report: passes on a faithful checkpoint, names the first diverging layer of a perturbed one.

A perturbed copy of a checkpoint (one weight scaled) is compared with the reference built from the
original: everything before the perturbed layer must agree, the layer itself must be reported as the
first divergence, and the command must exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nekomata_core.accelerate import make_step
from nekomata_core.apps.cli import main as cli_main
from nekomata_core.apps.parity import (
    DEFAULT_THRESHOLDS,
    ParityError,
    add_parity_parser,
    parity_report,
)


def main(argv: list[str]) -> int:
    """`nekomata parity ARGV`, as tools/parity.py runs it."""
    return cli_main(argv, command="parity")


OVERRIDES = dict(vocab_size=512, num_hidden_layers=3)  # tiny: seq_length 64


@pytest.fixture(scope="module")
def folder(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny", seed=21, **OVERRIDES)


def perturbed_copy(folder: Path, dest: Path, name: str, scale: float) -> Path:
    """A copy of the checkpoint with the tensor `name` scaled, written back as safetensors."""
    shutil.copytree(folder, dest)
    path = dest / "model.safetensors"
    state = load_file(path)
    state[name] = state[name] * scale
    save_file(state, path, metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def perturbed(folder, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("perturbed") / "ckpt"
    return perturbed_copy(folder, dest, "transformer.h.1.mlp.w1.weight", 1.01)


def test_fp32_parity_passes_with_every_state_within_1e_5(folder):
    report = parity_report(folder, random_tokens=24, max_new_tokens=6)
    names = [row.name for row in report.rows]
    assert names == ["embeddings", "block 0", "block 1", "block 2", "final norm", "logits"]
    for row in report.rows:
        assert row.rel <= 1e-5 and row.max_abs <= 1e-5 * row.ref_max, row
        assert row.noise_ratio is None  # fp32 needs no float32 baseline
    assert report.rows[0].max_abs == 0.0  # an embedding lookup is exact
    assert report.top1_agree == report.top1_total == 24
    assert [g.agree for g in report.greedy] == [6]
    assert report.passed and report.first_divergence is None and report.exit_code == 0
    table = report.to_table()
    assert "verdict: PASS" in table and "block 2" in table
    json.dumps(report.to_dict())  # plain JSON-able data


def test_perturbed_weight_is_reported_at_its_block(perturbed, folder):
    report = parity_report(perturbed, reference_dir=folder, random_tokens=24, max_new_tokens=4)
    assert report.first_divergence == "block 1"
    ok = {row.name: row.ok for row in report.rows}
    assert ok["embeddings"] and ok["block 0"] and not ok["block 1"]
    assert not report.passed and report.exit_code == 1
    assert "FAIL: first divergence at block 1" in report.verdict()


def test_cli_exits_1_and_names_the_first_diverging_layer(perturbed, folder, capsys):
    code = main([str(perturbed), "--reference-dir", str(folder), "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "block 1" in captured.out and "DIVERGES" in captured.out
    assert "first divergence at block 1" in captured.err


def test_cli_exits_0_and_prints_json(folder, capsys):
    assert main([str(folder), "--random-tokens", "16", "--max-new-tokens", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["first_divergence"] is None
    assert data["dtype"] == "float32" and len(data["rows"]) == 6 and data["top1"]["total"] == 16


def test_bf16_runs_and_passes_its_looser_thresholds(folder):
    report = parity_report(folder, dtype="bfloat16", random_tokens=24, max_new_tokens=4)
    assert report.dtype == "bfloat16"
    assert report.thresholds == DEFAULT_THRESHOLDS["bfloat16"]
    assert report.passed, report.to_table()
    # The float32 baseline was measured: our rounding error is about the reference's own.
    for row in report.rows:
        assert row.noise_ratio is not None and row.noise_ratio <= 2.0, row


def test_bf16_still_finds_a_real_divergence(folder, tmp_path):
    broken = perturbed_copy(folder, tmp_path / "ckpt", "transformer.h.1.mlp.w1.weight", 3.0)
    report = parity_report(broken, reference_dir=folder, dtype="bfloat16", random_tokens=24, max_new_tokens=0)
    assert report.first_divergence == "block 1", report.to_table()
    assert report.rows[2].noise_ratio > 2.0


def test_fp16_without_the_fp32_baseline_uses_the_fixed_bounds(folder):
    report = parity_report(folder, dtype="float16", random_tokens=16, max_new_tokens=2, fp32_baseline=False)
    assert all(row.noise_ratio is None for row in report.rows)
    assert report.passed, report.to_table()


def test_prompts_are_encoded_with_the_checkpoint_tokenizer(checkpoint_factory):
    from nekomata_core.tokenizer import QwenTokenizer

    folder = checkpoint_factory("tiny", with_tokenizer=True, seed=4)  # shared with test_generate
    prompts = ["吾輩は猫である。", "Hello, world"]
    report = parity_report(folder, prompts=prompts, max_new_tokens=2)
    tokenizer = QwenTokenizer.from_pretrained(folder)
    assert report.inputs == [tokenizer.encode(p) for p in prompts]
    assert report.passed, report.to_table()
    assert "2 prompt(s)" in report.to_table()


def test_greedy_is_compared_past_seq_length_with_the_prefill_alpha(folder):
    """Prompts that end just below and just above S, continued well past S (alpha 1 and 3 frozen)."""
    ids = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(0))
    report = parity_report(folder, input_ids=ids, max_new_tokens=10)
    assert report.inputs == ids.tolist()
    assert [len(g.reference) for g in report.greedy] == [10, 10]  # 60 + 10 > seq_length 64
    assert report.greedy_compared == 20 and "greedy 20/20" in report.verdict()
    assert any("frozen at prefill" in note for note in report.notes)
    assert report.passed, report.to_table()
    longer = parity_report(folder, input_ids=[list(range(70))], max_new_tokens=6)  # prompt itself > S
    assert longer.passed and longer.greedy_compared == 6, longer.to_table()


def test_a_port_that_rechooses_alpha_while_decoding_fails_past_seq_length(folder, monkeypatch):
    """The bug this check exists for: alpha re-picked from the growing length at every decode step."""
    from nekomata_core import QwenForCausalLM
    from nekomata_core import model as architecture

    real = architecture.step_inputs

    def rechoose(config, cache, key_mask, start, length, dtype, device):
        if cache is not None:
            cache.ntk_alpha = None  # forget the prefill's alpha: chosen again from `total`
        return real(config, cache, key_mask, start, length, dtype, device)

    monkeypatch.setattr(architecture, "step_inputs", rechoose)
    # The plain forward for every step, so that each step goes through `step_inputs`.
    monkeypatch.setattr("nekomata_core.generation._default_step", lambda model: make_step(model, "eager"))
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    report = parity_report(folder, model=model, input_ids=[list(range(40, 100))], max_new_tokens=24)
    assert report.first_divergence == "greedy continuation", report.to_table()
    assert report.exit_code == 1


def test_zero_greedy_tokens_compared_is_never_a_pass(folder, capsys):
    report = parity_report(folder, random_tokens=8, max_new_tokens=0)
    assert report.first_divergence is None and not report.passed and report.exit_code == 2
    assert report.verdict().startswith("NOT RUN") and "PASS" not in report.to_table()
    assert main([str(folder), "--random-tokens", "8", "--max-new-tokens", "0"]) == 2
    assert "NOT RUN: no greedy tokens were compared" in capsys.readouterr().err


def test_a_reference_that_cannot_run_exits_2_not_1(folder, monkeypatch, capsys):
    import transformers

    def broken(*args, **kwargs):
        raise TypeError("Qwen2ForCausalLM.__init__() got an unexpected keyword argument 'dtype'")

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "_from_config", broken)
    with pytest.raises(ParityError, match=r"could not run the reference \(building it\).*No verdict"):
        parity_report(folder, random_tokens=8, max_new_tokens=1)
    assert main([str(folder), "--random-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "could not run the reference" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "version,keyword",
    [("4.45.2", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.2.0", "dtype")],
)
def test_the_dtype_keyword_follows_the_transformers_version(monkeypatch, version, keyword):
    import transformers

    from nekomata_core.apps.qwen2_reference import dtype_keyword

    monkeypatch.setattr(transformers, "__version__", version)
    assert dtype_keyword() == keyword


def test_inputs_longer_than_max_position_embeddings_are_refused(folder):
    with pytest.raises(ParityError, match="max_position_embeddings"):
        parity_report(folder, input_ids=[[1] * 100_000])


def test_prompts_without_a_tokenizer_are_refused(folder):
    with pytest.raises(ParityError, match="no qwen.tiktoken"):
        parity_report(folder, prompts=["hello"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--random-tokens", "0"], "--random-tokens must be positive"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be ≥ 0"),
        (["--prompt", "hi", "--random-tokens", "3"], "either --prompt or --random-tokens"),
        (["--min-top1", "2"], "--min-top1 must be between 0 and 1"),
        (["--prompt", "hello"], "no qwen.tiktoken"),
        (["--device", "tpu"], "device"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(folder, capsys, extra, message):
    assert main([str(folder), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nekomata parity: error:") and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- remote code
def test_remote_code_needs_modeling_qwen_py(folder, capsys):
    assert main([str(folder), "--reference", "remote-code"]) == 2
    err = capsys.readouterr().err
    assert "executes the Python code" in err  # the warning comes first
    assert "has no modeling_qwen.py" in err and "Traceback" not in err


def test_remote_code_that_transformers_cannot_load_is_a_clear_error(folder, tmp_path, capsys):
    broken = tmp_path / f"remote{uuid.uuid4().hex[:8]}"
    shutil.copytree(folder, broken)
    (broken / "modeling_qwen.py").write_text("raise ImportError('this remote code is broken')\n")
    (broken / "configuration_qwen.py").write_text(CONFIGURATION_QWEN)
    assert main([str(broken), "--reference", "remote-code"]) == 2
    err = capsys.readouterr().err
    assert "could not load the remote code" in err and "this remote code is broken" in err
    assert "--reference qwen2" in err and "Traceback" not in err


# A stand-in for the original remote code: nekomata_core's modules behind transformers' API, with the
# original attribute names (transformer.wte / .h / .ln_f). It checks the remote-code path (loading with
# trust_remote_code, the dtype flags, the hooks), not the original model.
CONFIGURATION_QWEN = """
from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
"""
MODELING_QWEN = """
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nekomata_core.config import QwenConfig
from nekomata_core import QwenForCausalLM

from .configuration_qwen import QWenConfig



class QWenLMHeadModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        known = QwenConfig.__dataclass_fields__
        settings = {k: v for k, v in config.to_dict().items() if k in known}
        inner = QwenForCausalLM(QwenConfig.from_dict(settings))
        self.transformer, self.lm_head = inner.transformer, inner.lm_head
        self._inner = [inner]
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, use_cache=False, **kwargs):
        return CausalLMOutputWithPast(logits=self._inner[0](input_ids))
"""


def test_remote_code_reference_runs_through_trust_remote_code(folder, tmp_path):
    remote = tmp_path / f"remote{uuid.uuid4().hex[:8]}"
    shutil.copytree(folder, remote)
    (remote / "configuration_qwen.py").write_text(CONFIGURATION_QWEN)
    (remote / "modeling_qwen.py").write_text(MODELING_QWEN)
    report = parity_report(remote, reference="remote-code", random_tokens=12, max_new_tokens=2)
    assert "remote code" in report.reference_label
    assert report.passed and all(row.max_abs == 0.0 for row in report.rows)
    assert any("executed the Python code" in note for note in report.notes)


# ---------------------------------------------------------------------------------------------- plumbing
def test_parser_plugs_into_a_subcommand_registry(folder, capsys):
    parser = argparse.ArgumentParser(prog="nekomata")
    add_parity_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["parity", str(folder), "--random-tokens", "8", "--max-new-tokens", "1"])
    assert args.run(args) == 0
    assert "verdict: PASS" in capsys.readouterr().out


def test_tools_script_answers_usage_errors_without_loading_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "tools/parity.py", str(tmp_path), "--random-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "nekomata parity: error: --random-tokens must be positive"
