"""Two training processes on localhost (jax.distributed, 4 CPU devices each, mesh (8,1,1)) train the tiny setup
for 5 steps and checkpoint; a single process with 8 devices, reading the same 2 data shards, trains on the same
global batches row for row and gets the same losses (the cross-process all-reduce sums in another order)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


HERE = Path(__file__).parent
ROOT = HERE.parent
TIMEOUT = 300   # s, for all three processes together


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _start(tiny, run_dir: Path, out: Path, env: dict, *args) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "run_tiny_train.py"), str(tiny / "paths.json"), str(run_dir), str(out), "none",
           "--record-rows", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", "steps=5", *args]
    log = open(out.with_suffix(".log"), "w")         # a file, not a pipe: a full pipe would block the child
    p = subprocess.Popen(cmd, env=env, text=True, stdout=log, stderr=subprocess.STDOUT)
    p.log_path = Path(log.name)
    log.close()
    return p


def _wait_all(procs: dict[str, subprocess.Popen], timeout: float = TIMEOUT) -> None:
    """Waits for every process; the first failure (or the deadline) kills the others, which would
    otherwise wait for their peer until JAX's own 300 s timeouts."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs.values()):
            bad = {n: p for n, p in procs.items() if p.poll() not in (None, 0)}
            if bad:
                name, p = next(iter(bad.items()))
                pytest.fail(f"{name} failed (rc {p.returncode}):\n{p.log_path.read_text()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"training processes timed out after {timeout} s")
            time.sleep(0.25)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{p.log_path.read_text()[-4000:]}"


def _load(path: Path) -> dict:
    r = json.loads(path.read_text())
    r["losses"] = {int(k): v for k, v in r["losses"].items()}
    r["rows"] = {int(k): v for k, v in r["rows"].items()}
    return r


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_like_one_process_with_8_devices(tiny, tmp_path):
    coord = f"127.0.0.1:{_free_port()}"
    multi = tmp_path / "multi"           # one run directory shared by both processes (checkpoints, metrics)
    procs = {f"process {i}": _start(tiny, multi, tmp_path / f"p{i}.json",
                                    _env(4, JAX_COORDINATOR_ADDRESS=coord, JAX_NUM_PROCESSES="2",
                                         JAX_PROCESS_ID=str(i)), "--distributed")
             for i in range(2)}
    procs["single"] = _start(tiny, tmp_path / "single", tmp_path / "single.json", _env(8), "--data-shards=2")
    _wait_all(procs)
    p0, p1, single = (_load(tmp_path / f) for f in ("p0.json", "p1.json", "single.json"))

    assert (p0["process_index"], p0["process_count"]) == (0, 2)
    assert (p1["process_index"], p1["process_count"]) == (1, 2)
    assert single["process_count"] == 1
    for step in range(1, 6):
        # per-process data shards: 4 rows each, disjoint; together exactly the single process's batch, in
        # its row order (process 0's rows are global rows 0-3)
        assert len(p0["rows"][step]) == len(p1["rows"][step]) == 4
        assert not set(p0["rows"][step]) & set(p1["rows"][step])
        assert p0["rows"][step] + p1["rows"][step] == single["rows"][step], step
    # every step drew new samples (the shards advance)
    assert len({r for s in range(1, 6) for r in p0["rows"][s]}) == 20
    for r in (p0, p1):
        assert r["step"] == 5 and r["stopped_by"] == "done"
        for s in range(1, 6):
            assert r["losses"][s] == pytest.approx(single["losses"][s], rel=1e-5, abs=0), s
    assert p0["losses"] == p1["losses"]              # one global computation, seen by both
    # the checkpoint at step 5: global arrays + one data-iterator state per process
    step_dir = multi / "ckpt" / "5"
    assert (step_dir / "state").is_dir()
    states = [json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert [s["layout"]["row_start"] for s in states] == [0, 4]
    assert all(s["shards"][0]["parent"] == {"next_index": 20} for s in states)   # 5 steps x 4 rows each
    # only process 0 logs
    assert len((multi / "metrics.jsonl").read_text().splitlines()) == 1          # logging.every=5
