"""`dba bench convert`: what `dba convert HF_DIR X.safetensors` costs on a model of a real shape:
time, MB/s and the converting process's peak RSS against the model's size.

A Hugging Face directory of the chosen shape (Llama-3.2-1B's by default: 16 layers, d 2048,
32 heads / 8 kv, d_ff 8192, vocab 128256, tied embeddings, llama3 RoPE) is written with random
bf16 weights, tensor by tensor (so making it needs no more memory than the conversion does), and
`dba convert` runs on it in a fresh process that reports its own peak resident set (the
kernel's VmHWM, which starts again at exec: `getrusage(RUSAGE_CHILDREN)` would also count the
forked copy of this process, which made the source). The converter reads and writes one tensor
at a time, so its peak is about the largest tensor (the embedding) plus the interpreter, not the
model.

    dba bench convert                         # Llama-3.2-1B's shapes, bf16, in a temporary directory
    dba bench convert --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import bench_main, machine, positive_int, print_table, write_json

# Llama-3.2-1B's config.json (the shapes and settings; the weights here are random)
LLAMA_3_2_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                "tie_word_embeddings": True, "rope_theta": 500000.0, "hidden_act": "silu",
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                "torch_dtype": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=positive_int, default=LLAMA_3_2_1B["num_hidden_layers"],
                   help="transformer layers (default Llama-3.2-1B's 16)")
    p.add_argument("--shards", type=positive_int, default=2, help="safetensors shards of the source")
    p.add_argument("--dir", default=None, help="where to write the source and the result (default: a temporary dir)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")


def write_source(d: Path, config: dict, shards: int) -> int:
    """The random bf16 Hugging Face directory (sharded, with its index); its bytes."""
    import ml_dtypes

    from dba.hf_config import canonical_to_hf, model_config
    from dba.param_shapes import param_shapes
    from dba.safetensors_stream import write_streamed

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    cfg, _, _ = model_config(config, str(d))
    names = [(canonical_to_hf(k), s) for k, s in param_shapes(cfg).items()]
    rng = np.random.default_rng(0)

    def read(name):
        shape = dict(names)[name]
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_streamed(d / fname, [(n, "BF16", s) for n, s in part], read, {"format": "pt"})
        weight_map.update({n: fname for n, _ in part})
        total += sum(math.prod(s) * 2 for _, s in part)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return total


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dba-bench-convert-"))
    config = {**LLAMA_3_2_1B, "num_hidden_layers": args.layers}
    src, dst = root / "hf", root / "converted.safetensors"
    try:
        t0 = time.perf_counter()
        size = write_source(src, config, args.shards)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _REPORTING_CONVERT, str(src), str(dst)], capture_output=True, text=True)
        took = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr.strip(), file=sys.stderr)
            return r.returncode
        peak = _peak_bytes(r.stdout)
        largest = max(math.prod(s) * 2 for s in _shapes(config))
        out = {"layers": args.layers, "params": sum(math.prod(s) for s in _shapes(config)), "model_bytes": size,
               "largest_tensor_bytes": largest, "convert_s": took, "mb_per_s": size / 2**20 / took,
               "peak_rss_bytes": peak, "result_bytes": dst.stat().st_size, "make_source_s": made,
               "machine": machine()}
        print_table(f"dba convert, Llama-3.2-1B shapes ({args.layers} layers), random bf16 weights",
                    ["params", "model", "largest tensor", "convert s", "MB/s", "peak RSS", "peak / model"],
                    [[f"{out['params']:,}", f"{size / 2**30:.2f} GiB", f"{largest / 2**20:,.0f} MiB", f"{took:.1f}",
                      f"{out['mb_per_s']:,.0f}", f"{peak / 2**20:,.0f} MiB", f"{peak / size:.2f}"]])
        if args.json:
            write_json(args.json, out)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


# `dba convert SRC DST --overwrite`, then the process's own peak RSS (VmHWM, kB) on the last line
_REPORTING_CONVERT = (
    "import sys\n"
    "from cli.main import main\n"
    "rc = main(['convert', sys.argv[1], sys.argv[2], '--overwrite'])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "print('VmHWM', hwm[0].split()[1] if hwm else 'unknown')\n"
    "sys.exit(rc)\n")


def _peak_bytes(stdout: str) -> int:
    last = stdout.strip().splitlines()[-1].split() if stdout.strip() else []
    if len(last) != 2 or last[0] != "VmHWM" or not last[1].isdigit():
        raise SystemExit("dba bench convert: the converting process did not report its peak RSS (needs Linux /proc)")
    return int(last[1]) * 1024


def _shapes(config: dict):
    from dba.hf_config import model_config
    from dba.param_shapes import param_shapes

    return param_shapes(model_config(config, "bench")[0]).values()


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.convert", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
