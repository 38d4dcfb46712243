"""`alm export --format llm|peft`: the merged LLM loads in `transformers` with our logits (LoRA active) and our
greedy tokens, sharded or not, in float32 or bfloat16, tied (tiny Llama run from a checkpoint) or untied (tiny
Qwen2 with biases, LoRA on the MLP too); the PEFT adapter over the untouched base equals the merged export; the
exported tokenizer applies the chat template; a run without LoRA is refused as `peft`, naming the formats that
can."""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alm_jax.errors import ConfigError
from alm_jax.export import formats
from alm_jax.export.llm import write_llm
from alm_jax.export.peft import write_adapter
from alm_jax.models.llm import generate_greedy
from alm_jax.models.lora import apply_lora, lora_layers, lora_per_layer
from alm_jax.weights.hf_import import iter_tensors
from alm_jax.weights.llm_params import load_llm
from hf_tiny_llm import jit_forward, left_padded_batch, save, tiny_hf_llm, torch_logits
from tiny_setup import tiny_config

TOL = 1e-4
NEW = 16
Q_KEY = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _randomize_lora(model, seed: int) -> None:
    """Non-zero B (zeros at init) and a perturbed A in every LoRA layer, so the adapters change the outputs."""
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        a, b = layer.lora_a, layer.lora_b
        a.set_value(a[...] + jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32))
        b.set_value(jnp.asarray(0.2 * rng.standard_normal(b.shape), jnp.float32))


def _save_run(paths: dict, root, *overrides: str) -> str:
    """A checkpoint as `alm train` writes it (run config + trainable state, LoRA randomized); its directory."""
    from alm_jax.config import to_dict
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(paths, root, *overrides)
    model = build_alm(cfg.model, seed=cfg.seed)
    _randomize_lora(model, seed=5)
    save_trained(model, cfg.checkpoint.dir, 3, to_dict(cfg))
    return cfg.checkpoint.dir


@pytest.fixture(scope="module")
def paths(tiny):
    return json.loads((tiny / "paths.json").read_text())


@pytest.fixture(scope="module")
def run(paths, tmp_path_factory):
    """The tiny Llama (tied, SmolLM2 tokenizer) + Whisper run with rank-4 LoRA on q/v, reloaded from disk."""
    from alm_jax.export.source import load_run
    return load_run(_save_run(paths, tmp_path_factory.mktemp("lora-run"), "model.lora.rank=4", "model.lora.alpha=8"))


@pytest.fixture(scope="module")
def batch():
    """(ids, mask, position_ids) of 3 left-padded rows over the SmolLM2 vocabulary."""
    ids, mask, position_ids, _ = left_padded_batch(np.random.default_rng(0), [5, 9, 7], vocab=49152)
    return ids, mask, position_ids


@pytest.fixture(scope="module")
def llm_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-export")
    files = formats.export(run, "llm", out, dtype="float32")
    assert files[:2] == ["config.json", "model.safetensors"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
    assert all((out / f).is_file() for f in files)
    return out


def _hf(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


def test_llm_export_matches_our_logits_and_greedy(run, llm_dir, batch):
    ids, mask, position_ids = batch
    hf = _hf(llm_dir)
    ours = jit_forward(run.model.llm)(ids, mask)                 # LoRA active, unmerged
    theirs = torch_logits(hf, ids, mask, position_ids)
    diff = _masked_max_diff(ours, theirs, mask)
    print(f"llm export (tied llama) logits max |diff| = {diff:.2e}")
    assert diff <= TOL
    # the adapters are in: our logits without them differ, and so does the exported q_proj
    base = _hf(run.cfg.model.llm)
    assert _masked_max_diff(torch_logits(base, ids, mask, position_ids), theirs, mask) > 1e-2
    exported, original = load_file(llm_dir / "model.safetensors"), dict(_base_tensors(run.cfg.model.llm))
    assert np.abs(exported[Q_KEY] - original[Q_KEY]).max() > 1e-3
    k_key = Q_KEY.replace("q_proj", "k_proj")
    np.testing.assert_array_equal(exported[k_key], original[k_key])   # no LoRA on k_proj
    assert "lm_head.weight" not in exported                           # tied
    # the run's model was not merged in place
    np.testing.assert_array_equal(np.asarray(run.model.llm.layers.self_attn.q_proj.base.kernel[...][0]),
                                  original[Q_KEY].T)
    # greedy: ours (KV cache) vs transformers generate, eos = pad = 2 as the SmolLM2 generation config says
    eos = 2
    ours_tokens = np.asarray(generate_greedy(run.model.llm, ids, mask, max_new_tokens=NEW, eos_id=eos))
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=eos)
    new = out[:, ids.shape[1]:].numpy()
    theirs_tokens = np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=eos)
    np.testing.assert_array_equal(ours_tokens, theirs_tokens)
    assert len(np.unique(ours_tokens)) > 3


def _base_tensors(model_dir):
    for key, load, _ in iter_tensors(model_dir):
        yield key, load()


def test_llm_export_config_and_tokenizer(run, llm_dir):
    base_cfg = json.loads((Path(run.cfg.model.llm) / "config.json").read_text())
    cfg = json.loads((llm_dir / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["architectures"] == base_cfg["architectures"]
    assert cfg["tie_word_embeddings"] is True
    messages = [{"role": "user", "content": "What is in the clip?"}]
    tok, base_tok = AutoTokenizer.from_pretrained(llm_dir), AutoTokenizer.from_pretrained(run.cfg.model.llm)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "What is in the clip?" in text and "<|im_start|>assistant" in text
    assert text == base_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok("a tone")["input_ids"] == base_tok("a tone")["input_ids"]


def test_llm_export_sharded_and_bfloat16(run, llm_dir, batch, tmp_path):
    ids, mask, position_ids = batch
    files = formats.export(run, "llm", tmp_path / "sharded", dtype="float32", max_shard_bytes=20000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    with pytest.raises(ConfigError, match="already holds"):   # stale shards would be read
        formats.export(run, "llm", tmp_path / "sharded", dtype="float32")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    one = torch_logits(_hf(llm_dir), ids, mask, position_ids)
    np.testing.assert_array_equal(torch_logits(_hf(tmp_path / "sharded"), ids, mask, position_ids), one)
    formats.export(run, "llm", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "np") as f:
        assert f.metadata()["format"] == "pt"
    bf16 = _hf(tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    low = torch_logits(bf16, ids, mask, position_ids)
    assert _masked_max_diff(low, one, mask) < 0.05 * np.abs(one).max()


def test_peft_adapter_equals_merged_export(run, llm_dir, batch, tmp_path):
    import peft
    ids, mask, position_ids = batch
    files = formats.export(run, "peft", tmp_path / "adapter", dtype="float32")
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2   # 2 layers x (q, v) x (A, B)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    model = peft.PeftModel.from_pretrained(_hf(run.cfg.model.llm), tmp_path / "adapter").eval()
    diff = _masked_max_diff(torch_logits(model, ids, mask, position_ids),
                            torch_logits(_hf(llm_dir), ids, mask, position_ids), mask)
    print(f"peft adapter (tied llama) vs merged export logits max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_peft_refused_without_lora(paths, tmp_path, monkeypatch):
    from alm_jax.export.source import load_run
    no_lora = load_run(_save_run(paths, tmp_path / "plain"))
    # formats whose modules are not written yet are left out of "Formats that can"
    monkeypatch.setattr(formats, "FORMATS", {k: v for k, v in formats.FORMATS.items()
                                             if importlib.util.find_spec(v) is not None})
    with pytest.raises(ConfigError, match=r"no LoRA \(model\.lora\.rank = 0\)\. Formats that can: .*llm") as e:
        formats.export(no_lora, "peft", tmp_path / "out")
    assert "peft" not in str(e.value).split("Formats that can:")[1]
    assert not (tmp_path / "out").exists()


def test_untied_qwen2_with_biases(tmp_path):
    """write_llm / write_adapter on a bare DecoderLM: Qwen2 q/k/v biases, a separate head, LoRA on down_proj, and
    on only some of the v_proj layers (PEFT then needs their full module names)."""
    import peft
    base_dir = save(tiny_hf_llm("qwen2", tied=False, seed=3), tmp_path / "base")
    llm = load_llm(base_dir)
    apply_lora(llm, rank=4, alpha=6.0, target_regex=r"q_proj|layers/0/self_attn/v_proj|down_proj",
               rngs=nnx.Rngs(1))
    _randomize_lora(llm, seed=9)
    ids, mask, position_ids, _ = left_padded_batch(np.random.default_rng(1), [6, 10, 3])
    files = write_llm(llm, base_dir, tmp_path / "llm", dtype="float32", max_shard_bytes=10 ** 9)
    exported = load_file(tmp_path / "llm" / "model.safetensors")
    assert "lm_head.weight" in exported and "model.layers.1.self_attn.k_proj.bias" in exported
    assert "config.json" in files
    merged = _hf(tmp_path / "llm")
    theirs = torch_logits(merged, ids, mask, position_ids)
    assert _masked_max_diff(torch_logits(_hf(base_dir), ids, mask, position_ids), theirs, mask) > 1e-2
    diff = _masked_max_diff(jit_forward(llm)(ids, mask), theirs, mask)
    print(f"llm export (untied qwen2) logits max |diff| = {diff:.2e}")
    assert diff <= TOL
    write_adapter(llm, base_dir, tmp_path / "adapter", dtype="float32")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "model.layers.0.self_attn.v_proj", "q_proj"]
    assert config["lora_alpha"] == 6 and config["r"] == 4
    model = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "adapter").eval()
    assert not hasattr(model.base_model.model.model.layers[1].self_attn.v_proj, "lora_A")
    diff = _masked_max_diff(torch_logits(model, ids, mask, position_ids), theirs, mask)
    print(f"peft adapter (untied qwen2) vs merged export logits max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_scanned_and_unrolled_export_the_same_tensors(tmp_path):
    """The stacked (scanned) LLM exports layer by layer under the unrolled model's HF keys, the same tensors:
    merged LLM and PEFT adapter, with LoRA on one layer of a stacked Linear (its mask) and on every layer."""
    base_dir = save(tiny_hf_llm("qwen2", tied=False, seed=4), tmp_path / "base")
    rng = np.random.default_rng(2)
    factors = {name: (rng.standard_normal((2, d_in, 4)), rng.standard_normal((2, 4, 64)))
               for name, d_in in (("down_proj", 96), ("q_proj", 64))}
    written = {}
    for scan in (True, False):
        llm = load_llm(base_dir, scan_layers=scan)
        apply_lora(llm, rank=4, alpha=6.0, target_regex=r"layers/1/mlp/down_proj|q_proj", rngs=nnx.Rngs(1))
        for one in lora_per_layer(llm):           # the same factors in both forms
            a, b = factors[one.path.rsplit("/", 1)[1]]
            i = int(one.path.split("/")[1])
            if one.layer is None:
                one.wrapper.lora_a.set_value(jnp.asarray(a[i], jnp.float32))
                one.wrapper.lora_b.set_value(jnp.asarray(b[i], jnp.float32))
            else:
                one.wrapper.lora_a.set_value(jnp.asarray(a, jnp.float32))
                one.wrapper.lora_b.set_value(jnp.asarray(b, jnp.float32))
        out = tmp_path / ("scanned" if scan else "unrolled")
        write_llm(llm, base_dir, out / "llm", dtype="float32", max_shard_bytes=10 ** 9)
        write_adapter(llm, base_dir, out / "adapter", dtype="float32")
        written[scan] = (load_file(out / "llm" / "model.safetensors"),
                         load_file(out / "adapter" / "adapter_model.safetensors"),
                         json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"])
    (llm_s, peft_s, targets_s), (llm_u, peft_u, targets_u) = written[True], written[False]
    assert llm_s.keys() == llm_u.keys() == set(load_file(f"{base_dir}/model.safetensors"))
    assert peft_s.keys() == peft_u.keys() and len(peft_s) == 2 * (2 + 1)       # q_proj x 2 layers + one down_proj
    assert targets_s == targets_u == ["model.layers.1.mlp.down_proj", "q_proj"]
    for name in llm_s:
        np.testing.assert_allclose(llm_s[name], llm_u[name], rtol=0, atol=1e-6, err_msg=name)
    for name in peft_s:
        np.testing.assert_array_equal(peft_s[name], peft_u[name], err_msg=name)
