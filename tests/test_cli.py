"""The `alm` command: help, info on a real HF directory, clear errors."""

import subprocess
import sys

import pytest

from alm_jax.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "models", "demo"):
        assert cmd in out


def test_info_on_saved_llama(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    n = sum(p.numel() for p in model.state_dict().values())
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "family:      llama" in out
    assert f"parameters:  {n:,}" in out
    assert "F32" in out


def test_info_errors_are_clear(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert main(["info", str(tmp_path)]) == 1
    assert "not supported" in capsys.readouterr().err


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "alm_jax.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare" not in r.stderr
