"""What several test modules share (imported by tests/ and parity_tests/; pytest collects nothing
here): running the `dba` CLI in a subprocess as a user would, reading what a run wrote, the toy
models and flag sets the end-to-end tests train, a tiny Hugging Face tokenizer.json, and the
plain-numpy quantizer reference written from SPEC §5 alone."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Subprocesses: CPU JAX, quiet XLA, unbuffered output; the session's compilation cache (set by the
# root conftest.py) is shared with every toy-sized program; never a fault hook from outside.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
ENV.pop("DBA_FAULT", None)

# A toy decoupled model (3 heads, so every head split is exercised with an odd count).
TOY = ["--attn-mode", "decoupled", "--d-model", "48", "--layers", "2", "--n-head", "3", "--d-ff", "96",
       "--attn-dim", "48", "--sem-dim", "12", "--geo-dim", "24"]
# The seed run's flags (shared/seed/run_summary.md) scaled down to the toy: Lion, grad-accum 2, a
# curriculum that grows the context, evaluations, the full analysis, a q4_0 cache report.
SEED_FLAGS = ["--mode", "train", "--device", "cpu", "--data-format", "npy", "--vocab-size", 97, *TOY,
              "--embed-dim", 36, "--optimizer", "lion", "--lr", "3e-4", "--lion-betas", "0.9,0.99",
              "--weight-decay", 0.1, "--grad-clip", 1.0, "--batch-size", 4, "--grad-accum", 2, "--train-seq-len", 16,
              "--seq-schedule", "16@0,32@3", "--block", 16, "--eval-every", 4, "--eval-iters", 2, "--log-every", 1,
              "--instrument", "full", "--analysis-every", 100, "--param-dtype", "fp32", "--seed", 1337,
              "--kv-cache", "q4_0", "--kv-residual", 8]

# A tiny model and run: fp32, one sequence length, a checkpoint every 2 steps, evals at 6 and 12.
TINY = ["--device", "cpu", "--data-format", "npy", "--vocab-size", 97, "--attn-mode", "decoupled",
        "--d-model", 32, "--layers", 1, "--n-head", 2, "--d-ff", 64, "--attn-dim", 32, "--sem-dim", 8,
        "--geo-dim", 16, "--batch-size", 2, "--train-seq-len", 16, "--optimizer", "adamw", "--lr", "1e-2",
        "--param-dtype", "fp32", "--seed", 7, "--save-every", 2, "--eval-every", 6, "--eval-iters", 1,
        "--log-every", 1, "--live", "basic"]


# triton (the fused torch decode kernel's compiler and interpreter) is installed on Linux only
TRITON_ONLY_ON_LINUX = "hardware: triton installs on Linux only (the dev extra's marker)"


def hardware_skip(why: str) -> None:
    """Skip a test this machine cannot run (no GPU, not a Mac, not Linux): the only kind of skip the
    session allows (the root conftest.py fails any other)."""
    import pytest

    pytest.skip(f"hardware: {why}")


def dba(*args, cwd=None, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m cli ARGS` (the `dba` console script) in a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd or REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def fault_env(fault: str | None) -> dict[str, str]:
    """ENV with the test-only fault hook `DBA_FAULT=fault` (train/faults.py), when given."""
    return dict(ENV, DBA_FAULT=fault) if fault else ENV


def dba_train(*args, cwd=None, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return dba("train", *args, cwd=cwd, env=fault_env(fault), timeout=timeout)


def popen_train(*args, fault: str | None = None, cwd=None) -> subprocess.Popen:
    """`dba train ARGS` running in the background, stdout and stderr merged, line-buffered."""
    return subprocess.Popen([sys.executable, "-m", "cli", "train", *map(str, args)], cwd=cwd or REPO,
                            env=fault_env(fault), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def one_line_error(r: subprocess.CompletedProcess, code: int = 1, prefix: str | None = None) -> str:
    """The one stderr line of a refused command (exit `code`, no traceback), stripped."""
    assert r.returncode == code, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if prefix is not None:
        assert r.stderr.startswith(prefix), r.stderr
    return r.stderr.strip()


def losses(run_dir, event: str = "train", key: str = "loss") -> dict[int, float]:
    """{step: value} of one field of a run's events (a resumed run appends; a later record wins)."""
    from dba.runlog import read_events

    return {e["step"]: e[key] for e in read_events(Path(run_dir) / "train.jsonl", event)}


def legs(out) -> list[list[dict]]:
    """train.jsonl split at its `meta` events: one list of events per invocation. Every line must
    parse: the log is flushed per event, so even a SIGKILLed run leaves whole lines."""
    lines = (Path(out) / "train.jsonl").read_text().splitlines()
    events = [{**rec, "event": rec["type"]} for rec in map(json.loads, lines)]
    out_legs: list[list[dict]] = []
    for e in events:
        if e["event"] == "meta":
            out_legs.append([])
        out_legs[-1].append(e)
    return out_legs


def export_step(path) -> int:
    """The training step a `.safetensors` export was written at (its metadata)."""
    from dba.weight_files import read_weights

    return int(read_weights(path)[2]["metadata"]["step"])


def ckpt_steps(out, kind: str = "last") -> list[int]:
    """The Orbax checkpoint steps of a JAX run's `kind`."""
    d = Path(out) / "checkpoints" / kind
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def write_hf_tokenizer(path: Path) -> Path:
    """A minimal Hugging Face tokenizer.json: a word-level model over 5 words plus one added token."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "the": 3, "cat": 4}
    path.write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 5, "content": "<eos>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}))
    return path


# ---- SPEC §5's quantizer in plain numpy ---------------------------------------------------------
# Deliberately plain (explicit padding, np.rint, argmin over the 16 levels typed in from the SPEC)
# so it shares nothing with the code under test but the SPEC.

NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
QMAX = {"q8_0": 127, "q4_0": 7, "nf4": 1}


def ref_layout(kind: str, dim: int, qblock: int) -> tuple[int, int, int]:
    """(effective block, padded dim, blocks) of a stream of `dim` channels."""
    qb = min(qblock if qblock > 0 else 32, dim)
    if kind != "q8_0":
        qb = max(2, qb // 2 * 2)
    pad = math.ceil(dim / qb) * qb
    if kind != "q8_0" and pad % 2:
        pad += qb
    return qb, pad, pad // qb


def ref_quantize(x, kind: str, qblock: int):
    """Returns (q bytes, fp16 scale, fp32 scale, codes) for x (rows, dim)."""
    x = np.asarray(x, np.float32)
    rows, dim = x.shape
    qb, pad, nb = ref_layout(kind, dim, qblock)
    xp = np.zeros((rows, pad), np.float32)
    xp[:, :dim] = x
    blocks = xp.reshape(rows, nb, qb)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    s32 = np.maximum(amax / np.float32(QMAX[kind]), np.float32(1e-8)).astype(np.float32)
    y = (blocks / s32).astype(np.float32)
    if kind == "q8_0":
        codes = np.clip(np.rint(y), -127, 127).astype(np.int8)
        q = codes.reshape(rows, pad)
    else:
        if kind == "q4_0":
            u = (np.clip(np.rint(y), -8, 7) + 8).astype(np.int64)
            codes = u - 8
        else:
            u = np.argmin(np.abs(np.clip(y, -1, 1)[..., None] - NF4_LEVELS), axis=-1)
            codes = NF4_LEVELS[u]
        u = u.reshape(rows, pad)
        q = (u[:, 0::2] * 16 + u[:, 1::2]).astype(np.uint8)
    return q, s32[..., 0].astype(np.float16), s32[..., 0], codes


def tiered(cases, fast, ids=None) -> list:
    """Parametrize cases for the two tiers: those `fast` picks run in the fast tier (`-m "not
    slow"`), the rest only in the full suite. `fast`: how many of the first cases, or a predicate
    on a case. `ids`: one id per case (or a function of the case)."""
    import pytest

    cases = list(cases)
    keep = (lambda i, c: i < fast) if isinstance(fast, int) else (lambda i, c: fast(c))
    out = []
    for i, case in enumerate(cases):
        values = case if isinstance(case, tuple) else (case,)
        name = None if ids is None else (ids(case) if callable(ids) else ids[i])
        out.append(pytest.param(*values, id=name, marks=() if keep(i, case) else pytest.mark.slow))
    return out


def first_of_each(key):
    """A `tiered` predicate: the first case of each `key(case)` (e.g. one per attention mode)."""
    seen = set()

    def pick(case):
        k = key(case)
        if k in seen:
            return False
        seen.add(k)
        return True

    return pick


# ---- v29 fixtures ---------------------------------------------------------------------------------
# Checkpoints written by v29 itself, each a directory with best.pt (or last.pt) and io.npz (the
# tokens and the logits v29 computed for them). The repository carries one (tests/fixtures/v29);
# the shared folder beside the repository (../shared/fixtures/v29, as the project's machines lay it
# out) or DBA_V29_FIXTURES may hold more, and a checkpoint of the same name there wins.
REPO_V29_FIXTURES = REPO / "tests" / "fixtures" / "v29"


def v29_fixture_roots() -> list[Path]:
    roots = [Path(os.environ["DBA_V29_FIXTURES"])] if os.environ.get("DBA_V29_FIXTURES") else []
    return roots + [REPO.parent / "shared" / "fixtures" / "v29", REPO_V29_FIXTURES]


def v29_fixtures() -> dict[str, Path]:
    """{name: directory} of every v29 fixture found, the first root holding a name winning."""
    out: dict[str, Path] = {}
    for root in v29_fixture_roots():
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if (d / "io.npz").is_file() and any((d / f).is_file() for f in ("best.pt", "last.pt")):
                    out.setdefault(d.name, d)
    return out


def v29_fixture(name: str = "dec_plain") -> Path:
    """The directory of the v29 fixture `name` (always found: the repository carries dec_plain)."""
    return v29_fixtures()[name]


def v29_checkpoint(d: Path) -> Path:
    return d / "best.pt" if (d / "best.pt").is_file() else d / "last.pt"


def random_hf_model(family: str, kwargs: dict, seed: int):
    """A transformers `family` model (e.g. "LlamaForCausalLM") built from config `kwargs`, with
    weights of a trained model's scale (logits of order 1-10; the library's std-0.02 init gives
    near-uniform ones that would hide errors): Linear N(0, 0.7/sqrt(in)), embeddings
    N(0, 1.5/sqrt(d)), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    import torch
    import transformers

    config = getattr(transformers, family.replace("ForCausalLM", "Config"))(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, family)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.copy_(1.5 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.7 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g))
    return model


# ---- torch caches written through the real write path (the torch decode-kernel tests) ----------

def written_torch_stream(name, kind, qblock, dim, residual, batch, max_len, length, rot_dim, gen):
    """A torch StreamCache holding `length` random tokens, written in two calls so the fp16 ring
    wraps as it does in decode."""
    import torch

    from dba.kvspec import stream_spec
    from torch_ref import kvcache as kvc

    spec = stream_spec(name, kind, dim, qblock, residual, max_len, rotated=bool(rot_dim))
    s = kvc.alloc_stream(spec, batch, max_len, rot_dim=rot_dim)
    x = torch.randn(batch, length, dim, generator=gen)
    cut = length // 3
    kvc.write(s, x[:, :cut], 0)
    kvc.write(s, x[:, cut:], cut)
    return s


def torch_attention_case(keys: dict, v: tuple, residual: int, length: int, max_len: int, null: bool, batch: int,
                         n_kv: int, group: int, t: int, seed: int = 0):
    """(q_cat, streams, q_start, length, null_kv, n_kv, key names): `t` queries per row against a
    cache of `length` tokens and room for `max_len`. `keys`: name -> (kind, qblock, head dim,
    rotated); `v`: (kind, qblock, head dim)."""
    import torch

    (vkind, vqb, dv) = v
    gen = torch.Generator().manual_seed(seed)
    streams = {name: written_torch_stream(name, kind, qb, n_kv * d, residual, batch, max_len, length,
                                          d if rot else 0, gen)
               for name, (kind, qb, d, rot) in keys.items()}
    streams["v"] = written_torch_stream("v", vkind, vqb, n_kv * dv, residual, batch, max_len, length, 0, gen)
    dqk = sum(d for _, _, d, _ in keys.values())
    q = torch.randn(batch, n_kv * group, t, dqk, generator=gen)
    null_kv = ((torch.randn(n_kv * group, dqk, generator=gen), torch.randn(n_kv * group, dv, generator=gen))
               if null else None)
    return q, streams, length - t, length, null_kv, n_kv, tuple(keys)
