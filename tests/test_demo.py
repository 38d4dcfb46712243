"""The main job's chain (alm_jax/demo): the public commands in order, each skipped once its output exists, a
failing step stops the chain by name, and the report (json / md / html / PNGs) from the files the commands write.

The commands themselves are tested in their own files; here a stand-in `alm` (a real subprocess) records its
argv and writes the outputs the real command would, and every recorded argv is parsed by the real `alm` parser
(the train overrides load into a valid config). The full-size run's numbers are in the README."""

import json
import sys
import textwrap
import types
from pathlib import Path

import pytest

FAKE_ALM = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    argv = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\\n")
    if os.environ.get("FAKE_FAIL") == argv[0]:
        sys.exit(3)
    def opt(name):
        return argv[argv.index(name) + 1]
    cmd = argv[0]
    if cmd == "generate":
        out = Path(opt("--out")); out.mkdir(parents=True)
        n = int(opt("--n"))
        (out / "manifest.json").write_text(json.dumps({"total_records": n - 1}))
        (out / "generation_report.json").write_text(json.dumps({"records_kept": n - 1, "items": n,
                                                                "filtered": {"rejected_by_recipe": 1}}))
    elif cmd == "train":
        kv = dict(a.split("=", 1) for a in argv[2:])
        ckpt = Path(kv["checkpoint.dir"]) / kv["steps"]; ckpt.mkdir(parents=True)
        (ckpt / "state").write_text("x")
        logdir = Path(kv["logging.dir"]); logdir.mkdir(parents=True)
        rows = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, int(kv["steps"]) + 1)]
        rows += [{"step": s, "eval/loss": 2.5, "eval/loss_other_audio": 2.5 + s / 10, "eval/listening_gap": s / 10,
                  "eval/hallucination/accuracy": 50.0 + s,
                  "eval/alignment/agreement": 30.0 + s, "eval/alignment/baseline": 20.0} for s in (2, 4)]
        rows.insert(1, {"step": 1, "event": "resume"})
        (logdir / "metrics.jsonl").write_text("\\n".join(json.dumps(r) for r in rows) + "\\n")
    elif cmd == "eval":
        suite, out = opt("--suite"), Path(opt("--out")); out.mkdir(parents=True, exist_ok=True)
        metrics = {"hallucination": {"accuracy": 80.0, "f1_no": 78.0, "backbone_text_accuracy": 52.0,
                                     "no_audio_accuracy": 50.0, "questions": 200.0, "yes_rate": 48.0},
                   "multi_audio": {"accuracy": 60.0, "items": 100.0, "accuracy_backbone_text": 55.0,
                                   "accuracy_no_audio": 50.0},
                   "forgetting": {"exact_match": 1.0},
                   "alignment": {"agreement": 60.0, "baseline": 20.0, "ratio": 3.0, "accuracy": 70.0,
                                 "accuracy_backbone_text": 90.0, "items": 100.0}}[suite]
        row = {"step": 4, **{f"eval/{suite}/{k}": v for k, v in metrics.items()}}
        (out / f"{suite}.json").write_text(json.dumps({argv[1]: row}))
        if suite in ("alignment", "hallucination"):
            item = {"seed": "[00:00-00:03] (Audio category: siren)", "question": "Q?", "expected": "yes",
                    "labels": ["siren"],
                    "alm": "a siren", "answer": "Yes", "backbone_text": "siren <b>"}
            (out / f"{suite}-details").mkdir(exist_ok=True)
            (out / f"{suite}-details" / "0-checkpoints.json").write_text(json.dumps({"items": [item] * 3}))
    elif cmd == "export":
        out = Path(opt("--out")); out.mkdir(parents=True)
        (out / "model.safetensors").write_text("x")
''')


@pytest.fixture
def fake_alm(tmp_path, monkeypatch):
    import alm_jax.demo as demo
    script = tmp_path / "fake_alm.py"
    script.write_text(FAKE_ALM)
    log = tmp_path / "argv.jsonl"
    monkeypatch.setattr(demo, "alm_command", lambda: [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setitem(demo.SIZES, "test", demo.DemoSize(desta=5, balsa=6, balsa_ma=3, mallm=4, heldout=2,
                                                          naming_steps=4, naming_cycles=2, steps=4, eval_every=2,
                                                          eval_clips=2, final_clips=4, forgetting=2))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _args(tmp_path):
    return types.SimpleNamespace(size="test", out=str(tmp_path / "demo"), home=None, seed=0)


def test_chain_runs_the_public_commands_in_order_then_skips_them(tmp_path, fake_alm):
    from alm_jax.cli import build_parser
    from alm_jax.config import load_config
    from alm_jax.demo import DEMO_CONFIG, SUITES, run_demo
    from alm_jax.evaluation import check_suites
    assert run_demo(_args(tmp_path)) == 0
    calls = fake_alm()
    assert [c[0] for c in calls] == ["models"] + ["generate"] * 5 + ["train"] * 2 + ["eval"] * 4 + ["export"] * 2
    parser = build_parser()
    for argv in calls:
        parser.parse_args(argv)                       # every step is a valid `alm` command line
    gens = [c for c in calls if c[0] == "generate"]
    assert [g[g.index("--recipe") + 1] for g in gens] == ["desta", "balsa", "balsa_ma", "mallm", "desta"]
    seeds = [next(a for a in g if a.startswith("source.seed=")) for g in gens]
    assert len(set(seeds)) == 5 and "source.seed=1" not in seeds   # the suites' held-out seed is never trained on
    out = tmp_path / "demo"
    naming, train = (load_config(DEMO_CONFIG, c[2:]) for c in calls if c[0] == "train")
    for cfg in (naming, train):
        check_suites(cfg.eval)
        assert cfg.steps == 4 and cfg.eval.every == 2 and cfg.model.connector.norm == "batch"
    # stage 1 listens first: the naming records alone at a high lr, into its own directories
    assert naming.data.corpus == (str(out / "corpus" / "desta"),) and naming.model.init_from == ()
    assert naming.checkpoint.dir == str(out / "naming" / "checkpoints") and naming.optim.lr == 2e-3
    assert naming.optim.cycles == 2 and naming.optim.total_steps == naming.steps   # warm restarts (`naming_cycles`)
    # stage 2: the mix from stage 1's final connector, at a lower lr, DeSTA at twice its share (`EMPHASIS`)
    cfg = train
    assert len(cfg.data.corpus) == 4 and cfg.optim.lr < naming.optim.lr and cfg.optim.cycles == 1
    assert cfg.data.corpus[3] == str(out / "corpus" / "mallm")
    assert cfg.data.weights == (8.0, 5.0, 2.0, 3.0)   # the records each corpus kept x EMPHASIS (2, 1, 1, 1)
    (init,) = cfg.model.init_from
    assert (init.run, init.step, init.map) == (naming.checkpoint.dir, 4, (("connector", "connector"),))
    assert cfg.checkpoint.dir == str(out / "checkpoints") and cfg.logging.dir == str(out / "train")
    train = [c for c in calls if c[0] == "train"][1]
    answer = [int(g[g.index("--max-new-tokens") + 1]) for g in gens]
    assert answer == [16, 12, 16, 16, 16]             # short answers: the part naming the sound / saying yes or no
    assert all("--trim-unfinished" in g for g in gens)   # ... cut back to whole sentences, no EOS mid-sentence
    balsa = next(g for g in gens if "balsa" in g)      # yes/no with the answer told, as many yes as no
    assert {"recipe.yes_no=1.0", "recipe.answer_hint=true", "recipe.positive=1.5"} <= set(balsa)
    assert "recipe.closed=1.0" in next(g for g in gens if "mallm" in g)   # closed two-clip questions, no LLM
    ma = next(g for g in gens if "balsa_ma" in g)
    assert f"recipe.max_clips={cfg.data.max_clips}" in ma   # every BALSa-MA record fits the run's audio slots
    desta = next(g for g in gens if "source.seed=10" in g)
    heldout = next(g for g in gens if "source.seed=13" in g)   # the held-out loss asks the naming task too
    assert [a for a in heldout if a.startswith(("recipe.", "source.k", "source.max_e"))] == [
        a for a in desta if a.startswith(("recipe.", "source.k", "source.max_e"))]
    option = next(a for a in desta if a.startswith("recipe.instructions="))
    from alm_jax.evaluation.alignment import QUESTION
    from alm_jax.recipes.pools import prompt_lines
    instructions = prompt_lines(Path(option.split("=", 1)[1]).read_text())   # what the recipe reads
    assert len(instructions) >= 8 and QUESTION not in instructions   # the suite's question is never trained on
    for option in ("recipe.require_label=true", "recipe.label_hint=true", "source.kinds=[events]",
                   "source.max_events=1"):   # one sound per clip, named to SmolLM2, answers that name it
        assert option in desta
    assert {c[c.index("--suite") + 1] for c in calls if c[0] == "eval"} == set(SUITES)

    report = json.loads((out / "report.json").read_text())
    for key in ("hallucination.accuracy", "hallucination.no_f1", "hallucination.backbone_text_accuracy",
                "hallucination.no_audio_accuracy", "multi_audio.accuracy", "forgetting.exact_match",
                "alignment.agreement", "alignment.baseline", "train.steps", "train.seconds", "total_seconds"):
        assert key in report, key
    assert report["train.steps"] == 8 and report["train.naming_steps"] == 4   # steps counted across the stages
    assert report["alignment.agreement"] == 60.0
    assert report["train.listening_gap"] == 0.4 and report["train.heldout_loss_other_audio"] == 2.9   # the last eval
    assert "eval.listening_gap=true" in train
    lo, hi = report["multi_audio.ci95"]
    assert 50.0 < lo < 60.0 < hi < 70.0               # Wilson interval of 60 / 100
    assert report["corpus"]["balsa"] == {"items": 6, "records": 5, "filtered": {"rejected_by_recipe": 1}, "clips": None}
    from alm_jax.demo.report import stage_starts, training_rows
    rows = training_rows(out)                         # both stages, stage 2 counted on from stage 1's last step
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4, 6, 8] and stage_starts(rows) == [("mix", 4)]
    for png in ("loss.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "![loss.png](loss.png)" in md and "| alignment.agreement | 60.0 |" in md
    assert "siren &lt;b&gt;" in html and "<img src=\"accuracy.png\"" in html   # answers escaped

    timings = json.loads((out / "timings.json").read_text())
    assert run_demo(_args(tmp_path)) == 0             # a rerun skips every finished step
    assert [c[0] for c in fake_alm()[len(calls):]] == ["models"]
    again = json.loads((out / "timings.json").read_text())
    drop = lambda t: {k: v for k, v in t.items() if k not in ("prepare", "total")}   # prepare re-checks each time
    assert drop(again) == drop(timings)


def test_a_failing_step_stops_the_chain_and_names_it(tmp_path, fake_alm, monkeypatch):
    from alm_jax.demo import run_demo
    monkeypatch.setenv("FAKE_FAIL", "train")
    with pytest.raises(SystemExit, match="step 'train_naming' failed"):
        run_demo(_args(tmp_path))
    assert [c[0] for c in fake_alm()][-1] == "train"
    monkeypatch.delenv("FAKE_FAIL")
    assert run_demo(_args(tmp_path)) == 0              # the rerun continues from the failed step
    calls = [c[0] for c in fake_alm()]
    assert calls.count("generate") == 5 and calls.count("train") == 3


def test_wilson_interval():
    from alm_jax.demo.report import wilson
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(40.38, abs=0.01) and hi == pytest.approx(59.62, abs=0.01)
    assert wilson(0, 0) == (0.0, 0.0)
