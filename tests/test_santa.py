"""MATS noise injection, k-means and Santa retrieval, checked against NumPy brute force and, step by step (k-means
centroids per iteration; retrieval indices, noised entries, weights, output), against a NumPy transcription of the
published algorithm (MATS-LLaMA `kmeans_memory_bank`, `encode_audio`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm_jax.errors import CheckpointError, ConfigError
from alm_jax.models.connectors import (SantaBank, SantaConfig, SantaMemory, SantaMix, kmeans, l2_normalize,
                                      noise_injection)
from alm_jax.sharding import make_mesh, state_shardings


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_santa(z, bank, centroids, assign, cfg: SantaConfig):
    """The reference algorithm (MATS `encode_audio`, k-means branch) in NumPy, without noise.
    Returns (retrieved bank indices per row as a sorted multiset, mixed embedding)."""
    idx_out, z_out = [], []
    for za in z:
        c = int(np.argmin(np.linalg.norm(centroids - za, axis=1)))
        members = np.flatnonzero(assign == c)            # bank order, like the reference's cluster list
        if len(members) < cfg.k:                         # pad by repeating the first member
            members = np.concatenate([members, np.repeat(members[:1], cfg.k - len(members))])
        d = np.linalg.norm(bank[members] - za, axis=1)
        top = members[np.argsort(d, kind="stable")[:cfg.k]]
        m = _unit(bank[top])
        w = np.exp(cfg.tau * (m @ za) - np.max(cfg.tau * (m @ za)))
        w = w / w.sum()
        idx_out.append(np.sort(top))
        z_out.append(_unit((1 - cfg.lam) * za + cfg.lam * (w[:, None] * m).sum(0)))
    return np.stack(idx_out), np.stack(z_out)


def test_noise_injection_normalizes_and_perturbs():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)) * 3, jnp.float32)
    y = noise_injection(x, 0.1, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), 1.0, atol=1e-6)
    assert float(jnp.max(jnp.abs(y - l2_normalize(x)))) > 1e-3
    assert float(jnp.max(jnp.abs(y - noise_injection(x, 0.1, jax.random.PRNGKey(1))))) > 1e-3
    np.testing.assert_allclose(np.asarray(noise_injection(x, 0.0, jax.random.PRNGKey(0))),
                               _unit(np.asarray(x)), atol=1e-6)


def test_kmeans_inertia_never_increases_and_assignment_is_nearest_centroid():
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    centroids, assign, history = kmeans(jnp.asarray(x), 12, 15, seed=3)
    h = np.asarray(history)
    assert h.shape == (16,)
    assert np.all(np.diff(h) <= 1e-4 * h[0]), h
    assert h[-1] < h[0]
    d = ((x[:, None, :] - np.asarray(centroids)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(assign), d.argmin(1))
    np.testing.assert_allclose(h[-1], d.min(1).sum(), rtol=1e-4)
    # deterministic per seed
    c2, a2, _ = kmeans(jnp.asarray(x), 12, 15, seed=3)
    np.testing.assert_array_equal(np.asarray(c2), np.asarray(centroids))
    c3, _, _ = kmeans(jnp.asarray(x), 12, 15, seed=4)
    assert not np.array_equal(np.asarray(c3), np.asarray(centroids))


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(2)
    centers = 20 * np.eye(4, 6, dtype=np.float32)
    labels = rng.integers(0, 4, size=200)
    x = centers[labels] + rng.normal(size=(200, 6)).astype(np.float32) * 0.1
    for seed in range(3):
        c, a, _ = kmeans(jnp.asarray(x), 4, 10, seed=seed)
        a = np.asarray(a)
        # same partition as the truth (up to renaming) when the seeds hit all four blobs
        if len(set(a.tolist())) == 4:
            pairs = set(zip(labels.tolist(), a.tolist()))
            assert len(pairs) == 4
            for k in range(4):
                np.testing.assert_allclose(np.asarray(c)[k], x[a == k].mean(0), atol=1e-4)
            return
    pytest.fail("k-means never found the four blobs in three seeds")


@pytest.mark.parametrize("n,k_clusters,k", [(120, 6, 5), (60, 12, 8), (40, 3, 32)])
def test_retrieval_matches_brute_force_within_nearest_cluster(n, k_clusters, k):
    """Several random banks; small clusters (fewer members than k) exercise the first-member padding."""
    rng = np.random.default_rng(n + k)
    cfg = SantaConfig(n_clusters=k_clusters, iters=5, k=k, noise_std=0.0, seed=1)
    mem = SantaMemory.from_embeddings(rng.normal(size=(n, 16)).astype(np.float32), cfg)
    bank, cent, assign = (np.asarray(v[...]) for v in (mem.bank, mem.centroids, mem.assign))
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-6)
    z = (rng.normal(size=(7, 16)) * 2).astype(np.float32)   # un-normalized audio embeddings
    want_idx, want_z = _np_santa(z, bank, cent, assign, cfg)
    got_idx = np.sort(np.asarray(mem.retrieve_indices(jnp.asarray(z))), axis=1)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(np.asarray(mem(jnp.asarray(z))), want_z, atol=1e-5)


def test_retrieved_entries_are_nearest_first_and_z_a_is_not_normalized():
    rng = np.random.default_rng(4)
    mem = SantaMemory.from_embeddings(rng.normal(size=(80, 8)).astype(np.float32),
                                      SantaConfig(n_clusters=2, iters=5, k=4, noise_std=0.0))
    z = jnp.asarray(rng.normal(size=(3, 8)) * 5, jnp.float32)
    idx = np.asarray(mem.retrieve_indices(z))
    d = np.linalg.norm(np.asarray(mem.bank[...])[idx] - np.asarray(z)[:, None], axis=-1)
    assert np.all(np.diff(d, axis=1) >= 0)
    # scaling z_a changes the mix (softmax(tau * dot) sees its norm): the reference does not normalize it
    assert float(jnp.max(jnp.abs(mem(z) - mem(z / 5.0)))) > 1e-3


def test_lambda_zero_is_the_plain_path():
    rng = np.random.default_rng(5)
    mem = SantaMemory.from_embeddings(rng.normal(size=(50, 8)).astype(np.float32),
                                      SantaConfig(n_clusters=4, iters=3, k=4))
    z = jnp.asarray(rng.normal(size=(3, 8)) * 3, jnp.float32)
    np.testing.assert_array_equal(np.asarray(mem(z, jax.random.PRNGKey(0), lam=0.0)), np.asarray(l2_normalize(z)))
    # noise on the retrieved entries: different keys give different mixes, the result stays unit-norm
    a, b = mem(z, jax.random.PRNGKey(0)), mem(z, jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=-1), 1.0, atol=1e-6)


def test_memory_lives_in_model_state_not_in_params_and_round_trips(tmp_path):
    rng = np.random.default_rng(6)
    cfg = SantaConfig(n_clusters=5, iters=4, k=3)
    mem = SantaMemory.from_embeddings(rng.normal(size=(40, 8)).astype(np.float32), cfg)
    assert set(nnx.state(mem, SantaBank).keys()) == {"bank", "centroids", "assign"}
    assert not nnx.state(mem, nnx.Param)
    shardings = state_shardings(nnx.state(mem), make_mesh(devices=jax.devices()[:1]))  # replicated
    assert shardings["bank"].get_value().spec == jax.sharding.PartitionSpec()
    # restore through the nnx state, as a checkpoint would
    fresh = SantaMemory(40, 8, cfg)
    nnx.update(fresh, nnx.state(mem))
    z = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(np.asarray(fresh(z, key)), np.asarray(mem(z, key)))
    # file round trip
    path = tmp_path / "santa.safetensors"
    mem.save(path)
    loaded = SantaMemory.load(path)
    assert loaded.cfg == cfg
    for name in ("bank", "centroids", "assign"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)[...]), np.asarray(getattr(mem, name)[...]))
    with pytest.raises(CheckpointError, match="does not exist"):
        SantaMemory.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk"):
        SantaMemory.load(tmp_path / "junk.safetensors")


def test_santa_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="k=32"):
        SantaMemory(10, 4, SantaConfig(n_clusters=2))
    with pytest.raises(ConfigError, match="n_clusters"):
        SantaMemory(40, 4, dataclasses.replace(SantaConfig(), n_clusters=41, k=4))


def _np_kmeans(x, init, iters):
    """MATS `kmeans_memory_bank` in NumPy from given initial means: per iteration, assign each row to its nearest
    mean (squared L2), move each mean to its members' average (an empty cluster keeps its mean); then the final
    assignment by L2. Returns (means after each iteration, final assignment)."""
    means, history = init.astype(np.float64), []
    for _ in range(iters):
        buckets = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        new = np.zeros_like(means)
        np.add.at(new, buckets, x)
        counts = np.bincount(buckets, minlength=len(means))
        means = np.where(counts[:, None] > 0, new / np.maximum(counts, 1)[:, None], means)
        history.append(means.copy())
    return history, np.linalg.norm(x[:, None, :] - means[None], axis=-1).argmin(1)


def test_kmeans_matches_the_published_lloyd_iterations_step_by_step():
    rng = np.random.default_rng(7)
    x = _unit(rng.normal(size=(150, 10))).astype(np.float32)
    init_idx = np.asarray(jax.random.permutation(jax.random.PRNGKey(5), 150)[:7])   # kmeans' documented init
    history, assign = _np_kmeans(x.astype(np.float64), x[init_idx], 6)
    for t in (1, 6):   # after t iterations
        c, a, _ = kmeans(jnp.asarray(x), 7, t, seed=5)
        np.testing.assert_allclose(np.asarray(c), history[t - 1], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a), assign)


def _np_encode_audio(z, bank, centroids, assign, cfg: SantaConfig, gauss):
    """MATS `encode_audio` (k-means branch) in NumPy, float64: nearest centroid by L2; that cluster's members (bank
    order) padded to k by repeating the first; the k nearest by L2 (nearest first); noise injection
    normalize(normalize(m) + std * gauss) with the given standard-normal draws `gauss [b, k, d]`; w = softmax(tau *
    <z, m_i>); z' = (1 - lam) z + lam sum_i w_i m_i, normalized (the mapper's F.normalize). Returns the steps."""
    idx, ent, wts, out = [], [], [], []
    for b, za in enumerate(z.astype(np.float64)):
        c = int(np.argmin(np.linalg.norm(centroids - za, axis=1)))
        members = np.flatnonzero(assign == c)
        if len(members) < cfg.k:
            members = np.concatenate([members, np.repeat(members[:1], cfg.k - len(members))])
        top = members[np.argsort(np.linalg.norm(bank[members] - za, axis=1), kind="stable")[:cfg.k]]
        m = _unit(_unit(bank[top].astype(np.float64)) + cfg.noise_std * gauss[b])
        logits = cfg.tau * (m @ za)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        idx.append(top)
        ent.append(m)
        wts.append(w)
        out.append(_unit((1 - cfg.lam) * za + cfg.lam * (w[:, None] * m).sum(0)))
    return np.stack(idx), np.stack(ent), np.stack(wts), np.stack(out)


@pytest.mark.parametrize("noise_std", [0.0, 0.1224744871391589])   # the published variance 0.015
def test_santa_steps_match_the_published_algorithm(noise_std):
    """Every step on random data: retrieval indices (in order), the noise-injected entries, the weights, the output.
    Clusters hold more than k entries here, so the nearest-first order (and which noise draw meets which entry) is
    unambiguous; the padded case is checked by `test_retrieval_matches_brute_force_within_nearest_cluster`."""
    rng = np.random.default_rng(11)
    cfg = SantaConfig(n_clusters=4, iters=6, k=6, tau=10.0, lam=0.3, noise_std=noise_std, seed=2)
    mem = SantaMemory.from_embeddings(rng.normal(size=(160, 12)).astype(np.float32), cfg)
    bank, cent, assign = (np.asarray(v[...]) for v in (mem.bank, mem.centroids, mem.assign))
    assert np.bincount(assign, minlength=4).min() > cfg.k
    z = (rng.normal(size=(5, 12)) * 1.5).astype(np.float32)   # un-normalized, as MATS' audio embeddings
    key = jax.random.PRNGKey(3)
    gauss = np.asarray(jax.random.normal(key, (5, cfg.k, 12), jnp.float32), np.float64)   # noise_injection's draw
    want_idx, want_m, want_w, want_z = _np_encode_audio(z, bank, cent, assign, cfg, gauss)
    got: SantaMix = mem.mix(jnp.asarray(z), key)
    np.testing.assert_array_equal(np.asarray(got.indices), want_idx)
    np.testing.assert_allclose(np.asarray(got.entries), want_m, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.weights), want_w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.z), want_z, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mem(jnp.asarray(z), key)), want_z, atol=1e-5)
    assert want_w.max(-1).min() < 0.99   # the weights are a real mixture, not one entry


def test_santa_defaults_are_the_published_values():
    """§4 / digest item 21: K=100 k-means clusters, top-32 retrieval, softmax(10 * dot), lambda 0.3, in the
    config class and in `alm santa`'s defaults."""
    from alm_jax.cli import build_parser
    cfg = SantaConfig()
    assert (cfg.n_clusters, cfg.k, cfg.tau, cfg.lam) == (100, 32, 10.0, 0.3)
    args = build_parser().parse_args(["santa", "CKPT"])
    assert (args.clusters, args.top_k, args.tau, args.lam) == (100, 32, 10.0, 0.3)
