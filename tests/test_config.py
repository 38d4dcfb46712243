"""Typed config: YAML + dotted overrides, strict errors naming the key path."""

import pytest

from alm_jax.config import TrainConfig, load_config, to_dict, from_dict
from alm_jax.errors import ConfigError


def test_defaults_round_trip():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\nmesh:\n  fsdp: 2\nmodel:\n  encoders:\n    - {taps: [7, 15]}\n")
    cfg = load_config(p, ["optim.lr=3e-4", "mesh.tensor=2", "model.encoders.0.pad_to_seconds=null"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert (cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 2)
    assert cfg.model.encoders[0].taps == (7, 15)
    assert cfg.model.encoders[0].pad_to_seconds is None


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=abc", "optim.lr"),
    ("model.dtype=float16", "model.dtype"),
    ("mesh.fsdp=1.5", "mesh.fsdp"),
    ("nosection.x=1", "nosection"),
    ("steps", "key.path=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_connector_kind_fails_before_any_weight_is_read(tmp_path):
    from alm_jax.data.pipeline import AudioSpec
    from alm_jax.weights.alm_params import build_alm
    cfg = load_config(None, ["model.connector.kind=qformer", f"model.llm={tmp_path / 'missing'}"])
    for build in (lambda: build_alm(cfg.model), lambda: AudioSpec.from_config(cfg)):
        with pytest.raises(ConfigError, match=r"model\.connector\.kind='qformer'.*choose one of \['alarm', "):
            build()


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_every_shipped_config_loads():
    from pathlib import Path
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for p in configs:
        cfg = load_config(p)
        assert cfg.steps > 0, p


def test_a_stored_config_from_before_scan_layers_rebuilds_unrolled_stacks():
    """Runs and bundles saved before `model.scan_layers` existed hold per-layer (unrolled) parameters: their
    config reads as scan_layers=false, and resuming one with today's default names the change."""
    from alm_jax.config import ModelConfig, resume_config_changes, with_legacy_model_values
    stored = to_dict(TrainConfig())
    assert stored["model"]["scan_layers"] is True and TrainConfig().model.remat == "none"
    del stored["model"]["scan_layers"]
    assert from_dict(ModelConfig, with_legacy_model_values(stored["model"])).scan_layers is False
    assert with_legacy_model_values({"scan_layers": True})["scan_layers"] is True
    assert resume_config_changes(stored, to_dict(TrainConfig())) == {"model.scan_layers": (False, True)}
    with pytest.raises(ConfigError, match="model.remat"):
        load_config(None, ["model.remat=some"])


def test_encoder_input_convention():
    """`model.encoders.N.input_convention`: native (default) or alarm; anything else names the key and the
    choices. A stored config from before the key reads native, so resuming an older ALARM run under today's
    ALARM configs (alarm) names the change."""
    from alm_jax.config import resume_config_changes
    assert TrainConfig().model.encoders[0].input_convention == "native"
    cfg = load_config(None, ["model.encoders.0.input_convention=alarm"])
    assert cfg.model.encoders[0].input_convention == "alarm"
    with pytest.raises(ConfigError, match=r"model\.encoders\[0\]\.input_convention: 'ALARM' is not allowed; "
                                          r"choose one of \['native', 'alarm'\]"):
        load_config(None, ["model.encoders.0.input_convention=ALARM"])
    stored = to_dict(TrainConfig())
    del stored["model"]["encoders"][0]["input_convention"]
    assert resume_config_changes(stored, to_dict(cfg)) == {"model.encoders.0.input_convention": ("native", "alarm")}
