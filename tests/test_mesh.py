"""Scale-out: the sharding rules, `--mesh` and multi-host flags, and multi-device training.

Multi-device runs need XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX is imported,
and this pytest process already has JAX with one device, so they run in subprocesses: the cases of
tests/multidevice_cases.py under a child pytest (8 devices), and `dba train` itself, once as two
processes (2 devices each) joined by --coordinator and then resumed on one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dba.errors import UserError
from train import distributed, sharding
from dba.runlog import read_events

REPO = Path(__file__).resolve().parents[1]
# LLVM optimisation only speeds up the generated code; these runs are dominated by compiling.
FAST_XLA = "--xla_backend_optimization_level=0"


def env_with_devices(n: int) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={n} {FAST_XLA}")


# ---- the logical-axis rules (pure: no devices needed) -----------------------------------------

def names(*parts):
    return [str(p) for p in parts]


@pytest.mark.parametrize("path,shape,spec", [
    (("tok_emb", "embedding"), (104, 24), P("fsdp", None)),            # vocab
    (("tok_emb", "embedding"), (97, 24), P(None, "fsdp")),             # vocab indivisible: embed_dim
    (("tok_emb", "embedding"), (97, 30), P()),                         # nothing divides: replicated
    (("blocks", 0, "ff", "w1", "kernel"), (40, 88), P(None, "fsdp")),  # d_ff
    (("blocks", 0, "ff", "w3", "kernel"), (88, 40), P("fsdp", None)),
    (("blocks", 0, "ff", "w2", "kernel"), (40, 88), P(None, "fsdp")),  # swiglu: (d_model, d_ff)
    (("blocks", 0, "attn", "q_sem", "kernel"), (40, 16), P(None, "fsdp")),
    (("blocks", 0, "attn", "v_proj", "kernel"), (40, 36), P("fsdp", None)),  # width indivisible: d_model
    (("blocks", 0, "attn", "out_proj", "kernel"), (40, 40), P("fsdp", None)),
    (("emb_in", "kernel"), (24, 40), P("fsdp", None)),
    (("blocks", 0, "ln1", "scale"), (40,), P()),
    (("blocks", 0, "attn", "logit_scale"), (4,), P()),
    (("blocks", 0, "attn", "v_null"), (1, 1, 40), P()),
    # an optimizer moment follows its parameter; counts and hyperparameters are scalars
    ((1, "inner_state", 0, "mu", "blocks", 0, "ff", "w1", "kernel"), (40, 88), P(None, "fsdp")),
    ((1, "count"), (), P()),
])
def test_spec_for(path, shape, spec):
    assert sharding.spec_for(names(*path), shape, 8) == spec
    assert sharding.spec_for(names(*path), shape, 1) == P()  # no fsdp axis: all replicated


def test_gelu_w2_is_split_along_d_ff():
    assert sharding.spec_for(names("ff", "w2", "kernel"), (88, 40), 8, mlp="gelu") == P("fsdp", None)


def test_rules_cover_every_parameter_of_the_model():
    """Every 2-D parameter of every attention mode has a rule (a new layer must add one)."""
    import jax
    from flax import nnx

    import jax_model
    from dba.config import ModelConfig

    for mode, extra in (("decoupled", {"sem_dim": 16, "geo_dim": 24}), ("gqa", {"kv_head": 2}),
                        ("standard", {}), ("bottleneck", {"null_attn": True})):
        cfg = ModelConfig(vocab_size=104, block_size=16, n_layer=1, n_head=4, d_model=40, d_ff=88, embed_dim=24,
                          attn_mode=mode, attn_dim=40, **extra)
        _, params, _ = nnx.split(jax_model.DBAModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            n = sharding.path_names(path)
            if x.ndim == 2:
                assert sharding.spec_for(n, x.shape, 8) != P(), (mode, n, x.shape)


@pytest.mark.parametrize("text,needle", [
    ("data=4,fsdp", "expected AXIS=SIZE"),
    ("tensor=2", "unknown axis 'tensor'"),
    ("data=2,data=4", "given twice"),
    ("fsdp=0", "positive integer"),
    ("fsdp=x", "positive integer"),
    ("data=-1,fsdp=-1", "at most one axis"),
])
def test_parse_mesh_errors(text, needle):
    with pytest.raises(UserError) as e:
        sharding.parse_mesh(text)
    assert needle in str(e.value) and "\n" not in str(e.value) and e.value.code == 2


def test_parse_and_resolve_mesh():
    assert sharding.parse_mesh(None) == {} and sharding.parse_mesh("1") == {}
    assert sharding.parse_mesh(" data=4, fsdp=2 ") == {"data": 4, "fsdp": 2}
    assert sharding.resolve_mesh({}, 8) == {"data": 1, "fsdp": 1}  # no mesh: one device
    assert sharding.resolve_mesh({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8}
    with pytest.raises(UserError, match="multiply to 4 but 8 devices"):
        sharding.resolve_mesh({"data": 4}, 8)
    with pytest.raises(UserError, match=r"--batch-size 12 is not divisible .*data=4 x fsdp=2 = 8"):
        sharding.check_batch({"data": 4, "fsdp": 2}, 12)
    sharding.check_batch({"data": 4, "fsdp": 2}, 16)


# ---- multi-host start (flags and cluster variables; nothing is initialised here) ----------

def test_init_args_from_flags_and_clusters():
    assert distributed.init_args(None, None, None, environ={}) is None
    assert distributed.init_args("10.0.0.1:1234", 4, 3, environ={}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert distributed.cluster_env(slurm) == "slurm" and distributed.init_args(None, None, None, slurm) == {}
    assert distributed.cluster_env({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: no coordinator
    assert distributed.cluster_env({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
    assert distributed.cluster_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert distributed.cluster_env({"TPU_WORKER_HOSTNAMES": "a"}) is None
    plain = {"JAX_COORDINATOR_ADDRESS": "h:1", "DBA_NUM_PROCESSES": "2", "DBA_PROCESS_ID": "1"}
    assert distributed.init_args(None, None, None, plain) == {"coordinator_address": "h:1", "num_processes": 2,
                                                              "process_id": 1}


@pytest.mark.parametrize("args,needle", [
    (("h:1", None, 0), "missing --num-processes"),
    (("h", 2, 0), "expected HOST:PORT"),
    (("h:1", 2, 2), "--process-id must be in [0, --num-processes)"),
])
def test_init_args_errors(args, needle):
    with pytest.raises(UserError) as e:
        distributed.init_args(*args, environ={})
    assert needle in str(e.value)


# ---- `dba train` errors: one line, before anything is compiled ------------------------------

TOY = ["--data-format", "npy", "--vocab-size", 97, "--attn-mode", "decoupled", "--d-model", 40, "--layers", 1,
       "--n-head", 4, "--d-ff", 88, "--attn-dim", 40, "--sem-dim", 16, "--geo-dim", 24, "--embed-dim", 24,
       "--train-seq-len", 16, "--batch-size", 8, "--eval-iters", 2, "--log-every", 1, "--live", "basic"]


def dba_train(*args, devices=1, cwd=None, **popen):
    cmd = [sys.executable, "-m", "cli", "train", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd or REPO, env=env_with_devices(devices), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd or REPO, env=env_with_devices(devices), capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("args,devices,needle", [
    (["--mesh", "data=8", "--batch-size", 12], 1, "--batch-size 12 is not divisible by the mesh's batch axes"),
    (["--mesh", "model=2"], 1, "unknown axis 'model'"),
    (["--coordinator", "localhost:1"], 1, "missing --num-processes, --process-id"),
    (["--mesh", "data=4,fsdp=4", "--batch-size", 16], 8,
     "--mesh data=4,fsdp=4: the axes multiply to 16 but 8 devices are available"),
])
def test_bad_mesh_one_line(args, devices, needle, data, tmp_path):
    r = dba_train("--data", data, *TOY, *args, "--out-dir", tmp_path / "x", devices=devices)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr
    assert "compiled" not in r.stdout and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bench_mesh_errors_one_line():
    r = subprocess.run([sys.executable, "-m", "cli", "bench", "train", "--mesh", "1", "--mesh", "data=3"],
                       cwd=REPO, env=env_with_devices(1), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--batch-size 8 is not divisible by the mesh's batch axes (data=3 = 3)" in r.stderr


# ---- multi-device cases (8 fake devices, in a child pytest) ---------------------------------

@pytest.mark.multidevice
@pytest.mark.slow
def test_multidevice_cases():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                        str(REPO / "tests" / "multidevice_cases.py")], cwd=REPO, env=env_with_devices(8),
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


# ---- multi-host: two `dba train` processes joined by --coordinator, resumed on one device -----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_then_resume_on_one_device(data, tmp_path):
    common = ["--data", data, *TOY, "--eval-every", 0, "--seed", 3]
    multi, ref = tmp_path / "multi", tmp_path / "ref"
    port = free_port()
    procs = [dba_train(*common, "--steps", 3, "--out-dir", multi, "--mesh", "data=2,fsdp=2",
                       "--coordinator", f"localhost:{port}", "--num-processes", 2, "--process-id", i,
                       devices=2, bufsize=1) for i in (0, 1)]
    procs.append(dba_train(*common, "--steps", 4, "--out-dir", ref, "--live", "off", devices=1, bufsize=1))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], "\n---\n".join(o[-3000:] for o in outs)
    assert "mesh data=2,fsdp=2 over 4 devices on 2 processes" in outs[0]
    assert "dba train" not in outs[1]  # only process 0 reports and writes the run directory
    metas = read_events(multi / "train.jsonl", "meta")
    assert len(metas) == 1 and metas[0]["mesh"] == {"data": 2, "fsdp": 2} and metas[0]["process_count"] == 2
    ckpt_meta = json.loads(next((multi / "checkpoints" / "last").glob("3/meta/*")).read_text())
    assert ckpt_meta["devices"] == {"mesh": {"data": 2, "fsdp": 2}, "device_count": 4, "platform": "cpu",
                                    "process_count": 2}

    # the sharded checkpoint of two processes resumes in one process on one device
    r = dba_train("--out-dir", multi, "--resume", "--steps", 4)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "written on mesh data=2,fsdp=2: resharded onto 1" in r.stdout
    got = {e["step"]: e["loss"] for e in read_events(multi / "train.jsonl", "train")}
    want = {e["step"]: e["loss"] for e in read_events(ref / "train.jsonl", "train")}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-4)
    got_eval = read_events(multi / "train.jsonl", "eval")[-1]
    want_eval = read_events(ref / "train.jsonl", "eval")[-1]
    assert got_eval["step"] == want_eval["step"] == 4
    np.testing.assert_allclose(got_eval["val_loss"], want_eval["val_loss"], rtol=1e-4)
