"""Each method end to end at tiny size: its own recipe writes a corpus through the generation engine (real prompts, a
scripted backbone whose answers fit the recipe's filters), the published config's tiny twin
(`test_published_configs.tiny_twin`: every method knob kept, every size shrunk) trains on it and overfits a batch that
is the whole corpus: BALSa single-clip and BALSa-MA (Q-Former over up to 3 clip slots), ALARM single-encoder
(BatchNorm adapter), which is stage 1 of ALARM-CA and ALARM-P (its adapter loaded by `model.init_from`, held by
`model.freeze`), and MALLM (Qwen2-Audio projector + LoRA on the LLM) on the recipe's minimal pairs. DeSTA:
test_desta_transcripts.py; MATS: test_mats_training.py.

The LLM of each run is frozen and random but steerable (output rows only for its corpus's answer tokens,
`tiny_setup.write_steerable_llm`); the Whisper's weights are drawn large enough that its states depend on the audio.
Where the answers depend on the audio alone (the noise rule of `_answer`, 4 of 8 records each way), a loss well below
that of the best audio-blind guess (ln 2 over the answer's tokens: 0.35 for "Yes"/"No" + EOS) shows the connector
carries each clip to the LLM."""

from __future__ import annotations

import re
from fnmatch import fnmatch

import jax
import numpy as np
import pytest

from alm_jax.config import load_config
from alm_jax.data.corpus import Corpus

N = 8                 # records per corpus = the batch: every step trains on the whole corpus
ANSWERS = ("Yes", "No")
_ORIGINAL = re.compile(r"<ORIGINAL_ANSWER>\n(.*?)\n</ORIGINAL_ANSWER>", re.S)


def _answer(prompt: str, answers=ANSWERS) -> str:
    """The scripted backbone: ALARM's rephrasing pass returns the first pass's answer in the asked `<answer>` form;
    a BALSa yes/no prompt with `answer_hint` already ends with the engine's "Yes," / "No," prefix (nothing to add);
    any other prompt gets `answers[0]` when its first clip's description names a noise, else `answers[1]`."""
    if "<ORIGINAL_ANSWER>" in prompt:
        return f"<answer>\n{_ORIGINAL.findall(prompt)[-1]}\n</answer>"
    if 'The correct answer is "' in prompt:
        return ""
    first_clip = re.split(r"\[End of audio|<end_audio>", prompt.rsplit("<|im_start|>user", 1)[-1])[0]
    return answers[0] if "noise" in first_clip.lower() else answers[1]


@pytest.fixture(scope="module")
def methods(tmp_path_factory, demo_models):
    """A corpus of N records per recipe (demo sound-event clips of 0.3-0.6 s; MALLM: the source's pairs), a
    steerable tiny LLM per corpus, a tiny Whisper whose states depend on the audio, a tiny W2V-BERT."""
    import torch
    from test_w2v_bert import save_tiny_w2v_bert
    from tiny_setup import ScriptedBackbone, write_steerable_llm, write_tiny_whisper

    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus
    from alm_jax.recipes import AlarmRecipe, BalsaMaRecipe, BalsaRecipe, MallmRecipe
    root = tmp_path_factory.mktemp("methods")
    # prompts from the demo LLM's tokenizer and chat template (its weights never load: the answers are scripted)
    gen = ScriptedBackbone(ResponseGenerator(demo_models.llm, batch_size=N, max_new_tokens=8, max_prompt_tokens=4096),
                           _answer)
    source = DemoSource(seed=3, n_clips=N, kinds=("events",), min_duration=0.3, max_duration=0.6)
    recipes = {"balsa": BalsaRecipe(seed=7, yes_no=1.0, answer_hint=True),     # seeds: 4 yes / 4 no, every type
               "balsa_ma": BalsaMaRecipe(seed=1, min_clips=2, max_clips=3),
               "alarm": AlarmRecipe(seed=1, min_response_tokens=1, max_response_tokens=16),
               "mallm": MallmRecipe(seed=1, closed=0.5)}
    paths = {}
    for name, recipe in recipes.items():
        generate_corpus(root / name, source, recipe, gen, n_records=N, records_per_shard=N)
        paths[name] = str(root / name)
        write_steerable_llm(root / f"llm_{name}", demo_models.llm,
                            [r.messages[-1]["content"] for r in Corpus(paths[name])])
        paths[f"llm_{name}"] = str(root / f"llm_{name}")
    # the fused ALARM stage's corpus: other prompts, the opposite answers, so what stage 1 learned is wrong there
    inverted = ScriptedBackbone(gen.inner, lambda prompt: _answer(prompt, ANSWERS[::-1]))
    generate_corpus(root / "alarm_fused", source, AlarmRecipe(seed=2, min_response_tokens=1, max_response_tokens=16),
                    inverted, n_records=N, records_per_shard=N)
    paths.update(alarm_fused=str(root / "alarm_fused"), llm_alarm_fused=paths["llm_alarm"])
    torch.manual_seed(0)
    write_tiny_whisper(root / "whisper", 50, init_std=0.3)
    save_tiny_w2v_bert(root / "w2v_bert")
    return {"whisper": str(root / "whisper"), "w2v_bert": str(root / "w2v_bert"), **paths}


def _records(methods, name):
    records = list(Corpus(methods[name]))
    assert len(records) == N, name          # every scripted answer passed the recipe's filters
    return records


def _train(methods, twin: str, corpus: str, run_dir, *extra, runs=None, steps=15, lr=0.05):
    """The tiny twin of published config `twin` on `corpus` with its LLM, batch = the whole corpus, `steps` steps at
    `lr` (cosine to 0); returns (config, losses in step order, the final checkpoint state)."""
    import orbax.checkpoint as ocp
    from test_published_configs import tiny_twin

    from alm_jax.training.trainer import train
    tiny_twin(twin, {**methods, "llm": methods[f"llm_{corpus}"], "corpus": methods[corpus]}, run_dir, runs, steps=steps)
    cfg = load_config(run_dir / "twin.yaml", [f"data.batch_size={N}", f"optim.lr={lr}", *extra])
    result = train(cfg)
    assert result.step == steps and result.stopped_by == "done", twin
    assert result.bad_samples["bad"] == {} and result.bad_samples["adjusted"] == {}, result.bad_samples
    losses = [result.losses[k] for k in sorted(result.losses)]
    print(f"\n  {twin} on the {corpus} corpus: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps "
          f"({' '.join(f'{v:.2f}' for v in losses)})")
    return cfg, losses, ocp.StandardCheckpointer().restore(run_dir / "ckpt" / str(steps) / "state")


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_balsa_single_clip_overfits_its_yes_no_corpus(methods, tmp_path):
    """Every item a yes/no question (positive, negative and combined ones), its target starting with the answer the
    metadata expects. Which answer a record wants depends on its question and its clip together, which 15 steps only
    partly learn (the answer's format entirely): the loss falls from > 10 to below 0.3."""
    records = _records(methods, "balsa")
    for r in records:
        assert r.messages[-1]["content"] == f"{r.metadata['expected'].capitalize()},", r.metadata
    assert [r.metadata["expected"] for r in records].count("yes") == N // 2
    assert {r.metadata["prompt_type"] for r in records} == {"positive", "negative", "combined"}
    cfg, losses, _ = _train(methods, "balsa_llama31_8b", "balsa", tmp_path)
    assert cfg.model.connector.kind == "desta" and cfg.data.max_clips == 1
    assert losses[0] > 10 and losses[-1] < 0.3


def test_balsa_ma_overfits_its_multi_clip_corpus(methods, tmp_path):
    records = _records(methods, "balsa_ma")
    assert {len(r.clips) for r in records} == {2, 3}
    assert {r.metadata["task"] for r in records} == {"differences", "joint_caption"}
    assert [r.messages[-1]["content"] for r in records].count(ANSWERS[0]) == N // 2
    cfg, losses, _ = _train(methods, "balsa_llama31_8b", "balsa_ma", tmp_path, "data.max_clips=3",
                            "data.max_text_tokens=128")
    assert cfg.data.max_clips == 3
    assert losses[0] > 10 and losses[-1] < 0.2


@pytest.fixture(scope="module")
def alarm_stage1(methods, tmp_path_factory):
    """ALARM single-encoder (AL-Whisper twin: BatchNorm adapter) trained on the alarm recipe's corpus: stage 1 of
    ALARM-CA and ALARM-P."""
    run_dir = tmp_path_factory.mktemp("alarm_whisper")
    return run_dir / "ckpt", _train(methods, "alarm_whisper_qwen3_4b", "alarm", run_dir, steps=8)


def test_alarm_single_encoder_with_batchnorm_overfits_its_self_rephrased_corpus(methods, alarm_stage1):
    records = _records(methods, "alarm")
    assert [r.messages[-1]["content"] for r in records].count(ANSWERS[0]) == N // 2
    assert all(r.metadata["original_response"] == r.messages[-1]["content"] for r in records)   # the rephrase
    _, (cfg, losses, state) = alarm_stage1
    assert cfg.model.connector.kind == "alarm" and cfg.model.connector.adapters == ("batch",)
    assert losses[0] > 5 and losses[-1] < 0.05
    stats = _leaves(state["model_state"]["connector"]["adapters"]["0"])   # BatchNorm running statistics updated
    means = [v for k, v in stats.items() if "mean" in k]
    assert len(means) == 2 and all(np.abs(v).max() > 0 for v in means), stats.keys()


@pytest.mark.parametrize("twin", ["alarm_ca_qwen3_4b", "alarm_p_qwen3_4b"])
def test_alarm_fused_stage_holds_the_stage1_adapter_and_overfits(methods, alarm_stage1, twin, tmp_path):
    """Stage 2 on a corpus whose answers are the opposite of stage 1's: the stage-1 adapter alone answers wrongly
    (high first loss), the fusion (CA) / the Perceivers (P) learn to answer right while the adapter stays put."""
    stage_dir, (_, _, stage) = alarm_stage1
    flipped = {r.metadata["item_index"]: r.messages[-1]["content"] for r in _records(methods, "alarm_fused")}
    assert all(flipped[r.metadata["item_index"]] != r.messages[-1]["content"] for r in _records(methods, "alarm"))
    runs = {"runs/alarm_whisper/checkpoints": str(stage_dir), "runs/alarm_whisper_instruct/checkpoints": str(stage_dir)}
    cfg, losses, state = _train(methods, twin, "alarm_fused", tmp_path, runs=runs, steps=12, lr=0.03)
    assert [e.kind for e in cfg.model.encoders] == ["whisper", "w2v_bert"]
    assert [i.run for i in cfg.model.init_from] == [str(stage_dir)]
    assert any(fnmatch("connector.adapters.0", f) for f in cfg.model.freeze)
    held = _leaves(state["trainable"]["connector"]["adapters"]["0"])
    first = _leaves(stage["trainable"]["connector"]["adapters"]["0"])
    assert held.keys() == first.keys() and len(held) > 4
    for k in first:                            # bit-identical to what stage 1 learned
        np.testing.assert_array_equal(held[k], first[k], err_msg=k)
    stats, stats1 = (_leaves(s["model_state"]["connector"]["adapters"]["0"]) for s in (state, stage))
    assert cfg.model.frozen_mode == "train" and stats.keys() == stats1.keys()   # as ALARM: gradients off only,
    assert any(not np.array_equal(stats[k], stats1[k]) for k in stats1)      # its BatchNorm statistics still move
    opt = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert not any("'adapters'" in p and "'0'" in p for p in opt)   # held fixed: no optimizer state
    assert any("'fusion'" in p for p in opt), opt[:10]              # the fusion (CA) / Perceivers (P) train
    assert losses[0] > 5 and losses[-1] < 0.1


def test_mallm_with_lora_overfits_its_pair_corpus(methods, tmp_path):
    """Open "what differs" items (scripted answers) and closed-form ones answered from the pair's metadata ("The
    first clip contains bird chirp.", ...); LoRA (rank 2 at the twin's alpha 16) needs a lower learning rate."""
    records = _records(methods, "mallm")
    assert all(len(r.clips) == 2 for r in records)
    tasks = {r.metadata["task"] for r in records}
    assert "difference" in tasks and len(tasks) > 1
    cfg, losses, state = _train(methods, "mallm", "mallm", tmp_path, "data.max_text_tokens=160", lr=0.01, steps=25)
    assert cfg.model.lora.rank > 0 and cfg.model.connector.kind == "qwen2_audio" and cfg.data.max_clips == 2
    lora_b = {k: v for k, v in _leaves(state["trainable"]["llm"]).items() if "lora_b" in k}
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b.values())   # moved off their zero init
    assert losses[0] > 10 and losses[-1] < 0.2
