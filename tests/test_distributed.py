"""Two JAX processes on localhost (4 CPU devices each) form one 8-device cluster: a jitted computation over
a global mesh gives the single-process 8-device result; the preemption flag and checkpoints agree."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alm_jax.errors import ConfigError
from alm_jax import distributed

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    from alm_jax.distributed import initialize_distributed, is_main_process
    mode, ckpt_dir = sys.argv[1], sys.argv[2]
    if mode == "args":        # coordinator etc. as arguments
        info = initialize_distributed("explicit", coordinator=sys.argv[3], num_processes=2, process_id=int(sys.argv[4]))
    else:                     # "auto" (JAX_* variables, detected) or "off" (the single-process reference)
        info = initialize_distributed(mode)

    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from alm_jax.sharding import make_mesh, batch_sharding
    from alm_jax.training.checkpoint import Checkpointer, PreemptionGuard, abstract_with_shardings

    mesh = make_mesh(8, 1, 1)
    x_global = (np.arange(16 * 6, dtype=np.float32).reshape(16, 6) - 40.0) / 17.0
    w = np.linspace(-1.0, 1.0, 18, dtype=np.float32).reshape(6, 3)
    rows = 16 // jax.process_count()
    x_local = x_global[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    x = jax.make_array_from_process_local_data(batch_sharding(mesh, 2), x_local)
    w = jax.device_put(w, NamedSharding(mesh, P()))

    @jax.jit
    def f(x, w):
        h = jnp.tanh(x @ w)
        return jnp.mean(h ** 2), h.sum(axis=1)        # a global reduction + a batch-sharded output

    loss, per_row = f(x, w)
    loss.block_until_ready()
    per_row = multihost_utils.process_allgather(per_row, tiled=True)

    # preemption: only process 1 is "signalled", at step 3; every process must stop at step 3
    stop_at = None
    with PreemptionGuard() as guard:
        for step in range(1, 6):
            if step == 3 and jax.process_index() == jax.process_count() - 1:
                guard.requested = True
            if guard.should_stop(step):
                stop_at = step
                break

    # checkpoint a sharded global array plus per-process Grain-style state, restore, compare
    state = {"x": x, "w": w}
    ck = Checkpointer(ckpt_dir, async_save=True)
    ck.save(stop_at, state, data_state={"process": jax.process_index(), "pos": 7}, force=True)
    ck.wait()
    restored, data_state = ck.restore(None, abstract_with_shardings(state))
    ck.close()
    same = bool(np.array_equal(multihost_utils.process_allgather(restored["x"], tiled=True), x_global))
    print("RESULT " + json.dumps(dict(info=info.__dict__, loss=float(np.asarray(loss.addressable_data(0))),
                                      per_row=np.asarray(per_row).tolist(), stop_at=stop_at,
                                      restored_equal=same, data_state=data_state,
                                      main=is_main_process())), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _results(procs, timeout=120):
    """Each worker's RESULT dict; the first failure (or the timeout) kills the rest, which would
    otherwise wait for their peer until JAX's 300 s initialization timeout."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            bad = [p for p in procs if p.poll() not in (None, 0)]
            if bad:
                pytest.fail(f"a worker failed (rc {bad[0].returncode}):\n{bad[0].stderr.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"workers timed out after {timeout}s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err[-3000:]
        line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    return results


def test_two_processes_match_one_process_with_8_devices(tmp_path):
    port = _free_port()
    coord = f"127.0.0.1:{port}"
    run = lambda args, env: subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p0 = run(["args", str(tmp_path / "multi"), coord, "0"], _env(4))
    p1 = run(["auto", str(tmp_path / "multi")],
             _env(4, JAX_COORDINATOR_ADDRESS="127.0.0.1", JAX_COORDINATOR_PORT=str(port),
                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"))
    single = run(["off", str(tmp_path / "single")], _env(8))
    r0, r1, ref = _results([p0, p1, single])

    for i, r in enumerate((r0, r1)):
        assert r["info"] == dict(process_index=i, process_count=2, local_device_count=4, device_count=8,
                                 platform="cpu", method="explicit")
        assert r["main"] == (i == 0)
        # the cross-process (Gloo) all-reduce sums in another order than the in-process one: ~1 ulp
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        assert r["per_row"] == ref["per_row"]        # no cross-device reduction: bit-identical
        assert r["stop_at"] == 3                     # the flag raised on process 1 stops both
        assert r["restored_equal"]
        assert r["data_state"] == {"process": 0, "pos": 7}   # the JSON data state is process 0's
    assert ref["info"]["method"] == "off" and ref["info"]["device_count"] == 8
    assert ref["stop_at"] == 3 and ref["restored_equal"]


def test_detection_and_explicit_arguments(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_")):
            monkeypatch.delenv(k)
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.detect_cluster() == "single"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.detect_cluster() == "single"          # one SLURM task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detect_cluster() == "slurm"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed.detect_cluster() == "openmpi"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.detect_cluster() == "explicit"
    assert distributed._explicit_args(None, None, None, None) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=None)
    monkeypatch.setenv("JAX_PROCESS_ID", "4")
    with pytest.raises(ConfigError, match="process_id=4 must be in"):
        distributed._explicit_args(None, None, None, None)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with pytest.raises(ConfigError, match="needs coordinator"):
        distributed.initialize_distributed("explicit")
    with pytest.raises(ConfigError, match="choose one of"):
        distributed.initialize_distributed("slurm")
    # explicit with one process is a no-op (no coordinator service is started)
    info = distributed.initialize_distributed("explicit", coordinator="127.0.0.1:1", num_processes=1, process_id=0)
    assert info.process_count == 1 and distributed.is_main_process()
