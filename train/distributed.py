"""Multi-host start for `dba train`: `jax.distributed.initialize` before JAX touches a device.

One `dba train` process runs per host (or per GPU/TPU host slice). They become one JAX program
when either the flags `--coordinator HOST:PORT --num-processes N --process-id I` are given, or a
cluster environment says this process is one of several:

- Slurm (`srun` with more than one task: SLURM_NTASKS > 1 and the step's variables),
- Open MPI (`mpirun`: OMPI_MCA_orte_hnp_uri with OMPI_COMM_WORLD_SIZE > 1),
- Cloud TPU pods (TPU_WORKER_HOSTNAMES naming more than one worker),
- plain variables JAX_COORDINATOR_ADDRESS + DBA_NUM_PROCESSES + DBA_PROCESS_ID (any launcher).

JAX's own cluster detection then fills in the coordinator, process count and id. After that,
`jax.devices()` lists every host's devices, the `--mesh` spans them all, each host feeds its rows
of the batch, all hosts write their shards of each checkpoint, and only process 0 writes the run
directory's logs, exports and summary (`is_main`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from dba.errors import UserError

_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int_env(env: dict[str, str], name: str, default: int = -1) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        return default


def cluster_env(environ: dict[str, str] | None = None) -> str | None:
    """The launcher whose variables make this one process of several, or None.

    A single-task allocation (an interactive `srun`, `mpirun -n 1`) is not a cluster: starting a
    coordinator for one process only adds a port and a timeout.
    """
    env = os.environ if environ is None else environ

    def num(k: str) -> int:
        return int(env[k]) if str(env.get(k, "")).isdigit() else 0

    if all(k in env for k in _SLURM) and num("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and num("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu"
    if env.get("JAX_COORDINATOR_ADDRESS") and "DBA_NUM_PROCESSES" in env and "DBA_PROCESS_ID" in env:
        return "env"
    return None


def init_args(coordinator: str | None, num_processes: int | None, process_id: int | None,
              environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """kwargs for `jax.distributed.initialize`, {} to let JAX detect the cluster, or None (one process).

    One-line UserErrors for incomplete or impossible flags (checked before JAX is imported)."""
    env = os.environ if environ is None else environ
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"multi-host start needs --coordinator, --num-processes and --process-id together; "
                            f"missing {', '.join(missing)}")
        host, _, port = str(coordinator).rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0, e.g. 10.0.0.1:1234")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in [0, --num-processes), got {process_id} of {num_processes}")
        return {"coordinator_address": str(coordinator), "num_processes": int(num_processes),
                "process_id": int(process_id)}
    kind = cluster_env(env)
    if kind is None:
        return None
    if kind == "env":
        n, i = _int_env(env, "DBA_NUM_PROCESSES"), _int_env(env, "DBA_PROCESS_ID")
        if n < 1 or not 0 <= i < n:
            raise UserError(f"DBA_PROCESS_ID={env.get('DBA_PROCESS_ID')!r} / DBA_NUM_PROCESSES="
                            f"{env.get('DBA_NUM_PROCESSES')!r}: need 0 <= id < count")
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n, "process_id": i}
    return {}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> dict[str, Any] | None:
    """Join the multi-process JAX program if asked to (flags or cluster variables); returns the
    arguments used, or None for a single-process run. Must run before any JAX computation."""
    kwargs = init_args(coordinator, num_processes, process_id)
    if kwargs is None:
        return None
    import jax

    if jax.distributed.is_initialized():  # an in-process caller already did it
        return kwargs
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = kwargs.get("coordinator_address", "the detected cluster")
        raise UserError(f"jax.distributed.initialize ({where}) failed: {first}", 1) from None
    return kwargs


def _joined() -> bool:
    """This process joined a multi-process JAX program (`initialize`). Asking JAX for the process
    index otherwise would start a backend, which must not happen before the platform is checked."""
    if "jax" not in sys.modules:
        return False
    import jax

    return bool(jax.distributed.is_initialized())


def process_index() -> int:
    if not _joined():
        return 0
    import jax

    return int(jax.process_index())


def process_count() -> int:
    """The number of processes of the JAX program (1 for a single-process run)."""
    if not _joined():
        return 1
    import jax

    return int(jax.process_count())


def is_main() -> bool:
    """Process 0 writes logs, exports and summaries; every process takes part in the steps,
    evaluations and (sharded) checkpoint writes."""
    return process_index() == 0


def host_params(tree: Any) -> Any:
    """Host copies (numpy) of a possibly sharded tree: every process must call it when the arrays
    span several processes (it all-gathers); on one process it is a plain device_get."""
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def agree(value: int) -> int:
    """The largest of every process's `value` (e.g. a stop signal that reached one host only).
    A collective: every process must call it at the same point."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.asarray(multihost_utils.process_allgather(np.int32(value))).max())


class Silent:
    """Stands in for the event log, display and analysis store on processes other than 0: every
    method is accepted and does nothing (returns None)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
