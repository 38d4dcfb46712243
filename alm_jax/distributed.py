"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the environment.

Call `initialize_distributed()` FIRST, before anything touches a JAX device (`jax.devices()`, creating an
array, jit): JAX fixes the set of devices when its backend starts, and a process that started it alone
cannot join a cluster afterwards.

Detection order for `mode="auto"`:
1. explicit arguments, or the env `JAX_COORDINATOR_ADDRESS` (+ `JAX_COORDINATOR_PORT` when the address
   has no port) + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` (+ optional `JAX_LOCAL_DEVICE_IDS="0,1"`);
2. SLURM with more than one task (`SLURM_NTASKS` > 1, `SLURM_PROCID`): JAX reads the rest from SLURM
   (coordinator: the first node of the step, port from the job id or `JAX_COORDINATOR_PORT`). JAX then
   gives each task ONE local GPU (`SLURM_LOCALID`), right for one task per GPU; for one task per node
   set `JAX_LOCAL_DEVICE_IDS=0,...,7` (`launch/gpu_slurm.sbatch` does), which every method honours;
3. Open MPI with more than one rank (`OMPI_COMM_WORLD_SIZE` > 1);
4. a Cloud TPU VM (libtpu installed and a TPU device node or TPU worker env): JAX asks the TPU metadata;
5. otherwise a single process: nothing to do.

CPU clusters (tests, `launch/local_multihost.sh`): cross-process collectives on CPU need the Gloo
implementation (`jax_cpu_collectives_implementation="gloo"`). It is the default in jax 0.10.x; this
module sets it when a jax version reports none. Each process then sees its own local CPU devices
(`--xla_force_host_platform_device_count`) and `jax.devices()` lists all of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Literal, Sequence

import jax

from alm_jax.errors import ConfigError

_INITIALIZED = False
_METHOD = "single"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str
    method: str          # how the cluster was found: explicit | slurm | openmpi | tpu | single | off



def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} must be an integer") from None


def _on_tpu_vm() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    if any(os.environ.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "MEGASCALE_COORDINATOR_ADDRESS")):
        return True
    return Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()


def detect_cluster() -> str:
    """Which launcher this process runs under: explicit | slurm | openmpi | tpu | single (env only)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    if _on_tpu_vm():
        return "tpu"
    return "single"


def _local_device_ids_env() -> list[int] | None:
    v = os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if not v:
        return None
    try:
        return [int(x) for x in v.split(",")]
    except ValueError:
        raise ConfigError(f"JAX_LOCAL_DEVICE_IDS={v!r} must be comma-separated device numbers, e.g. 0,1,2,3") from None


def _explicit_args(coordinator, num_processes, process_id, local_device_ids):
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    port = os.environ.get("JAX_COORDINATOR_PORT")
    if coordinator and ":" not in coordinator.rsplit("]", 1)[-1] and port:
        coordinator = f"{coordinator}:{port}"
    num_processes = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
    if local_device_ids is None:
        local_device_ids = _local_device_ids_env()
    missing = [n for n, v in (("coordinator (JAX_COORDINATOR_ADDRESS host:port)", coordinator),
                              ("num_processes (JAX_NUM_PROCESSES)", num_processes),
                              ("process_id (JAX_PROCESS_ID)", process_id)) if v is None]
    if missing:
        raise ConfigError(f"explicit distributed init needs {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    return dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                local_device_ids=local_device_ids)


def _ensure_cpu_collectives():
    try:
        if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "none", ""):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError):  # pragma: no cover - option renamed/removed in some version
        pass


def initialize_distributed(mode: Literal["auto", "off", "explicit"] = "auto", coordinator: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: int | Sequence[int] | None = None) -> ProcessInfo:
    """Joins the JAX cluster this process belongs to (see the module docstring); returns `process_info()`.

    Call it before any other JAX operation. `mode="off"` never initializes; `"explicit"` requires the
    coordinator, process count and id (arguments or JAX_* env); `"auto"` detects. A single process is a
    no-op. Calling it again after a successful initialization is a no-op."""
    global _INITIALIZED, _METHOD
    if mode not in ("auto", "off", "explicit"):
        raise ConfigError(f"distributed mode {mode!r}: choose one of auto, off, explicit")
    if _INITIALIZED:
        return process_info()
    if mode == "off":
        _METHOD = "off"
        return process_info()
    explicit_given = any(v is not None for v in (coordinator, num_processes, process_id))
    method = "explicit" if mode == "explicit" or explicit_given else detect_cluster()
    kwargs: dict = {}
    if method == "explicit":
        kwargs = _explicit_args(coordinator, num_processes, process_id, local_device_ids)
        if kwargs["num_processes"] == 1:
            method = "single"
    else:
        if local_device_ids is None:
            local_device_ids = _local_device_ids_env()
        if local_device_ids is not None:
            kwargs["local_device_ids"] = local_device_ids
    if method == "single":
        _METHOD = method
        return process_info()
    _ensure_cpu_collectives()
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed ({method}): {e}. It must run before any "
                           "other JAX operation; call initialize_distributed() first thing in main().") from e
    _INITIALIZED, _METHOD = True, method
    return process_info()


def process_info() -> ProcessInfo:
    """This process's place in the cluster (starts the JAX backend if it is not started yet)."""
    return ProcessInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                       local_device_count=jax.local_device_count(), device_count=jax.device_count(),
                       platform=jax.devices()[0].platform, method=_METHOD)


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes metrics and prints progress."""
    return jax.process_index() == 0
