"""Every user mistake through the real CLI (a subprocess, as a user runs it): the exit status is
2 (usage) or 1 (runtime), stderr is one line naming the bad value, and there is no traceback.
`--debug` shows the traceback instead.

The table is the list of mistakes of the reliability issue; `{name}` in an argument is replaced
by a file from the `files` fixture (a tiny trained-shape export, broken copies, odd data files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dba.config import ModelConfig
from dba.weights import param_shapes, save_safetensors

pytestmark = pytest.mark.slow  # every mistake through the real CLI, in subprocesses

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
TINY = ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, d_model=22, d_ff=38, embed_dim=22,
                   attn_mode="decoupled", sem_dim=6, geo_dim=8, attn_dim=14)
TRAIN_RUN = ["--steps", "2", "--batch-size", "2", "--train-seq-len", "16", "--eval-every", "0", "--live", "off"]
TRAIN_TINY = ["--d-model", "24", "--layers", "1", "--n-head", "2", "--d-ff", "40", *TRAIN_RUN]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mistakes")
    rng = np.random.default_rng(0)
    state = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in param_shapes(TINY).items()}
    f = {"model": save_safetensors(d / "tiny.safetensors", TINY, state)}
    from safetensors.numpy import save_file

    meta = {"dba_config": TINY.to_json()}
    bad = dict(state, **{"tok_emb.weight": state["tok_emb.weight"][:, :20].copy()})
    save_file(bad, str(d / "wrongshape.safetensors"), metadata=meta)
    bad = dict(state, **{"lm_head.weight" if "lm_head.weight" in state else "tok_emb.weight":
                         np.zeros(param_shapes(TINY)["tok_emb.weight"], np.int32)})
    save_file(bad, str(d / "intdtype.safetensors"), metadata=meta)
    save_file(state, str(d / "badjson.safetensors"), metadata={"dba_config": '{"d_model": "wide"'})
    raw = f["model"].read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.safetensors").write_bytes(rng.bytes(4096))
    (d / "garbage.pt").write_bytes(rng.bytes(4096))
    (d / "truncated.pt").write_bytes(b"PK\x03\x04" + rng.bytes(100))
    (d / "empty.pt").write_bytes(b"")
    (d / "nockpt").mkdir()
    (d / "nockpt" / "notes.txt").write_text("no weights here")
    np.save(d / "tokens.npy", (np.arange(4000) * 7 % 61).astype(np.uint16))
    big = (np.arange(4000) % 61).astype(np.uint16)
    big[1234] = 300
    np.save(d / "big_id.npy", big)
    np.save(d / "short.npy", np.arange(40, dtype=np.uint16))
    np.save(d / "floats.npy", np.linspace(0, 1, 100, dtype=np.float32))
    (d / "odd.bin").write_bytes(bytes(range(7)))
    (d / "empty.npy").write_bytes(b"")
    (d / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (d / "datadir").mkdir()
    held = d / "held_run"
    held.mkdir()
    (held / "train.jsonl").write_text('{"event": "meta"}\n')
    for name in ("wrongshape.safetensors", "intdtype.safetensors", "badjson.safetensors", "truncated.safetensors", "garbage.safetensors", "garbage.pt", "truncated.pt", "empty.pt",
                 "nockpt", "tokens.npy", "big_id.npy", "short.npy", "floats.npy", "odd.bin", "empty.npy",
                 "garbage.npy", "datadir"):
        f[name.replace(".", "_")] = d / name
    f["held_run"] = held
    f["cwd"] = d / "cwd"
    f["cwd"].mkdir()
    f["dst"] = d / "converted.safetensors"
    return f


def dba(*args: str, cwd: Path, debug: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "cli", *(["--debug"] if debug else []), *args]
    env = dict(ENV, PYTHONPATH=str(REPO))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# (id, argv, exit status, fragments the one line must contain)
CASES = [
    # data
    ("data-missing", ["train", "--data", "/nonexistent/t.npy"], 2, ["/nonexistent/t.npy", "not found"]),
    ("data-empty", ["train", "--data", "{empty_npy}"], 2, ["empty.npy", "empty"]),
    ("data-directory", ["train", "--data", "{datadir}"], 2, ["datadir", "directory"]),
    ("data-garbage", ["train", "--data", "{garbage_npy}"], 1, ["garbage.npy", "not a readable .npy"]),
    ("data-id-too-big", ["train", "--data", "{big_id_npy}", "--vocab-size", "61"], 2,
     ["big_id.npy", "300", "index 1234", "vocab_size 61"]),
    ("data-too-short", ["train", "--data", "{short_npy}", *TRAIN_TINY], 2, ["validation split", "4 tokens", "seq_len + 1 = 17"]),
    ("data-shorter-than-batch", ["train", "--data", "{short_npy}", *TRAIN_TINY, "--train-seq-len", "64",
                                 "--val-frac", "0.05"], 2, ["train split", "38 tokens", "65"]),
    ("data-wrong-dtype-npy", ["train", "--data", "{floats_npy}"], 2, ["floats.npy", "float32"]),
    ("data-wrong-dtype-bin", ["train", "--data", "{odd_bin}", "--data-dtype", "uint16"], 2,
     ["odd.bin", "7 bytes", "uint16"]),
    ("data-unknown-dtype", ["train", "--data", "{odd_bin}", "--data-dtype", "float7"], 2, ["float7"]),
    # model and flags
    ("model-heads", ["train", "--n-head", "5"], 2, ["n_head=5"]),
    ("model-zero-dim", ["train", "--d-model", "0"], 2, ["d_model", "0"]),
    ("model-sem-heads", ["train", "--attn-mode", "decoupled", "--sem-dim", "7", "--geo-dim", "8",
                         "--attn-dim", "16", "--n-head", "2"], 2, ["sem_dim=7", "n_head=2"]),
    ("model-geo-odd", ["train", "--attn-mode", "decoupled", "--sem-dim", "8", "--geo-dim", "6",
                       "--attn-dim", "16", "--n-head", "2"], 2, ["geo_dim=6", "n_head=2"]),
    ("unknown-optimizer", ["train", "--optimizer", "sgd"], 2, ["sgd"]),
    ("unknown-schedule", ["train", "--lr-schedule", "zigzag"], 2, ["zigzag"]),
    ("unknown-cache-train", ["train", "--kv-cache", "q3_k"], 2, ["q3_k"]),
    ("unknown-cache-sample", ["sample", "--ckpt", "{model}", "--kv-cache", "q3_k"], 2, ["q3_k"]),
    ("negative-seed", ["train", "--seed", "-3"], 2, ["--seed", "-3"]),
    ("negative-skip-nonfinite", ["train", "--skip-nonfinite", "-1"], 2, ["--skip-nonfinite", "-1"]),
    ("unknown-flag", ["train", "--no-such-flag"], 2, ["--no-such-flag"]),
    ("unknown-command", ["trian"], 2, ["trian"]),
    ("bad-seq-schedule", ["train", "--seq-schedule", "64@0,oops"], 2, ["oops"]),
    ("bad-mesh-syntax", ["train", "--mesh", "data=two"], 2, ["data=two"]),
    ("bad-mesh-axis", ["train", "--mesh", "pipeline=2"], 2, ["pipeline"]),
    ("bad-mesh-product", ["train", "--mesh", "data=3", *TRAIN_TINY], 2, ["3"]),
    ("bad-prompt-tokens", ["sample", "--ckpt", "{model}", "--prompt-tokens", "1,x,3"], 2, ["'x'"]),
    ("prompt-token-out-of-vocab", ["sample", "--ckpt", "{model}", "--prompt-tokens", "1,99"], 2, ["99", "61"]),
    ("prompt-longer-than-cache", ["sample", "--ckpt", "{model}", "--prompt-tokens", ",".join(["1"] * 30),
                                  "--max-new-tokens", "2", "--cache-len", "24"], 2, ["--cache-len 24", "30 tokens"]),
    ("prompt-longer-than-cache-jax", ["sample", "--backend", "jax", "--ckpt", "{model}", "--prompt-tokens",
                                      ",".join(["1"] * 30), "--cache-len", "16"], 2, ["--cache-len 16", "30 tokens"]),
    ("mps-sample", ["sample", "--ckpt", "{model}", "--device", "mps"], 1, ["mps"]),
    ("mps-train", ["train", "--device", "mps"], 1, ["--device mps", "no MPS device"]),
    ("out-dir-holds-run", ["train", "--out-dir", "{held_run}", *TRAIN_TINY], 2, ["held_run", "--resume"]),
    ("resume-and-overwrite", ["train", "--resume", "--overwrite"], 2, ["contradict"]),
    # checkpoints
    ("ckpt-missing-sample", ["sample", "--ckpt", "/nonexistent/best.pt"], 1, ["/nonexistent/best.pt"]),
    ("ckpt-missing-train", ["train", "--ckpt", "/nonexistent/best.pt", *TRAIN_TINY], 1, ["/nonexistent/best.pt"]),
    ("ckpt-missing-convert", ["convert", "/nonexistent/best.pt", "{dst}"], 1, ["/nonexistent/best.pt"]),
    ("ckpt-truncated-st", ["sample", "--ckpt", "{truncated_safetensors}"], 1, ["truncated.safetensors"]),
    ("ckpt-garbage-st", ["convert", "{garbage_safetensors}", "{dst}"], 1, ["garbage.safetensors"]),
    ("ckpt-garbage-pt", ["sample", "--ckpt", "{garbage_pt}"], 1, ["garbage.pt"]),
    ("ckpt-truncated-pt", ["kv-mem", "--ckpt", "{truncated_pt}"], 1, ["truncated.pt"]),
    ("ckpt-empty-pt", ["sample", "--backend", "jax", "--ckpt", "{empty_pt}"], 1, ["empty.pt", "empty"]),
    ("ckpt-header-shape", ["sample", "--ckpt", "{wrongshape_safetensors}"], 1,
     ["wrongshape.safetensors", "tok_emb.weight", "(61, 20)", "(61, 22)"]),
    ("ckpt-header-dtype", ["convert", "{intdtype_safetensors}", "{dst}"], 1, ["intdtype.safetensors", "I32"]),
    ("ckpt-bad-json-config", ["sample", "--backend", "jax", "--ckpt", "{badjson_safetensors}"], 1,
     ["badjson.safetensors", "config"]),
    ("ckpt-dir-without-one", ["sample", "--ckpt", "{nockpt}"], 1, ["nockpt", "holds no checkpoint"]),
    ("ckpt-other-architecture", ["train", "--ckpt", "{model}", "--d-model", "32", "--data", "{tokens_npy}", *TRAIN_RUN], 2,
     ["d_model", "22", "32"]),
    ("ckpt-other-mode", ["train", "--ckpt", "{model}", "--attn-mode", "standard", "--data", "{tokens_npy}", *TRAIN_RUN], 2,
     ["attn_mode", "decoupled", "standard"]),
    # dba eval
    ("eval-bad-policy", ["eval", "--ckpt", "{model}", "--data", "{tokens_npy}", "--policies", "fp16;q3_k"], 2, ["q3_k"]),
    ("eval-no-data", ["eval", "--ckpt", "{model}"], 2, ["tiny.safetensors", "--data"]),
    ("eval-empty-data", ["eval", "--ckpt", "{model}", "--data", "{empty_npy}"], 2, ["empty.npy", "empty"]),
    ("eval-id-past-vocab", ["eval", "--ckpt", "{model}", "--data", "{big_id_npy}", "--split", "all"], 2,
     ["big_id.npy", "300", "vocab_size 61"]),
    ("eval-context-too-large", ["eval", "--ckpt", "{model}", "--data", "{tokens_npy}", "--contexts", "900000000"], 1,
     ["--contexts 900000000", "host"]),
    ("eval-data-too-short", ["eval", "--ckpt", "{model}", "--data", "{short_npy}", "--split", "all", "--contexts",
                             "64"], 2, ["40 tokens", "ctx + 1 = 65"]),
    ("eval-bad-task", ["eval", "--ckpt", "{model}", "--data", "{tokens_npy}", "--tasks", "ppl,needle"], 2, ["needle"]),
    ("eval-bad-contexts", ["eval", "--ckpt", "{model}", "--data", "{tokens_npy}", "--contexts", "1k,abc"], 2, ["abc"]),
    # --self-opt
    ("selfopt-budget-too-small", ["sample", "--ckpt", "{model}", "--prompt-tokens", "1,2", "--self-opt", "startup",
                                  "--self-opt-mem-budget-mb", "0.000001", "--self-opt-calib-tokens", "{tokens_npy}"], 1,
     ["no cache policy fits", "smallest candidate"]),
    ("selfopt-bad-kind", ["sample", "--ckpt", "{model}", "--self-opt", "startup", "--self-opt-v-kinds", "q4_0,q3"], 2,
     ["q3"]),
    ("selfopt-no-calibration", ["sample", "--ckpt", "{model}", "--prompt-tokens", "1,2", "--self-opt", "startup"], 2,
     ["calibration", "--self-opt-calib-tokens"]),
    ("selfopt-online-cache-len", ["sample", "--ckpt", "{model}", "--self-opt", "online", "--cache-len", "64"], 2,
     ["--cache-len"]),
    # other commands
    ("kvmem-bad-ctx", ["kv-mem", "--size", "small", "--ctx", "12q"], 2, ["12q"]),
    ("convert-bad-suffix", ["convert", "{model}", "out.onnx"], 2, ["out.onnx"]),
    ("convert-exists", ["convert", "{model}", "{model}"], 2, ["tiny.safetensors", "--overwrite"]),
    ("report-no-run", ["report", "/nonexistent/run"], 2, ["/nonexistent/run"]),
    ("bench-unknown", ["bench", "warp-speed"], 2, ["warp-speed"]),
]


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) if "{" in a else a for a in args]


@pytest.fixture(scope="module")
def results(files) -> dict[str, subprocess.CompletedProcess]:
    """Every case's command, run as independent processes a few at a time (most of each is the
    interpreter starting up, which uses one core)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(dba, *_fill(argv, files), cwd=files["cwd"]) for case, argv, _, _ in CASES}
    return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case,argv,code,needles", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line(case, argv, code, needles, files, results):
    r = results[case]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not any(files["cwd"].iterdir())  # a refused command writes nothing (no runs/ directory)
    if "held_run" in " ".join(argv):  # and never touches the run that was there
        assert (files["held_run"] / "train.jsonl").read_text() == '{"event": "meta"}\n'


def test_cases_are_distinct():
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({tuple(c[1]) for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(files):
    r = dba("sample", "--ckpt", str(files["garbage_pt"]), cwd=files["cwd"], debug=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "garbage.pt" in r.stderr


def test_code_in_a_pickle_never_runs(files, tmp_path):
    """A `.pt` whose unpickling would create a file, through every command that reads a `.pt`."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"config": {"d_model": 22}, "model": {"w": torch.ones(2)}, "x": Evil()}, evil)
    for argv in (["sample", "--ckpt", str(evil)], ["sample", "--backend", "jax", "--ckpt", str(evil)],
                 ["convert", str(evil), str(tmp_path / "out.safetensors")], ["kv-mem", "--ckpt", str(evil)],
                 ["train", "--ckpt", str(evil), *TRAIN_RUN]):
        r = dba(*argv, cwd=files["cwd"])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert "evil.pt" in lines[0] and not marker.exists(), (argv, lines[0])
    assert not (tmp_path / "out.safetensors").exists() and not any(files["cwd"].iterdir())
