"""`dba convert SRC DIR` (dba/hf_export.py, cli/convert.py) as files: which models export as
transformers' own Llama / Qwen2 and which carry dba's modeling code, the config.json and tensors
written, the remote code's own rules (self-contained, every ModelConfig field), the tokenizer
files, every bad destination or source a one-line error that writes nothing, and a failed write
that leaves nothing behind; `dba convert` without transformers or torch installed; and the
lm-evaluation-harness scoring both kinds of export with its `hf` model on a task read from a
local file, with dba's own log-likelihoods. What transformers computes from the exports is
parity_tests/test_hf_export.py."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.parity_cases import make_config, random_state
from cli.convert import is_directory_destination
from cli.main import main
from dba.config import ModelConfig
from dba.hf_config import canonical_to_hf
from dba.hf_export import REMOTE_DIR, REMOTE_FILES, byte_tokenizer_json, export, native_family
from dba.param_shapes import param_shapes, tied_aliases
from dba.weights import save_safetensors
from tests.support import ENV, REPO, write_hf_tokenizer

LLAMA = make_config("gqa", ("rms", "notemp", "untied", "llama3"), block_size=128)  # a Llama
DECOUPLED = make_config("decoupled", ("tie_qk", "null", "embed"), block_size=128)  # dba's own code
BYTE = json.dumps({"name": "byte", "vocab_size": 256})


def _src(d: Path, cfg: ModelConfig, seed: int = 0, **meta) -> tuple[Path, dict[str, np.ndarray]]:
    d.mkdir(parents=True, exist_ok=True)
    state = random_state(cfg, seed)
    return save_safetensors(d / "m.safetensors", cfg, state, meta), state


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ---- which kind of directory ---------------------------------------------------------------------

def test_native_family_says_what_transformers_lacks():
    assert native_family(LLAMA) == ("llama", [])
    assert native_family(make_config("standard", ("rms", "notemp", "bias"))) == ("llama", [])  # attention_bias
    assert native_family(make_config("bottleneck", ("rms", "notemp"))) == ("llama", [])  # head_dim 6 != 10
    assert native_family(make_config("gqa", ("rms", "notemp"), qkv_bias=True, attn_dim=60)) == ("qwen2", [])
    family, why = native_family(DECOUPLED)
    assert family is None and why == ["decoupled attention", "LayerNorm", "learned temperature", "null attention",
                                      "tied Q/K", "embedding bottleneck (embed_dim 46 != d_model 60)"]
    for cfg, reason in [
        (make_config("gqa", ("rms", "notemp", "gelu")), "gelu MLP"),
        (make_config("gqa", ("rms", "notemp", "norope")), "no RoPE"),
        (make_config("gqa", ("rms",)), "learned temperature"),
        (make_config("standard", ("notemp",)), "LayerNorm"),
        (make_config("gqa", ("rms", "notemp"), qkv_bias=True), "q/k/v biases (Qwen2) with head dim 6"),
        (make_config("gqa", ("rms", "notemp"), qkv_bias=True, mlp_bias=True, attn_dim=60), "and the MLP"),
        (make_config("gqa", ("rms", "notemp"), out_bias=True), "output projection only"),
    ]:
        family, why = native_family(cfg)
        assert family is None and len(why) == 1 and reason in why[0], (reason, why)


@pytest.mark.parametrize("dst", ["out", "llama-3.2-1b", "runs/x/hf"])
def test_directory_destinations(dst):
    assert is_directory_destination(Path(dst))


@pytest.mark.parametrize("dst", ["m.safetensors", "m.pt", "m.onnx", "m.bin", "M.PTH"])
def test_file_destinations(dst):
    assert not is_directory_destination(Path(dst))


# ---- what is written -------------------------------------------------------------------------------

def test_custom_export_files_config_and_tensors(tmp_path):
    src, state = _src(tmp_path, DECOUPLED)
    info = export(src, tmp_path / "hf")
    out = tmp_path / "hf"
    assert info["kind"] == "custom" and info["architecture"] == "DBAForCausalLM"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "configuration_dba.py", "generation_config.json",
                                                     "model.safetensors", "modeling_dba.py"]
    for f in REMOTE_FILES:  # the package data, byte for byte
        assert (out / f).read_bytes() == (REMOTE_DIR / f).read_bytes()
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["DBAForCausalLM"] and c["model_type"] == "dba"
    assert c["auto_map"] == {"AutoConfig": "configuration_dba.DBAConfig",
                             "AutoModelForCausalLM": "modeling_dba.DBAForCausalLM"}
    assert {k: c[k] for k in DECOUPLED.to_dict()} == DECOUPLED.to_dict()  # every field, as dba has it
    assert c["use_cache"] is False and c["torch_dtype"] == c["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {"use_cache": False}
    tensors, meta = _read(out / "model.safetensors")
    want = [n for n in param_shapes(DECOUPLED) if n not in tied_aliases(DECOUPLED)]  # tie_qk: Q once
    assert sorted(tensors) == sorted(want) and len(want) < len(param_shapes(DECOUPLED))
    for n in want:
        np.testing.assert_array_equal(tensors[n], state[n])
    assert meta["format"] == "pt" and ModelConfig.from_json(meta["dba_config"]) == DECOUPLED
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_native_export_files_config_and_tensors(tmp_path):
    src, state = _src(tmp_path, LLAMA)
    info = export(src, tmp_path / "hf")
    out = tmp_path / "hf"
    assert info["kind"] == "native" and info["architecture"] == "LlamaForCausalLM"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    c = json.loads((out / "config.json").read_text())
    assert {k: c[k] for k in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                              "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
                              "mlp_bias", "hidden_act", "torch_dtype", "dtype")} == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101, "hidden_size": 60,
        "intermediate_size": 74, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 6, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "float32",
        "dtype": "float32"}
    assert "auto_map" not in c
    tensors, meta = _read(out / "model.safetensors")
    assert meta == {"format": "pt"}
    assert sorted(tensors) == sorted(canonical_to_hf(n) for n in param_shapes(LLAMA))
    assert "lm_head.weight" in tensors and "model.layers.1.mlp.down_proj.weight" in tensors
    for n in param_shapes(LLAMA):
        np.testing.assert_array_equal(tensors[canonical_to_hf(n)], state[n])


@pytest.mark.parametrize("flag,st,name", [("bf16", "BF16", "bfloat16"), ("fp16", "F16", "float16")])
def test_dtype_flag(tmp_path, flag, st, name):
    src, state = _src(tmp_path, LLAMA)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--dtype", flag]) == 0
    tensors, _ = _read(tmp_path / "hf" / "model.safetensors")
    assert {np.dtype(a.dtype).name for a in tensors.values()} == {name}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == name


def test_remote_code_imports_torch_and_transformers_only():
    """The modeling files work where dba is not installed: the standard library, torch,
    transformers and each other (a relative import, as transformers' dynamic modules need)."""
    for f in REMOTE_FILES:
        tree = ast.parse((REMOTE_DIR / f).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in {m.removesuffix(".py") for m in REMOTE_FILES}, (f, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"math", "torch", "transformers"}, (f, roots)
    assert not (REMOTE_DIR / "__init__.py").exists()  # data: never a module of dba


def test_remote_config_has_every_model_config_field_and_default():
    tree = ast.parse((REMOTE_DIR / "configuration_dba.py").read_text())
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = [a.arg for a in init.args.args[1:]]
    defaults = dict(zip(args, (ast.literal_eval(d) for d in init.args.defaults)))
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert args[:len(fields)] == list(fields) and args[len(fields):] == ["use_cache"]
    assert {k: defaults[k] for k in fields} == fields


# ---- tokenizers ----------------------------------------------------------------------------------

def test_byte_tokenizer_json_is_dbas_byte_tokenizer():
    from tokenizers import Tokenizer

    from dba.data import ByteTokenizer

    tok = Tokenizer.from_str(json.dumps(byte_tokenizer_json()))
    assert tok.get_vocab_size() == 256
    for text in ["The with statement", "  two  spaces\tand\ttabs\n", "héllo wörld, 数学 🙂", "\x00\x7f~!"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ByteTokenizer().encode(text), text
        assert tok.decode(ids) == text


def test_tokenizer_files_travel(tmp_path):
    """A byte tokenizer is written; a recorded tokenizer.json is copied (found by its sha256 beside
    the source when the recorded path is gone), with a tokenizer_config.json naming the generic
    fast tokenizer; one with more ids than the model, or tiktoken's, is said and not written."""
    cfg = make_config("decoupled", (), vocab_size=256, block_size=128)
    src, _ = _src(tmp_path / "a", cfg, tokenizer=BYTE)
    info = export(src, tmp_path / "byte")
    assert "byte" in info["tokenizer"] and (tmp_path / "byte" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "byte" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert _read(tmp_path / "byte" / "model.safetensors")[1]["tokenizer"] == BYTE  # dba sample speaks text

    from dba.data import tokenizer_record

    (tmp_path / "b").mkdir()
    tj = write_hf_tokenizer(tmp_path / "b" / "orig.tokenizer.json")
    record = tokenizer_record(str(tj))
    src, _ = _src(tmp_path / "b", cfg, tokenizer=json.dumps(record))
    (tmp_path / "b" / "m.tokenizer.json").write_bytes(tj.read_bytes())
    tj.unlink()  # the recorded path is gone; the copy beside the export is the same file
    info = export(src, tmp_path / "hf_tok")
    assert (tmp_path / "hf_tok" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "m.tokenizer.json").read_bytes()
    (tmp_path / "b" / "m.tokenizer.json").write_text("{}")  # another file: not the one recorded
    info = export(src, tmp_path / "hf_none")
    assert "not on this machine" in info["tokenizer"] and not (tmp_path / "hf_none" / "tokenizer.json").exists()

    src, _ = _src(tmp_path / "c", make_config("decoupled", (), block_size=128), tokenizer=BYTE)  # vocab 101 < 256
    assert "more than the model's" in export(src, tmp_path / "small")["tokenizer"]
    src, _ = _src(tmp_path / "d", cfg.replace(vocab_size=50257), tokenizer=json.dumps({"name": "tiktoken", "encoding": "gpt2",
                                                              "vocab_size": 50257}))
    assert "tiktoken:gpt2 is not written" in export(src, tmp_path / "tik")["tokenizer"]


# ---- mistakes ------------------------------------------------------------------------------------

def _spoil(kind: str, tmp: Path, src: Path) -> tuple[list[str], str]:
    """(convert arguments, what the one line says) for one mistake."""
    out = tmp / "out"
    if kind == "not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return [str(src), str(out)], "already exists and is not empty (pass --overwrite"
    if kind == "overwrite-not-a-model":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return [str(src), str(out), "--overwrite"], "replaces a model directory only"
    if kind == "overwrite-holds-source":
        (tmp / "config.json").write_text("{}")
        return [str(src), str(tmp), "--overwrite"], "holds the source"
    if kind == "no-parent":
        return [str(src), str(tmp / "missing" / "out")], "does not exist"
    if kind == "dst-is-a-file":
        out.write_text("x")
        return [str(src), str(out)], "exists and is not a directory"
    if kind == "src-missing":
        return [str(tmp / "nothere.safetensors"), str(out)], "checkpoint not found"
    if kind == "src-garbage":
        bad = tmp / "garbage.safetensors"
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
        return [str(bad), str(out)], "garbage.safetensors"
    if kind == "src-no-checkpoint":
        (tmp / "run").mkdir()
        (tmp / "run" / "notes.txt").write_text("no weights")
        return [str(tmp / "run"), str(out)], "no config.json"
    if kind == "bad-suffix":
        return [str(src), str(tmp / "model.onnx")], "use a .pt or .safetensors name, or a directory"
    raise ValueError(kind)


MISTAKES = ["not-empty", "overwrite-not-a-model", "overwrite-holds-source", "no-parent", "dst-is-a-file",
            "src-missing", "src-garbage", "src-no-checkpoint", "bad-suffix"]


@pytest.mark.parametrize("kind", MISTAKES)
def test_mistakes_are_one_line_and_write_nothing(kind, tmp_path, capsys):
    src, _ = _src(tmp_path, DECOUPLED)
    argv, needle = _spoil(kind, tmp_path, src)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    code = main(["convert", *argv])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    after = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert after == before  # nothing written, nothing removed, no temporary left


def test_overwrite_replaces_a_model_directory_whole(tmp_path, capsys):
    src, _ = _src(tmp_path, DECOUPLED)
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "stale.txt").write_text("from before")
    src2, _ = _src(tmp_path / "b", LLAMA)
    assert main(["convert", str(src2), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "empty").mkdir()  # an existing empty directory needs no --overwrite
    assert main(["convert", str(src), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "modeling_dba.py").is_file()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A write that fails half-way (here: after the first tensor) leaves no directory and no
    temporary, and a directory being replaced is still there as it was."""
    import dba.hf_export as hx

    real = hx.write_streamed

    def failing(path, entries, read, metadata, on_tensor=None):
        def read_one_then_fail(name, seen=[]):  # noqa: B006 - a counter for this call
            if seen:
                raise OSError(28, "No space left on device")
            seen.append(name)
            return read(name)
        return real(path, entries, read_one_then_fail, metadata, on_tensor)

    monkeypatch.setattr(hx, "write_streamed", failing)
    src, _ = _src(tmp_path, DECOUPLED)
    with pytest.raises(Exception, match="No space left"):
        export(src, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    monkeypatch.setattr(hx, "write_streamed", real)
    export(src, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    monkeypatch.setattr(hx, "write_streamed", failing)
    with pytest.raises(Exception, match="No space left"):
        export(src, tmp_path / "hf", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.safetensors"]


def test_cli_says_what_it_wrote(tmp_path, capsys):
    src, _ = _src(tmp_path, DECOUPLED)
    assert main(["convert", str(src), str(tmp_path / "custom")]) == 0
    out = capsys.readouterr().out
    assert "DBAForCausalLM with its modeling code (decoupled attention, LayerNorm" in out
    assert "trust_remote_code=True" in out and "uncached" in out and "no tokenizer recorded" in out
    src, _ = _src(tmp_path / "b", LLAMA)
    assert main(["convert", str(src), str(tmp_path / "native")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM: transformers' own class" in out and "F32" in out


def test_custom_export_reads_back_into_dba(tmp_path):
    """A custom-code directory converts back to dba's export: the same config and tensors (the
    tied K, stored once, is the Q tensor again under both names)."""
    from dba.weight_files import read_weights

    src, state = _src(tmp_path, DECOUPLED)
    export(src, tmp_path / "hf")
    for path in (tmp_path / "hf" / "model.safetensors", tmp_path / "back.safetensors"):
        if path.name == "back.safetensors":
            assert main(["convert", str(tmp_path / "hf"), str(path)]) == 0
        cfg, got, _ = read_weights(path)
        assert cfg == DECOUPLED and sorted(got) == sorted(state)
        for k in state:
            np.testing.assert_array_equal(got[k], state[k])


def test_custom_export_samples_with_dba(tmp_path, capsys):
    """The custom export's model.safetensors carries dba's config and tokenizer record, so dba reads
    it as it reads its own export."""
    cfg = make_config("decoupled", ("null", "tie_qk"), vocab_size=256, block_size=128)
    src, _ = _src(tmp_path, cfg, tokenizer=BYTE)
    export(src, tmp_path / "hf")
    code = main(["sample", "--ckpt", str(tmp_path / "hf" / "model.safetensors"), "--backend", "torch", "--prompt",
                 "hello", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("hello")


# ---- without transformers ------------------------------------------------------------------------

_BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "jax", "flax", "tokenizers"):
            raise ImportError("blocked by the test: " + name)
sys.meta_path.insert(0, Block())
from cli.main import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [DECOUPLED, LLAMA], ids=["custom", "native"])
def test_convert_needs_neither_transformers_nor_torch(cfg, tmp_path):
    src, _ = _src(tmp_path, cfg)
    r = subprocess.run([sys.executable, "-c", _BLOCKED, str(src), str(tmp_path / "hf")], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and "wrote" in r.stdout


# ---- lm-evaluation-harness -----------------------------------------------------------------------

TASK_YAML = """task: dba_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "banana", "seven"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "blue", "Tuesday"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["cold", "loud", "green"], "answer": 0},
    {"question": "A dog says", "choices": ["woof", "meow", "moo"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Rankine"], "answer": 0},
]


def lm_eval_command(model_dir: Path, task_dir: Path, out: Path, *, remote: bool) -> list[str]:
    """The README's command: the harness's `hf` model on the local task (dba's byte tokenizer has no
    BOS/EOS token, so the harness's loglikelihood prefix is named: byte 10, a newline)."""
    args = f"pretrained={model_dir}" + (",trust_remote_code=True" if remote else "") + ",prefix_token_id=10"
    return ["lm_eval", "--model", "hf", "--model_args", args, "--tasks", "dba_tiny_mc", "--include_path",
            str(task_dir), "--device", "cpu", "--batch_size", "4", "--output_path", str(out), "--log_samples"]


def _dba_loglikelihood(tm, context: str, continuation: str) -> float:
    import torch

    ids = list((context + continuation).encode())
    n = len(continuation.encode())
    with torch.no_grad():
        logp = torch.log_softmax(tm(np.asarray(ids[:-1])[None])[0], -1)
    return float(sum(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]] for i in range(n)))


@pytest.mark.slow
def test_lm_eval_harness_scores_both_exports_as_dba_does(tmp_path):
    """`lm_eval --model hf` on a custom-code export (trust_remote_code) and on a native Llama one,
    on a multiple-choice task defined by a local YAML file over a local jsonl: the harness's
    per-choice log-likelihoods are dba's own (torch_ref, fp32) and its accuracy follows from them."""
    import torch_ref

    task = tmp_path / "task"
    task.mkdir()
    (task / "tiny_mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (task / "tiny_mc.yaml").write_text(TASK_YAML.format(data=task / "tiny_mc.jsonl"))
    models = {"custom": make_config("decoupled", ("tie_qk", "null"), vocab_size=256, block_size=128),
              "native": make_config("gqa", ("rms", "notemp", "llama3"), vocab_size=256, block_size=128)}
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"),
               HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    runs = {}
    for kind, cfg in models.items():
        src, _ = _src(tmp_path / kind, cfg, seed=len(kind), tokenizer=BYTE)
        assert export(src, tmp_path / kind / "hf")["kind"] == kind
        cmd = lm_eval_command(tmp_path / kind / "hf", task, tmp_path / kind / "out", remote=kind == "custom")
        runs[kind] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    for kind, proc in runs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-4000:]
        table = [line for line in log.splitlines() if line.startswith("|")]
        print(f"\n{kind}:\n" + "\n".join(table))
        assert any("dba_tiny_mc" in line and "acc" in line for line in table), log[-2000:]
        (results,) = (tmp_path / kind / "out").rglob("results_*.json")
        (samples,) = (tmp_path / kind / "out").rglob("samples_dba_tiny_mc_*.jsonl")
        tm = torch_ref.load(tmp_path / kind / "m.safetensors", device="cpu")
        correct, worst = [], 0.0
        for line in samples.read_text().splitlines():
            rec = json.loads(line)
            q = QUESTIONS[rec["doc_id"]]
            got = [float(r[0]) for r in rec["filtered_resps"]]
            want = [_dba_loglikelihood(tm, q["question"], " " + c) for c in q["choices"]]
            worst = max(worst, float(np.abs(np.subtract(got, want)).max()))
            correct.append(float(np.argmax(want) == q["answer"]))
        print(f"{kind}: max |harness - dba| log-likelihood {worst:.2e}")
        assert worst <= 1e-3
        acc = json.loads(results.read_text())["results"]["dba_tiny_mc"]["acc,none"]
        assert acc == pytest.approx(np.mean(correct))
