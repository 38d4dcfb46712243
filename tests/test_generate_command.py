"""`alm generate` end to end (alm_jax/generation/run.py): a corpus + report, resume after kill -9 without a
duplicate or a missing record, and two jax.distributed processes writing the same bytes as one.

A tiny random Llama with the SmolLM2 tokenizer stands in for the backbone (fixture `tiny_llm_dir`); the
end-to-end runs with the real SmolLM2 are reported in the closing notes (they take many minutes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_setup import ScriptedBackbone

from alm_jax.data.corpus import Corpus

N, PER_SHARD = 12, 4
HERE = Path(__file__).parent
ROOT = HERE.parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


def _cmd(llm, out, *extra) -> list[str]:
    return [sys.executable, "-m", "alm_jax.cli", "generate", "--recipe", "desta", "--source", "demo", "--llm",
            str(llm), "--out", str(out), "--n", str(N), "--records-per-shard", str(PER_SHARD), "--batch-size", "4",
            "--max-new-tokens", "8", "--max-prompt-tokens", "512", "--seed", "5", "source.kinds=[events]", "source.max_duration=3.0",
            "sampling.temperature=0.8", "sampling.top_p=0.9", *extra]


def _run(llm, out, *extra, env=None):
    r = subprocess.run(_cmd(llm, out, *extra), env=env or _env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*")) if not p.name.endswith(".tmp")}


@pytest.fixture(scope="module")
def reference(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "corpus"
    r = _run(tiny_llm_dir, out)
    return out, r


@pytest.mark.slow
def test_generate_writes_a_corpus_a_report_and_progress(reference):
    out, r = reference
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "generation_report.json").read_text())
    records = list(Corpus(out))
    assert manifest["total_records"] == report["records_kept"] == len(records) > 0
    assert report["items"] == N and sum(report["filtered"].values()) + sum(report["bad"].values()) + len(records) == N
    assert sum(report["response_tokens"]["histogram"].values()) == len(records)
    assert report["response_tokens"]["max"] <= 8
    assert sorted({rec.metadata["item_index"] for rec in records}) == sorted(rec.metadata["item_index"] for rec in records)
    assert all(rec.recipe == "desta" and rec.messages[-1]["role"] == "assistant" for rec in records)
    assert f"shard 3/3" in r.stderr and "samples/s" in r.stderr and "ETA" in r.stderr   # progress lines


@pytest.mark.slow
def test_kill_after_the_first_shard_then_rerun_gives_the_same_corpus(reference, tiny_llm_dir, tmp_path):
    ref, _ = reference
    out = tmp_path / "killed"
    log = open(tmp_path / "log.txt", "w")
    p = subprocess.Popen(_cmd(tiny_llm_dir, out), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list(out.glob("*.done.json")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists()          # killed before the end
    _run(tiny_llm_dir, out)
    assert _shards(out) == _shards(ref)                   # nothing lost, nothing twice
    ids = [rec.metadata["item_index"] for rec in Corpus(out)]
    assert len(ids) == len(set(ids)) and ids == [rec.metadata["item_index"] for rec in Corpus(ref)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(reference, tiny_llm_dir, tmp_path):
    ref, _ = reference
    out = tmp_path / "two"
    coord = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_cmd(tiny_llm_dir, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(JAX_COORDINATOR_ADDRESS=coord, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert _shards(out) == _shards(ref)
    assert json.loads((out / "generation_report.json").read_text()) == \
        json.loads((ref / "generation_report.json").read_text())


def test_bad_generate_arguments_name_what_to_fix(tiny_llm_dir, tmp_path):
    from alm_jax.cli import main
    from alm_jax.generation.run import parse_overrides
    from alm_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="sampling.temperature=0.7"):
        parse_overrides(["temperature=0.7"])
    assert parse_overrides(["sampling.top_k=5", "source.kinds=[events]"])["source"] == {"kinds": ["events"]}
    base = ["generate", "--llm", str(tiny_llm_dir), "--out", str(tmp_path / "x"), "--n", "4"]
    assert main([*base, "--recipe", "nope", "--source", "demo"]) == 1
    assert main([*base, "--recipe", "desta", "--source", str(tmp_path / "missing.jsonl")]) == 1
    assert main([*base, "--recipe", "desta", "--source", "demo", "sampling.temprature=1"]) == 1


def test_rerun_with_other_settings_refuses_and_prints_how_to_continue(tiny_llm_dir, tmp_path, capsys):
    """Issue 18 item 3: a run killed after some shards, rerun with another seed and max_new_tokens, used to
    mix both settings in one corpus (rc 0). Now it stops before loading anything and prints the fix."""
    import shlex

    from alm_jax.cli import main
    out = tmp_path / "c"
    base = ["generate", "--recipe", "desta", "--source", "demo", "--llm", str(tiny_llm_dir), "--out", str(out),
            "--n", "6", "--records-per-shard", "2", "--batch-size", "2", "--max-prompt-tokens", "512",
            "source.kinds=[events]", "source.max_duration=2.0"]
    assert main([*base, "--seed", "5", "--max-new-tokens", "4"]) == 0
    for p in out.glob("shard-00002-*"):      # killed in the last shard: it and the manifest are missing
        p.unlink()
    (out / "manifest.json").unlink()
    before = _shards(out)
    capsys.readouterr()
    assert main([*base, "--seed", "6", "--max-new-tokens", "8"]) == 1
    err = capsys.readouterr().err
    for part in ("seed: 5 (this run: 6)", "max_new_tokens: 4 (this run: 8)", "pass another --out",
                 "--seed 5", "--max-new-tokens 4"):
        assert part in err, err
    assert _shards(out) == before and not (out / "manifest.json").exists()
    continue_cmd = err.split("rerun with its settings:\n", 1)[1].strip().splitlines()[0]
    assert main(shlex.split(continue_cmd)[1:]) == 0          # the printed command finishes the corpus
    assert Corpus(out).manifest["settings"]["seed"] == 5 and len(Corpus(out)) == 6


def _tagged_answer(prompt: str) -> str:
    """Plain answers, and `<answer>` tags for ALARM's rewrite."""
    return ("<answer>You can hear a dog barking while rain falls softly.</answer>" if "<answer>" in prompt
            else "Yes. A dog barks while rain falls softly in the background.")


def _untagged_answer(prompt: str) -> str:
    """A small backbone that never opens `<answer>` itself but continues one it is given."""
    return ("I hear a dog barking while rain falls softly.</answer>" if prompt.rstrip().endswith("<answer>")
            else "A dog barks while rain falls softly in the background.")


def test_alarm_prefills_the_answer_tag_for_small_backbones(tiny_llm_dir, tmp_path):
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus, generation_report
    from alm_jax.recipes import build_recipe
    for prefill, out in ((False, tmp_path / "off"), (True, tmp_path / "on")):
        source = DemoSource(seed=4, n_clips=4, kinds=("events",), min_duration=0.5, max_duration=0.9)
        gen = ScriptedBackbone(ResponseGenerator(tiny_llm_dir, batch_size=4, max_new_tokens=8, max_prompt_tokens=2048),
                               _untagged_answer)
        recipe = build_recipe("alarm", seed=1, min_response_tokens=0, prefill_answer=prefill)
        generate_corpus(out, source, recipe, gen, n_records=4, records_per_shard=4)
    assert generation_report(tmp_path / "off")["filtered"] == {"no_answer": 4}
    records = list(Corpus(tmp_path / "on"))
    assert [r.messages[-1]["content"] for r in records] == ["I hear a dog barking while rain falls softly."] * 4


@pytest.fixture(scope="module")
def recipe_corpora(tiny_llm_dir, tmp_path_factory):
    """A small corpus per recipe, written by the engine (scripted answers) from short demo clips."""
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus, generation_report
    from alm_jax.recipes import RECIPES, build_recipe
    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name in sorted(RECIPES):
        source = DemoSource(seed=4, n_clips=8, kinds=("events",), min_duration=0.5, max_duration=0.9)
        gen = ScriptedBackbone(ResponseGenerator(tiny_llm_dir, batch_size=4, max_new_tokens=8, max_prompt_tokens=2048),
                               _tagged_answer)
        recipe = build_recipe(name, seed=1, **({"min_response_tokens": 0} if name == "alarm" else {}))
        generate_corpus(root / name, source, recipe, gen, n_records=8, records_per_shard=4)
        out[name] = (root / name, generation_report(root / name), gen.calls)
    return out


def test_every_recipe_writes_its_corpus_through_the_engine(recipe_corpora):
    for name, (path, report, calls) in recipe_corpora.items():
        records = list(Corpus(path))
        assert report["items"] == 8 and report["records_kept"] == len(records) >= 4, (name, report)
        assert len(records) + sum(report["filtered"].values()) + sum(report["bad"].values()) == 8, name
        assert all(r.recipe == name and r.messages[-1]["role"] == "assistant" for r in records), name
        clips = {len(r.clips) for r in records}
        assert clips == ({0} if name == "mats" else {2, 3} if name == "balsa_ma" else {2} if name == "mallm"
                         else {1}), (name, clips)
    alarm_calls = recipe_corpora["alarm"][2]              # two stages x two shards: the rewrite is a second pass,
    assert [b for _, b in alarm_calls] == [0, 1536, 0, 1536]   # under the sampler's thinking budget
    mallm = list(Corpus(recipe_corpora["mallm"][0]))
    assert any(r.provenance.generator == "metadata" for r in mallm)   # closed-form answers need no LLM
    balsa = recipe_corpora["balsa"][1]
    assert set(balsa["filtered"]) <= {"wrong_answer"}   # the scripted "Yes." contradicts the absent-sound items


@pytest.mark.slow
@pytest.mark.parametrize("name", ["balsa_ma", "mallm"])
def test_multi_clip_corpora_train_through_the_alm(name, recipe_corpora, tiny, tmp_path):
    from tiny_setup import tiny_config

    from alm_jax.training.trainer import train
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path, f"data.corpus=[{recipe_corpora[name][0]}]", "data.max_clips=3",
                      "data.max_text_tokens=320", "data.max_audio_seconds=1.0", "data.batch_size=2",
                      "steps=2", "optim.total_steps=2", "logging.every=1")
    result = train(cfg)
    assert result.step == 2 and all(v == v and v > 0 for v in result.losses.values())
    assert result.bad_samples.get("bad", {}) == {}                   # every multi-clip record was usable


@pytest.mark.slow
def test_llm_sharded_over_local_devices_writes_the_same_greedy_corpus(tiny_llm_dir, tmp_path):
    common = ["--recipe", "desta", "--source", "demo", "--llm", str(tiny_llm_dir), "--n", "8", "--records-per-shard",
              "4", "--batch-size", "4", "--max-new-tokens", "8", "--max-prompt-tokens", "512",
              "source.kinds=[events]", "source.max_duration=3.0"]
    cli = [sys.executable, "-m", "alm_jax.cli", "generate"]
    one = subprocess.run([*cli, *common, "--out", str(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                         timeout=600)
    four = subprocess.run([*cli, *common, "--out", str(tmp_path / "four"), "--fsdp", "2", "--tensor", "2"],
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"), capture_output=True,
                          text=True, timeout=600)
    assert one.returncode == 0 and four.returncode == 0, (one.stderr + four.stderr)[-4000:]
    assert _shards(tmp_path / "four") == _shards(tmp_path / "one") != {}
    bad = subprocess.run([*cli, *common, "--out", str(tmp_path / "bad"), "--fsdp", "2", "--tensor", "2"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "alm: error: mesh" in bad.stderr and "Traceback" not in bad.stderr
