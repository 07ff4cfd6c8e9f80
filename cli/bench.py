"""`dba bench {train,decode,memory,...}`: benchmarks that print a table and can write JSON.

Each benchmark lives in `bench/<name>.py` with `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "train": "tokens/s and MFU of the JAX train step and the torch reference step",
    "decode": "prefill/decode tokens/s per KV-cache kind and context, JAX and torch",
    "memory": "peak host memory of training and of decode (vs kv_bytes), JAX and torch",
    "profile": "where the JAX train step's time goes: device time per op from a jax.profiler trace",
    "dashboard": "what the live rich dashboard of `dba train` costs in tokens/s",
    "convert": "dba convert of a Hugging Face model of Llama-3.2-1B's shapes: time, MB/s, peak RSS vs model size",
    "prepare": "dba prepare's tokenizing MB/s per core (byte and BPE) and its peak RSS, main process and workers",
    "corpus": "the default recipe on the built-in corpus and on the stdlib (bytes, BPE): bits per byte",
    "cache-quality": "what the cache policies cost in quality: a decoupled and a standard model, trained here",
    "upcycle": "a Llama-form teacher trained on the stdlib, upcycled at 1/4, 1/8, 1/16 of its cache and distilled, vs baselines",
    "upcycle-shapes": "dba upcycle and a distillation step on Llama-3.2-1B / SmolLM-135M / Qwen2.5-0.5B shapes: time, peak RSS",
    "v29": "v29 beside dba on the same weights (--v29 PATH): train steps and q4_0 generation, with ratios",
    "gpu": "the GPU check in one command: kernels vs cached attention, 32k/128k decode, seed-config MFU, a resume",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True, parser_class=type(p))
    for name, help_ in BENCHES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        try:
            importlib.import_module(f"bench.{name.replace('-', '_')}").add_arguments(sp)
        except ModuleNotFoundError as e:
            if e.name not in ("bench", f"bench.{name.replace('-', '_')}"):
                raise
            sp.description = f"{help_} (not available in this install)"


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(f"bench.{args.bench.replace('-', '_')}").run(args) or 0)
