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
