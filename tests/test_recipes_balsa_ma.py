"""BALSa-MA: 2-3 clips per sample, labelled per-clip seed descriptions, differences / joint caption."""

import collections

import pytest

from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError
from alm_jax.recipes.balsa_ma import BalsaMaRecipe


@pytest.fixture(scope="module")
def source():
    return DemoSource(seed=4, n_clips=12, max_duration=3.0)


def test_items_hold_two_or_three_labelled_clips(source):
    recipe = BalsaMaRecipe(seed=1)
    sizes, tasks = collections.Counter(), collections.Counter()
    for i in range(30):
        item = recipe.item_for(i, source)
        md = item.metadata
        k = len(item.clips)
        sizes[k] += 1
        tasks[md["task"]] += 1
        assert md["clip_indices"][0] == i % len(source) and len(set(md["clip_indices"])) == k
        assert [m.clip_id for m, _ in item.clips] == [source[j][0].clip_id for j in md["clip_indices"]]
        assert item.seed_descriptions == [desta_seed_description(source[j][0]) for j in md["clip_indices"]]
        user = item.generation_messages[1]["content"]
        blocks = "\n".join(f"[Begin of audio {n}]\n{seed}\n[End of audio {n}]"
                           for n, seed in enumerate(item.seed_descriptions, 1))
        assert user.startswith(f"{blocks}\n{md['instruction']}\n\n")
        training = item.record_messages[1]["content"]
        assert training == "\n".join(f"Audio {n}: <start_audio><audio><end_audio>" for n in range(1, k + 1)) \
            + "\n" + md["instruction"]
        assert item.item_id == "+".join(m.clip_id for m, _ in item.clips)
        if k == 3 and "{n}" not in md["instruction"]:
            assert "two" not in md["instruction"]
        record = Record.from_bytes(item.to_record("The first clip has a bell; the second a siren.", "fake").to_bytes())
        assert len(record.clips) == k and record.metadata["clip_indices"] == md["clip_indices"]
    assert set(sizes) == {2, 3} and set(tasks) == {"differences", "joint_caption"}
    only = BalsaMaRecipe(seed=1, min_clips=3, max_clips=3, differences=0)
    assert {len(only.item_for(i, source).clips) for i in range(5)} == {3}
    assert {only.item_for(i, source).metadata["task"] for i in range(5)} == {"joint_caption"}


def test_errors(source):
    with pytest.raises(ConfigError, match="min_clips"):
        BalsaMaRecipe(min_clips=1)
    with pytest.raises(ConfigError, match="fewer than min_clips"):
        BalsaMaRecipe(min_clips=3).item_for(0, DemoSource(seed=0, n_clips=2, kinds=("events",)))
