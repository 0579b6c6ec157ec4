"""Benchmark: load time, peak RSS, prefill and decode speed — ours and transformers', in one run.

    nekomata bench bench-620m --dtype bfloat16          (a preset: random weights, built on the fly)
    nekomata bench /path/to/checkpoint --quantize int8
    nekomata bench bench-620m --batch 8                 (total generated tokens/s of 8 rows at once)
    nekomata bench CKPT --peer-llama-bench llama-bench --peer-gguf ckpt-Q4_K_M.gguf   (llama.cpp, same run)

Each system runs in its own subprocess (a fresh interpreter, so peak RSS and caches are its own) on the
same checkpoint, prompt and thread count. Decode speed is the median over `--runs` generations after
`--warmup`; a decode step reads every weight once, so the roofline is

    tokens/s ≤ measured read bandwidth / bytes read per token

with the bandwidth measured in the same run (the faster of an fp32 sum and an fp32 GEMV over 1 GiB).
A peer (llama.cpp's `llama-bench` and GGUF files of the same checkpoint) runs in the same session with
the same thread count, prompt and generation lengths; llama-bench reports prompt processing ("pp") and
generation ("tg") speed at batch 1, so peers are measured at batch 1 only. `--rounds R` runs the whole
sequence of systems R times in turn: a machine whose read bandwidth drifts (by up to 1.6× over minutes on
some of ours) then slows every system alike instead of whichever ran during a slow spell; the report
gives each system's decode speed round by round next to the medians over all rounds.
Nothing here asserts a timing: the numbers are printed (and written as JSON) for people to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..backends import QUANTIZE_CHOICES, STEP_MODES
from ..config import PRESETS, QwenConfig


# ---------------------------------------------------------------------------------------------- machine
class ReadBandwidth:
    """Read bandwidth in GB/s, best of the streaming reads we have, over a buffer of `gib` GiB.

    Kernels: PyTorch's fp32 sum and fp32 GEMV, and (when nekomata_core.kernels.cpu builds here) a plain C
    streaming read with the GEMVs' access pattern. A decode step cannot read its weights faster than the
    fastest of these, which is what makes it the roofline. The buffer is allocated once, so that
    `measure` can be called between decode runs: this machine's bandwidth drifts by ±20 % over minutes,
    and a roofline taken minutes earlier would be off by that much.
    """

    def __init__(self, gib: float = 1.0) -> None:
        import torch

        n = int(gib * 2**30 // 4)
        self.data = torch.rand(n)
        rows = 8192
        self.matrix = self.data[: (n // rows) * rows].view(rows, -1)
        self.vector = torch.rand(self.matrix.shape[1])
        self._stream = _c_stream_read()

    def measure(self, repeats: int = 7) -> dict[str, float]:
        import torch

        data, nbytes = self.data, self.data.numel() * 4
        rates = {
            "sum_gbps": _rate(lambda: data.sum(), nbytes, repeats),
            "gemv_gbps": _rate(lambda: torch.mv(self.matrix, self.vector), self.matrix.numel() * 4, repeats),
        }
        if self._stream is not None:
            threads = torch.get_num_threads()
            rates["stream_gbps"] = _rate(lambda: self._stream(data.data_ptr(), nbytes, threads), nbytes, repeats)
        return rates


def _rate(fn, nbytes: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def _c_stream_read():
    """nekomata_core.kernels.cpu.step's streaming read (nbytes, threads → checksum), or None where it does not build."""
    from nekomata_core.kernels.cpu import step

    return step.stream_read if step.available() else None


def measure_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict[str, float]:
    """`ReadBandwidth(gib).measure(repeats)`: GB/s of each read kernel (see ReadBandwidth)."""
    return ReadBandwidth(gib).measure(repeats)


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork + exec,
    so a worker would report its (large) parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB elsewhere on Linux


# ---------------------------------------------------------------------------------------------- workers
def _prompt(config: QwenConfig, length: int, batch: int = 1):
    import torch

    return torch.randint(
        0, min(config.vocab_size, 151643), (batch, length), generator=torch.Generator().manual_seed(0)
    )


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..accelerate import make_step
    from ..generation import generate
    from ..pretrained import QwenForCausalLM

    torch.set_num_threads(args.threads)
    # The first meta-device module imports torch's meta kernels (seconds, once per process):
    # a start-up cost like transformers' own import, kept out of the load time.
    with torch.device("meta"):
        torch.nn.Linear(1, 1)
    rss_before = _peak_rss_bytes()
    start = time.perf_counter()
    tensor_parallel = getattr(args, "tensor_parallel", False)
    model = QwenForCausalLM.from_pretrained(
        args.checkpoint,
        dtype=args.dtype,
        device=args.device,
        progress=False,
        quantize=args.quantize,
        tensor_parallel=tensor_parallel,
    )
    load_seconds = time.perf_counter() - start
    peak_after_load = _peak_rss_bytes()
    ids = _prompt(model.config, args.prompt_tokens, args.batch)
    decoder = make_step(model, args.step)
    reader = ReadBandwidth(args.bandwidth_gib)
    prefill, decode, bandwidth = [], [], []
    for i in range(args.warmup + args.runs):
        out = generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=(), step_fn=decoder)
        if i >= args.warmup:
            prefill.append(out.prefill_tokens_per_second)  # every row's prompt tokens
            decode.append(out.decode_tokens_per_second * args.batch)  # tokens generated by all rows
            bandwidth.append(max(reader.measure(repeats=3).values()))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if tensor_parallel:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    return {
        "rank": f"{rank}/{world}" if tensor_parallel else None,
        "collectives": model.tensor_parallel.collectives.kind if tensor_parallel else None,
        "system": f"nekomata_core ({_step_label(args.step, decoder)}{', ' + args.quantize if args.quantize else ''})",
        "load_seconds": load_seconds,
        "peak_rss_bytes": peak_after_load,
        "baseline_rss_bytes": rss_before,
        "weight_bytes": weight_bytes,
        "decode_bytes_per_token": weight_bytes - _embedding_bytes(model),
        "prefill_tokens_per_second": statistics.median(prefill),
        "decode_tokens_per_second": statistics.median(decode),
        "decode_runs": decode,
        "bandwidth_runs_gbps": bandwidth,
    }


def _step_label(mode: str, decoder) -> str:
    from ..accelerate import NativeStep

    if mode != "auto":
        return mode
    return "auto: native" if isinstance(decoder, NativeStep) else "auto: static"


def _embedding_bytes(model) -> int:
    # A decode step reads one row of the embedding table, not all of it.
    weight = model.transformer.wte.weight
    return weight.numel() * weight.element_size()


def run_transformers(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    dtype = _torch_dtype(args.dtype)
    config = QwenConfig.from_json_file(Path(args.checkpoint) / "config.json")
    with tempfile.TemporaryDirectory(prefix="nekomata-bench-hf-") as hf_dir:
        _write_qwen2_checkpoint(Path(args.checkpoint), config, Path(hf_dir))  # preparation, not timed
        rss_before = _peak_rss_bytes()
        start = time.perf_counter()
        model = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").eval()
        load_seconds = time.perf_counter() - start
    peak_after_load = _peak_rss_bytes()
    ids = _prompt(config, args.prompt_tokens, args.batch)
    n = args.new_tokens

    def timed(max_new: int) -> float:
        begin = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - begin

    reader = ReadBandwidth(args.bandwidth_gib)
    prefill, decode, bandwidth = [], [], []
    for i in range(args.warmup + args.runs):
        with torch.inference_mode():
            begin = time.perf_counter()
            model(ids)
            prefill_seconds = time.perf_counter() - begin
        one, full = timed(1), timed(n)
        if i >= args.warmup:
            prefill.append(ids.numel() / prefill_seconds)
            # generate(n) − generate(1): n − 1 steps, each generating one token per row
            decode.append(ids.shape[0] * (n - 1) / max(full - one, 1e-9))
            bandwidth.append(max(reader.measure(repeats=3).values()))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    return {
        "system": f"transformers {__import__('transformers').__version__} Qwen2 (sdpa)",
        "load_seconds": load_seconds,
        "peak_rss_bytes": peak_after_load,
        "baseline_rss_bytes": rss_before,
        "weight_bytes": weight_bytes,
        "decode_bytes_per_token": weight_bytes - embed.numel() * embed.element_size(),
        "prefill_tokens_per_second": statistics.median(prefill),
        "decode_tokens_per_second": statistics.median(decode),
        "decode_runs": decode,
        "bandwidth_runs_gbps": bandwidth,
    }


def run_llama_bench(args: argparse.Namespace, gguf: Path) -> dict[str, Any]:
    """llama.cpp's own benchmark of one GGUF: prompt processing and generation speed at batch 1."""
    command = [
        str(args.peer_llama_bench), "-m", str(gguf), "-t", str(args.threads), "-p", str(args.prompt_tokens),
        "-n", str(args.new_tokens), "-r", str(args.runs), "-o", "json",
    ]  # fmt: skip
    label = f"llama.cpp {gguf.name}"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"system": label, "error": f"could not run {args.peer_llama_bench}: {exc}"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"system": label, "error": f"llama-bench exited {proc.returncode}: {tail[0]}"}
    try:
        records = json.loads(proc.stdout)
        pp = next(r for r in records if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
        tg = next(r for r in records if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0)
        result = {
            "system": f"llama.cpp {pp.get('model_type', gguf.name)}",
            "peer": True,
            "gguf": str(gguf),
            "weight_bytes": int(pp["model_size"]),
            "prefill_tokens_per_second": float(pp["avg_ts"]),
            "decode_tokens_per_second": float(tg["avg_ts"]),
            "decode_runs": [float(v) for v in tg.get("samples_ts", [tg["avg_ts"]])],
        }
    except (ValueError, TypeError, KeyError, StopIteration) as exc:
        return {"system": label, "error": f"llama-bench printed no pp/tg results as JSON ({exc!r})"}
    return result


def _write_qwen2_checkpoint(source: Path, config: QwenConfig, out: Path) -> None:
    """The same weights as a transformers Qwen2 checkpoint, so transformers loads them its own way."""
    from ..loader import checkpoint_weight_files, iter_safetensors, save_safetensors
    from .qwen2_reference import qwen2_config_from_qwen, qwen_to_qwen2_state_dict

    qwen2_config_from_qwen(config, attn_implementation="sdpa").save_pretrained(out)
    state = {}
    for path in checkpoint_weight_files(source):
        state.update(dict(iter_safetensors(path)))
    mapped = {k: v.contiguous() for k, v in qwen_to_qwen2_state_dict(state, config).items()}
    save_safetensors(mapped, out / "model.safetensors")


# ---------------------------------------------------------------------------------------------- driver
def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure load, prefill and decode speed (and transformers' on the same checkpoint)",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(parser)
    parser.set_defaults(run=run_bench)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default="bench-620m",
        help=f"checkpoint directory, Hub id, or a preset ({', '.join(sorted(PRESETS))})",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="measured generations (median reported)")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run the systems in turn this many times (--runs generations each time), so that the machine's "
        "bandwidth drift falls on every system alike; medians over all rounds, and decode tok/s per round",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--step", "--decode", dest="step", default="auto", choices=list(STEP_MODES))  # --decode: its old name
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=1, help="rows generated at once (decode: total tokens/s)")
    parser.add_argument(
        "--peer-llama-bench", type=Path, default=None, metavar="BIN",
        help="llama.cpp's llama-bench binary, to measure --peer-gguf files in the same run",
    )  # fmt: skip
    parser.add_argument(
        "--peer-gguf", type=Path, action="append", default=[], metavar="FILE",
        help="a GGUF of the same checkpoint for the llama.cpp peer (repeatable: bf16, Q8_0, Q4_K_M, ...)",
    )  # fmt: skip
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="STEP[:int8|:int4]",
        help="measure another configuration of ours in the same run, e.g. compiled, static:int8 or native:int4",
    )
    parser.add_argument(
        "--bandwidth-gib",
        type=float,
        default=1.0,
        help="size of the buffer read to measure memory bandwidth (default 1 GiB: far above any cache)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    # Internal: a worker subprocess measures one system and writes its JSON result.
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def _spawn(
    args: argparse.Namespace, worker: str, checkpoint: Path, decode: str, quantize: str | None
) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [
        sys.executable,
        "-m",
        "nekomata_core",
        "bench",
        "--worker",
        worker,
        "--checkpoint",
        str(checkpoint),
        "--result",
        result_path,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--runs",
        str(args.runs),
        "--warmup",
        str(args.warmup),
        "--step",
        decode,
        "--threads",
        str(args.threads),
        "--bandwidth-gib",
        str(args.bandwidth_gib),
        "--batch",
        str(args.batch),
    ] + (["--quantize", quantize] if quantize else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"system": worker, "error": tail[0]}
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return result


def run_bench(args: argparse.Namespace) -> int:
    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_transformers(args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    from .common import EXIT_USAGE, CLIError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_bench_tensor_parallel(args)

    if (args.runs < 1 or args.rounds < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.threads < 1
            or args.batch < 1):  # fmt: skip
        raise CLIError(
            "--runs and --rounds must be ≥ 1, --new-tokens ≥ 2, --prompt-tokens ≥ 1, --threads ≥ 1 and --batch ≥ 1 "
            f"(got {args.runs}, {args.rounds}, {args.new_tokens}, {args.prompt_tokens}, {args.threads}, "
            f"{args.batch})",
            EXIT_USAGE,
        )
    if args.peer_gguf and args.peer_llama_bench is None:
        raise CLIError("--peer-gguf needs --peer-llama-bench BIN (the llama-bench binary to run it)", EXIT_USAGE)
    if args.peer_llama_bench is not None:
        if not args.peer_gguf:
            raise CLIError("--peer-llama-bench needs at least one --peer-gguf FILE", EXIT_USAGE)
        if args.batch != 1:
            raise CLIError("llama-bench measures batch 1 only: drop --batch or the peer", EXIT_USAGE)
        missing = [str(p) for p in [args.peer_llama_bench, *args.peer_gguf] if not p.is_file()]
        if missing:
            raise CLIError(f"peer file(s) not found: {', '.join(missing)}", EXIT_USAGE)
    workdir = None
    if args.model in PRESETS and not Path(args.model).exists():
        from .checkpoint_builder import make_checkpoint

        workdir = tempfile.TemporaryDirectory(prefix="nekomata-bench-")
        checkpoint = make_checkpoint(
            Path(workdir.name), args.model, dtype=_torch_dtype(args.dtype), seed=0, tokenizer_file=False
        )
        source = f"preset {args.model} (random weights)"
    else:
        from ..hub import CheckpointNotFoundError, resolve_model_dir

        try:
            checkpoint = resolve_model_dir(args.model)
        except (CheckpointNotFoundError, ValueError) as exc:
            raise CLIError(str(exc), EXIT_USAGE) from None
        source = str(checkpoint)
    try:
        import torch

        torch.set_num_threads(args.threads)
        bandwidth = measure_bandwidth(args.bandwidth_gib)
        configs = [(args.step, args.quantize)]
        for extra in args.also:
            decode, _, quant = extra.partition(":")
            configs.append((decode, quant or None))
        rounds = []
        for _ in range(args.rounds):  # every system once per round, in the same order
            results = [_spawn(args, "ours", checkpoint, d, q) for d, q in configs]
            if not args.no_transformers:
                results.append(_spawn(args, "transformers", checkpoint, "eager", None))
            results.extend(run_llama_bench(args, gguf) for gguf in args.peer_gguf)
            rounds.append(results)
        results = merge_rounds(rounds)
    finally:
        if workdir is not None:
            workdir.cleanup()
    report = _report(args, source, bandwidth, results)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One result per system from its results of every round (the same systems in the same order each
    round): the runs of all rounds together, medians over them (prefill and load time: the median of the
    rounds'), the largest peak RSS, and `rounds_decode_tokens_per_second`, each round's own decode median. A
    system that failed in any round is reported by its first error."""
    merged = []
    for per_system in zip(*rounds, strict=True):
        failed = next((r for r in per_system if "error" in r), None)
        if failed is not None:
            merged.append(failed)
            continue
        result = dict(per_system[0])
        result["decode_runs"] = [v for r in per_system for v in r["decode_runs"]]
        result["decode_tokens_per_second"] = statistics.median(result["decode_runs"])
        result["prefill_tokens_per_second"] = statistics.median(r["prefill_tokens_per_second"] for r in per_system)
        result["rounds_decode_tokens_per_second"] = [r["decode_tokens_per_second"] for r in per_system]
        if not result.get("peer"):
            result["bandwidth_runs_gbps"] = [v for r in per_system for v in r["bandwidth_runs_gbps"]]
            result["load_seconds"] = statistics.median(r["load_seconds"] for r in per_system)
            result["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in per_system)
        merged.append(result)
    return merged


def run_bench_tensor_parallel(args: argparse.Namespace) -> int:
    """Under torchrun: every rank loads its shard and measures in its own process; rank 0 prints one row
    per rank (its weight bytes, peak RSS and speed; the speeds agree, since the ranks step together)."""
    import torch.distributed as dist

    from .common import EXIT_USAGE, CLIError

    if not Path(args.model).is_dir():
        raise CLIError(
            f"under torchrun, bench needs a checkpoint directory, got {args.model!r} (write one with "
            "`python tools/make_tiny_checkpoint.py DIR --preset bench-620m --dtype bfloat16`)",
            EXIT_USAGE,
        )
    if args.also or not args.no_transformers or args.peer_llama_bench is not None:
        print("bench under torchrun measures one tensor-parallel configuration of ours: --also, transformers "
              "and peers are skipped", file=sys.stderr)  # fmt: skip
    args.checkpoint, args.tensor_parallel = args.model, True
    result = run_ours(args)
    results: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        report = _report(args, f"{args.model} (tensor parallel, {len(results)} ranks)", {}, results)
        print(format_report(report))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0


def _torch_dtype(name: str):
    from ..pretrained import DTYPE_NAMES

    return DTYPE_NAMES[name]


def _report(args, source: str, bandwidth: dict[str, float], results: list[dict]) -> dict[str, Any]:
    baseline = next((r for r in results if r["system"].startswith("transformers") and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        if baseline is not None:
            r["decode_vs_transformers"] = r["decode_tokens_per_second"] / baseline["decode_tokens_per_second"]
            r["prefill_vs_transformers"] = (
                r["prefill_tokens_per_second"] / baseline["prefill_tokens_per_second"]
            )
        if r.get("peer"):
            continue  # llama-bench reports speed only: no RSS or bandwidth of its process
        # Each decode run is compared with the bandwidth measured right after it, in the same process.
        # A step reads every weight once for all rows: the roofline counts steps, not tokens.
        batch = args.batch
        per_run = [
            100 * (tps / batch) * r["decode_bytes_per_token"] / (gbps * 1e9)
            for tps, gbps in zip(r["decode_runs"], r["bandwidth_runs_gbps"], strict=True)
        ]
        r["bandwidth_gbps"] = statistics.median(r["bandwidth_runs_gbps"])
        r["roofline_tokens_per_second"] = batch * r["bandwidth_gbps"] * 1e9 / r["decode_bytes_per_token"]
        r["percent_of_roofline"] = statistics.median(per_run)
        r["rss_over_weights"] = r["peak_rss_bytes"] / r["weight_bytes"]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, {platform.processor() or ''}".strip(
            ", "
        ),
        "cpu": cpu_description(),
        "model": source,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "runs": args.runs,
        "rounds": getattr(args, "rounds", 1),
        "bandwidth_gbps": bandwidth,
        "results": results,
    }


def cpu_description() -> str:
    """The CPU's model name, its vector extensions that matter here, and the CPU-kernel variant in use
    (every number must name its CPU: machines of one kind differ in AVX-512)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    extensions = " ".join(flag for flag in wanted if flag in flags) or "none of " + "/".join(wanted)
    try:
        from nekomata_core.kernels.cpu import build

        kernels = build.isa() or f"unavailable ({build.unavailable_reason()})"
    except ImportError:
        kernels = "not installed"
    return f"{name}; {extensions}; CPU kernels: {kernels}"


def format_report(report: dict[str, Any]) -> str:
    bw = report["bandwidth_gbps"]
    kernels = ", ".join(f"{name.removesuffix('_gbps')} {value:.1f}" for name, value in bw.items()) or "-"
    lines = [
        f"model: {report['model']}   dtype: {report['dtype']}   prompt {report['prompt_tokens']} → "
        f"{report['new_tokens']} new tokens, batch {report.get('batch', 1)}, median of {report['runs']} runs"
        + (f" × {report['rounds']} rounds (the systems in turn)" if report.get("rounds", 1) > 1 else "")
        + (" (decode: tokens/s of all rows together)" if report.get("batch", 1) > 1 else ""),
        f"machine: {report['machine']}   read bandwidth at start (GB/s): {kernels}",
        f"cpu: {report.get('cpu', '-')}",
        "",
        f"{'system':<40} {'load s':>7} {'RSS/weights':>11} {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'vs HF':>6} {'GB/s':>5} {'% roofline':>10}",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['system']:<40} failed: {r['error']}")
            continue
        ratio = f"{r['decode_vs_transformers']:.2f}×" if "decode_vs_transformers" in r else "-"
        if r.get("peer"):
            lines.append(
                f"{r['system']:<40} {'-':>7} {'-':>11} {r['prefill_tokens_per_second']:>13.1f} "
                f"{r['decode_tokens_per_second']:>12.2f} {ratio:>6} {'-':>5} {'-':>10}"
            )
            continue
        system = r["system"]
        if r.get("rank"):  # tensor parallel: this rank's memory
            gb = 1e9
            system += f" rank {r['rank']}: {r['weight_bytes'] / gb:.2f} GB weights, {r['peak_rss_bytes'] / gb:.2f} GB RSS"
            system += f", collectives: {r['collectives']}" if r.get("collectives") else ""
        lines.append(
            f"{system:<40} {r['load_seconds']:>7.2f} {r['rss_over_weights']:>11.2f} "
            f"{r['prefill_tokens_per_second']:>13.1f} {r['decode_tokens_per_second']:>12.2f} {ratio:>6} "
            f"{r['bandwidth_gbps']:>5.1f} {r['percent_of_roofline']:>9.0f}%"
        )
    if report.get("rounds", 1) > 1:
        lines.append("decode tok/s round by round:")
        for r in report["results"]:
            if "error" not in r:
                per_round = ", ".join(f"{v:.2f}" for v in r["rounds_decode_tokens_per_second"])
                lines.append(f"  {r['system']:<38} {per_round}")
    lines.append(
        "(GB/s: the best read bandwidth (torch sum, torch GEMV, C stream), measured after each decode run "
        "in the same process; % roofline: median over runs of decode tok/s × weight bytes read per token / "
        "that bandwidth; RSS includes the interpreter and torch)"
    )
    return "\n".join(lines)
