"""Strict import of LLM checkpoints: renamed, extra, mis-shaped and missing keys, pickle-only directories,
config/checkpoint disagreements and tied heads all raise `WeightImportError` naming the problem; sharded
checkpoints and known harmless extras load."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from alm_jax.errors import WeightImportError
from alm_jax.weights.llm_params import load_llm
from hf_tiny_llm import jit_forward, save, tiny_hf_llm

IDS = np.arange(20, dtype=np.int32).reshape(2, 10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, reference logits) of a tiny untied Llama."""
    path = save(tiny_hf_llm("llama"), tmp_path_factory.mktemp("llama"))
    return path, jit_forward(load_llm(path))(IDS)


def edited_copy(src, dst, edit) -> str:
    """Copies an HF directory, rewriting model.safetensors through edit(dict of arrays)."""
    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_renamed_key(checkpoint, tmp_path):
    def rename(t):
        t["model.layers.1.mlp.gate.weight"] = t.pop("model.layers.1.mlp.gate_proj.weight")
    with pytest.raises(WeightImportError, match=r"unexpected key 'model\.layers\.1\.mlp\.gate\.weight'"):
        load_llm(edited_copy(checkpoint[0], tmp_path / "c", rename))


def test_extra_key(checkpoint, tmp_path):
    def add(t):
        t["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(WeightImportError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_llm(edited_copy(checkpoint[0], tmp_path / "c", add))


def test_wrong_shape(checkpoint, tmp_path):
    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    with pytest.raises(WeightImportError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(31, 64\)"):
        load_llm(edited_copy(checkpoint[0], tmp_path / "c", cut))


def test_missing_key(checkpoint, tmp_path):
    def drop(t):
        del t["model.layers.1.post_attention_layernorm.weight"]
    with pytest.raises(WeightImportError, match=r"not found.*layers\.1\.post_attention_layernorm\.scale"):
        load_llm(edited_copy(checkpoint[0], tmp_path / "c", drop))


def test_config_and_checkpoint_disagree(checkpoint, tmp_path):
    shutil.copytree(checkpoint[0], tmp_path / "c")
    config = json.loads((tmp_path / "c/config.json").read_text())
    (tmp_path / "c/config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(WeightImportError, match=r"'model\.layers\.1\..*which the model does not have"):
        load_llm(tmp_path / "c")
    (tmp_path / "c/config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))  # expects q/k/v biases
    with pytest.raises(WeightImportError, match=r"not found.*self_attn\.[qkv]_proj\.bias"):
        load_llm(tmp_path / "c")


def test_pickle_only_directory(checkpoint, tmp_path):
    shutil.copy(f"{checkpoint[0]}/config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightImportError, match="pickle"):
        load_llm(tmp_path)


def test_known_extras_are_ignored(checkpoint, tmp_path):
    """Old conversions saved rotary inv_freq buffers; they are recomputed from the config."""
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)
    path = edited_copy(checkpoint[0], tmp_path / "c", add)
    np.testing.assert_array_equal(jit_forward(load_llm(path))(IDS), checkpoint[1])


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf_llm("qwen2")
    single = save(hf, tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    np.testing.assert_array_equal(jit_forward(load_llm(tmp_path / "sharded"))(IDS), jit_forward(load_llm(single))(IDS))


def test_tied_head_in_file(tmp_path):
    """A tied checkpoint may carry lm_head.weight: ignored when it equals the embedding, an error otherwise."""
    path = save(tiny_hf_llm("qwen3", tied=True), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(f"{path}/model.safetensors")  # transformers 5 drops the duplicate
    reference = jit_forward(load_llm(path))(IDS)

    def duplicate(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    np.testing.assert_array_equal(jit_forward(load_llm(edited_copy(path, tmp_path / "dup", duplicate)))(IDS), reference)

    def differ(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0
    with pytest.raises(WeightImportError, match="tie_word_embeddings"):
        load_llm(edited_copy(path, tmp_path / "diff", differ))


def test_scanned_import_fills_slice_i_from_layer_i(checkpoint):
    """The per-layer key table fills the stacked parameters: slice i of the scanned model is layer i of the
    unrolled one, and HF layer i's tensor, transposed."""
    scanned, unrolled = load_llm(checkpoint[0]), load_llm(checkpoint[0], scan_layers=False)
    tensors = load_file(f"{checkpoint[0]}/model.safetensors")
    for i in range(2):
        want = tensors[f"model.layers.{i}.mlp.down_proj.weight"].T
        np.testing.assert_array_equal(np.asarray(scanned.layers.mlp.down_proj.kernel[...][i]), want)
        np.testing.assert_array_equal(np.asarray(unrolled.layers[i].mlp.down_proj.kernel[...]), want)
    np.testing.assert_array_equal(jit_forward(unrolled)(IDS), checkpoint[1])


def test_load_in_bfloat16(checkpoint):
    model = load_llm(checkpoint[0], dtype=jnp.bfloat16)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    logits = jit_forward(model)(IDS)
    assert logits.dtype == np.float32 and np.abs(logits - checkpoint[1]).max() < 0.25


def test_truncated_safetensors_names_the_file_and_the_fix(checkpoint, tmp_path, capsys):
    """Issue 18 item 5: a truncated model.safetensors was a raw SafetensorError from `alm info` and
    `alm train` (load_llm); now one WeightImportError naming the file and saying to download it again."""
    from alm_jax.cli import main
    from alm_jax.weights.inspect import describe_checkpoint
    dst = tmp_path / "c"
    shutil.copytree(checkpoint[0], dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for load in (load_llm, describe_checkpoint):
        with pytest.raises(WeightImportError, match=r"model\.safetensors is not a readable safetensors file.*"
                                                    r"truncated or corrupt.*download it again"):
            load(dst)
    assert main(["info", str(dst)]) == 1
    assert "model.safetensors is not a readable safetensors file" in capsys.readouterr().err
