"""The sampling pipeline against transformers' own logits processors, and argument validation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nekomata_core.sampling import (
    SamplingError,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    load_generation_config,
    mask_eos,
    process_logits,
    select_next,
)


@pytest.fixture
def scores():
    return torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def seen():
    return torch.randint(0, 97, (4, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3])
def test_repetition_penalty_equals_hf(scores, seen, penalty):
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores, seen, penalty), expected)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_equals_hf(scores, seen, temperature):
    assert torch.equal(
        apply_temperature(scores, temperature), TemperatureLogitsWarper(temperature)(seen, scores)
    )


@pytest.mark.parametrize("top_k", [1, 5, 96, 97, 500])
def test_top_k_equals_hf(scores, seen, top_k):
    assert torch.equal(apply_top_k(scores, top_k), TopKLogitsWarper(top_k)(seen, scores.clone()))


def test_top_k_zero_is_off(scores):
    assert torch.equal(apply_top_k(scores, 0), scores)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.8, 0.95, 0.999])
def test_top_p_equals_hf(scores, seen, top_p):
    assert torch.equal(apply_top_p(scores, top_p), TopPLogitsWarper(top_p)(seen, scores.clone()))


def test_min_new_tokens_masks_every_eos_until_reached(scores, seen):
    eos = [3, 7]
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=10, min_new_tokens=5, eos_token_id=eos)
    assert torch.equal(mask_eos(scores, eos), hf(seen, scores.clone()))  # 13 − 10 = 3 new < 5
    params = SamplingParams(min_new_tokens=5, max_new_tokens=9, eos_token_id=eos)
    assert torch.isinf(process_logits(scores, seen, 4, params)[:, eos]).all()
    assert torch.equal(process_logits(scores, seen, 5, params), scores)


def test_full_pipeline_order_matches_hf_chain(scores, seen):
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    expected = scores.clone()
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
    ):
        expected = processor(seen, expected)
    assert torch.equal(process_logits(scores, seen, 0, params), expected)


def test_sampling_uses_the_global_rng_or_a_given_generator(scores):
    params = SamplingParams(do_sample=True)
    torch.manual_seed(11)
    first = select_next(scores, params, None)
    torch.manual_seed(11)
    expected = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
    assert torch.equal(first, expected)
    a = select_next(scores, params, torch.Generator().manual_seed(5))
    b = select_next(scores, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(select_next(scores, SamplingParams(), None), scores.argmax(-1))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-1.0), "temperature must be ≥ 0"),  # greedy ignores it, but it is a mistake
        (dict(do_sample=True, temperature=1e-40), "temperature must be ≥ 0.0001 when sampling"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(min_new_tokens=-2), "min_new_tokens"),
        (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"),
        (dict(eos_token_id=[-3]), "eos_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(stop_strings=[""]), "stop_strings"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**kwargs)


def test_greedy_accepts_any_positive_temperature_setting():
    assert SamplingParams(do_sample=False, temperature=0.0).temperature == 0.0  # ignored when greedy


def test_generation_config_json_is_read(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(
        json.dumps(
            {
                "do_sample": True,
                "top_p": 0.8,
                "top_k": 0,
                "max_new_tokens": 512,
                "eos_token_id": 151643,
                "pad_token_id": 151643,
                "chat_format": "raw",
            }
        )
    )
    params = load_generation_config(path)
    assert (params.do_sample, params.top_p, params.top_k, params.eos_token_id) == (True, 0.8, 0, (151643,))
    path.write_text(json.dumps({"top_p": 3}))
    with pytest.raises(ValueError, match="top_p"):
        load_generation_config(path)


def test_greedy_argmax_equals_torch_argmax_with_ties_nan_and_inf():
    from nekomata_core.sampling import greedy_argmax

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 1000, generator=g)
    rows[1, [10, 500, 900]] = 50.0  # a tie: the first index wins
    rows[2, 700] = float("nan")  # NaN counts as the maximum
    rows[3, [30, 60]] = float("nan")  # the first NaN
    rows[4] = float("-inf")  # all -inf: index 0
    rows[4, 999] = float("-inf")
    rows[5, 3] = float("inf")
    expected = rows.argmax(dim=-1)
    assert expected.tolist()[1:4] == [10, 700, 30]
    got = greedy_argmax(rows)
    assert got.dtype == torch.long and torch.equal(got, expected)
    with torch.inference_mode():  # as generate calls it
        assert torch.equal(greedy_argmax(rows.clone()), expected)
    assert torch.equal(greedy_argmax(rows.double()), expected)  # other dtypes: torch's own argmax
