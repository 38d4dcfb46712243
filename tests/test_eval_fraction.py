"""`data.fraction` selects the nested subset of the *training* corpus only: held-out data is read whole (a
data-size study scores every point on the same held-out set)."""

import json

from tiny_setup import tiny_config


def _rows(data) -> int:
    n = 0
    for batch in data.iterator():
        n += int((batch["loss_mask"].sum(axis=1) > 0).sum())
    return n


def test_fraction_subsets_training_data_not_held_out_data(tiny, tmp_path):
    from alm_jax.data.multihost import build_batches
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path, "data.fraction=0.25", "data.batch_size=4")
    kw = dict(rows=(0, 4), shuffle=False, epochs=1, batch_size=4)
    held_out = _rows(build_batches(cfg, cfg.model.llm, [paths["eval_corpus"]], what="eval.corpus", **kw))
    train = _rows(build_batches(cfg, cfg.model.llm, [paths["eval_corpus"]], **kw))
    assert held_out == 20                 # every held-out record (tiny_setup writes 20)
    assert train == 4                     # floor(0.25 * 20) = 5 records, one full batch of 4 per epoch


def test_training_weights_do_not_apply_to_held_out_corpora(tiny, tmp_path):
    """`data.weights` mix the training corpora; two held-out directories are read whole, mixed in proportion to their records (a weight list
    of another length used to stop the held-out loss)."""
    from alm_jax.data.multihost import build_batches
    from alm_jax.errors import ConfigError
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path, f"data.corpus=[{paths['corpus']}]", "data.weights=[1]", "data.batch_size=4")
    kw = dict(rows=(0, 4), shuffle=False, epochs=1, batch_size=4)
    held = [paths["eval_corpus"], paths["corpus"]]
    assert _rows(build_batches(cfg, cfg.model.llm, held, what="eval.corpus", **kw)) == 20 + 48
    try:   # the training side still checks its weights against its corpora
        _rows(build_batches(cfg, cfg.model.llm, held, **kw))
    except (ConfigError, ValueError) as e:
        assert "weight" in str(e).lower()
    else:
        raise AssertionError("two training corpora with one weight were accepted")
