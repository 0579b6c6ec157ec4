"""bench.py runs end to end on a tiny preset and prints its table (it measures; it asserts no timing)."""

from __future__ import annotations

import json

from nekomata_core.apps.cli import main as cli_main


def main(argv: list[str]) -> int:
    """`nekomata bench ARGV`, as tools/bench.py runs it."""
    return cli_main(argv, command="bench")


def test_bench_prints_a_table_with_transformers_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "tiny",
            "--dtype",
            "float32",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "4",
            "--also",
            "static:int8",
            "--bandwidth-gib",
            "0.05",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "nekomata_core (auto: " in printed and "nekomata_core (static, int8)" in printed
    assert "transformers" in printed and "% roofline" in printed
    report = json.loads(out.read_text())
    systems = [r["system"] for r in report["results"]]
    assert len(systems) == 3 and not any("error" in r for r in report["results"]), report["results"]
    for result in report["results"]:
        assert result["decode_tokens_per_second"] > 0 and result["percent_of_roofline"] > 0
        # one bandwidth sample per measured run, taken in the worker itself
        assert len(result["bandwidth_runs_gbps"]) == 1 and result["bandwidth_gbps"] > 0
    assert report["bandwidth_gbps"]["sum_gbps"] > 0


def test_bench_rejects_bad_arguments(capsys):
    assert main(["tiny", "--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err
    assert main(["tiny", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


FAKE_LLAMA_BENCH = r"""#!/usr/bin/env python3
# Stands in for llama.cpp's llama-bench: records its arguments, prints results in its -o json format.
import json, sys
args = sys.argv[1:]
open(__file__ + ".args", "w").write(json.dumps(args))
get = lambda flag: args[args.index(flag) + 1]
record = {"model_type": "qwen 620M Q4_K - Medium", "model_size": 400000000, "n_threads": int(get("-t"))}
print(json.dumps([
    {**record, "n_prompt": int(get("-p")), "n_gen": 0, "avg_ts": 366.0, "samples_ts": [360.0, 372.0]},
    {**record, "n_prompt": 0, "n_gen": int(get("-n")), "avg_ts": 69.5, "samples_ts": [69.0, 70.0]},
]))
"""


def _bench_args(*extra: str) -> list[str]:
    return ["tiny", "--dtype", "float32", "--runs", "1", "--warmup", "0", "--prompt-tokens", "8",
            "--new-tokens", "4", "--bandwidth-gib", "0.05", "--no-transformers", *extra]  # fmt: skip


def _fake_peer(tmp_path):
    """(the llama-bench stub, an empty GGUF stand-in) in tmp_path."""
    peer = tmp_path / "llama-bench"
    peer.write_text(FAKE_LLAMA_BENCH)
    peer.chmod(0o755)
    gguf = tmp_path / "tiny-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    return peer, gguf


def test_bench_runs_a_llama_bench_peer_on_the_same_workload(tmp_path, capsys):
    peer, gguf = _fake_peer(tmp_path)
    out = tmp_path / "bench.json"
    code = main(_bench_args("--threads", "2", "--peer-llama-bench", str(peer), "--peer-gguf", str(gguf),
                            "--json", str(out)))  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "llama.cpp qwen 620M Q4_K - Medium" in printed and "69.50" in printed
    args = json.loads((tmp_path / "llama-bench.args").read_text())
    assert args[args.index("-m") + 1] == str(gguf)
    assert [args[args.index(f) + 1] for f in ("-t", "-p", "-n", "-o")] == ["2", "8", "4", "json"]
    peer_row = next(r for r in json.loads(out.read_text())["results"] if r.get("peer"))
    assert peer_row["decode_tokens_per_second"] == 69.5 and peer_row["prefill_tokens_per_second"] == 366.0


def test_bench_rounds_run_the_systems_in_turn_and_merge_their_runs(tmp_path, capsys):
    peer, gguf = _fake_peer(tmp_path)
    out = tmp_path / "bench.json"
    code = main(_bench_args("--rounds", "3", "--peer-llama-bench", str(peer), "--peer-gguf", str(gguf),
                            "--json", str(out)))  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "× 3 rounds" in printed and "round by round" in printed and "69.50, 69.50, 69.50" in printed
    report = json.loads(out.read_text())
    assert report["rounds"] == 3
    ours, peer_row = report["results"]
    assert "error" not in ours, ours
    # one run per round (--runs 1), each with the bandwidth measured after it; medians over all of them
    assert len(ours["decode_runs"]) == len(ours["bandwidth_runs_gbps"]) == 3
    assert len(ours["rounds_decode_tokens_per_second"]) == 3
    assert ours["decode_tokens_per_second"] == sorted(ours["decode_runs"])[1]
    assert peer_row["decode_runs"] == [69.0, 70.0] * 3 and peer_row["decode_tokens_per_second"] == 69.5


def test_merge_rounds_reports_a_failing_system_by_its_first_error():
    from nekomata_core.apps.bench import merge_rounds

    good = {"system": "a", "decode_runs": [1.0], "decode_tokens_per_second": 1.0, "prefill_tokens_per_second": 2.0,
            "peer": True}  # fmt: skip
    merged = merge_rounds([[good, {"system": "b", "error": "first"}], [good, {"system": "b", "error": "second"}]])
    assert merged[0]["rounds_decode_tokens_per_second"] == [1.0, 1.0] and merged[1]["error"] == "first"


def test_bench_peer_arguments_are_checked(tmp_path, capsys):
    assert main(_bench_args("--peer-gguf", str(tmp_path / "x.gguf"))) == 2
    assert "--peer-llama-bench" in capsys.readouterr().err
    assert main(_bench_args("--peer-llama-bench", str(tmp_path / "nope"), "--peer-gguf", str(tmp_path))) == 2
    assert "not found" in capsys.readouterr().err


def test_bench_batch_reports_the_tokens_of_all_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(_bench_args("--batch", "3", "--json", str(out))) == 0
    assert "batch 3" in capsys.readouterr().out
    (ours,) = json.loads(out.read_text())["results"]
    assert "error" not in ours and ours["decode_tokens_per_second"] > 0
