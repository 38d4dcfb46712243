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
