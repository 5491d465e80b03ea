"""MKA manifold + NPIB scoring on hand-made data."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from layerfold.scoring.manifold import (
    diffusion_map,
    diffusion_maps,
    knn_entropies,
    knn_entropy,
    layer_embeddings,
    mutual_information,
    mutual_information_matrix,
    npib_similarity,
    rank_normalise,
)

N_SAMPLES, N_FEATURES = 200, 16


def _anisotropic(rng: np.random.Generator, n: int = N_SAMPLES, d: int = N_FEATURES) -> np.ndarray:
    """Gaussian cloud with well-separated axis scales, so the leading diffusion coordinates are
    well separated too (an isotropic cloud has near-degenerate ones that rotate under noise)."""
    return rng.standard_normal((n, d)) * np.geomspace(4.0, 0.25, d)


# 1. diffusion map ---------------------------------------------------------------------------


def test_diffusion_map_shape_finite_deterministic() -> None:
    x = _anisotropic(np.random.default_rng(0), n=60)
    x_before = x.copy()
    y = diffusion_map(x, dim=2)
    np.testing.assert_array_equal(x, x_before)  # the input is never modified
    assert y.shape == (60, 2)
    assert y.dtype == np.float64
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, diffusion_map(x, dim=2))
    # torch input (float32) gives the same embedding up to float32 input rounding.
    y_torch = diffusion_map(torch.from_numpy(x).float(), dim=2)
    signs = np.sign(np.sum(y * y_torch, axis=0))
    np.testing.assert_allclose(y_torch * signs, y, rtol=1e-4, atol=1e-4)
    assert diffusion_map(x, dim=3).shape == (60, 3)


def test_diffusion_map_is_permutation_equivariant() -> None:
    rng = np.random.default_rng(1)
    x = _anisotropic(rng, n=80)
    perm = rng.permutation(80)
    y = diffusion_map(x)
    y_perm = diffusion_map(x[perm])
    back = np.empty_like(y_perm)
    back[perm] = y_perm  # undo the permutation
    # Each diffusion coordinate is defined up to sign.
    signs = np.sign(np.sum(y * back, axis=0))
    np.testing.assert_allclose(back * signs, y, rtol=1e-7, atol=1e-9)


def test_diffusion_map_flattens_per_sample_activation_stacks() -> None:
    # (N, T, d) is one sample per row, distances over the whole (T, d) block, not token rows.
    x = np.random.default_rng(2).standard_normal((30, 4, 5))
    np.testing.assert_array_equal(diffusion_map(x), diffusion_map(x.reshape(30, 20)))


def test_rank_normalise() -> None:
    y = np.array([[3.0, np.nan], [1.0, 5.0], [2.0, -np.inf], [0.5, 2.0]])
    expected = np.array([[3, 0], [1, 3], [2, 1], [0, 2]]) / 4  # nan, -inf -> 0; tie by sample order
    np.testing.assert_array_equal(rank_normalise(y), expected)


# 2. NPIB ordering ---------------------------------------------------------------------------


def test_npib_orders_identical_noisy_and_independent_layers() -> None:
    rng = np.random.default_rng(0)
    a = _anisotropic(rng)
    b = a.copy()
    c = a + 0.05 * rng.standard_normal(a.shape)
    d = _anisotropic(rng)
    s = npib_similarity(layer_embeddings([a, b, c, d]))
    assert s.shape == (4, 4)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(np.diag(s), np.ones(4))
    assert s[0, 1] >= s[0, 2] > s[0, 3]
    assert s[0, 2] > 5 * s[0, 3]
    # Deterministic (seeded MI jitter).
    np.testing.assert_array_equal(s, npib_similarity(layer_embeddings([a, b, c, d])))


def test_knn_entropy_and_mi_basics() -> None:
    rng = np.random.default_rng(3)
    y = rng.uniform(size=(100, 2))
    # k at most N - 1 (the released code clamped silently; here it is an error).
    assert math.isfinite(knn_entropy(y[:5], k=4))
    with pytest.raises(ValueError, match=r"k=50 neighbours need at least k \+ 1 = 51 samples, got 5"):
        knn_entropy(y[:5], k=50)
    # Scaling by c shifts the estimate by d log c (here 2 log 10).
    assert knn_entropy(10 * y) - knn_entropy(y) == pytest.approx(2 * math.log(10))
    assert mutual_information(y, y) > mutual_information(y, rng.uniform(size=(100, 2)))
    assert mutual_information(y, y) == mutual_information(y, y)  # deterministic


# 3. entropy guard ---------------------------------------------------------------------------


def _mixed_sign_entropy_embeddings() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((N_SAMPLES, 2))
    tight = 1e-3 * base  # tightly clustered: very negative kNN entropy
    wide = 100.0 * (base + 0.1 * rng.standard_normal(base.shape))  # spread out: positive entropy
    tight2 = 1e-3 * (base + 0.5 * rng.standard_normal(base.shape))  # negative entropy as well
    return [tight, wide, tight2]


def test_guard_default_is_abs() -> None:
    assert inspect.signature(npib_similarity).parameters["guard"].default == "abs"


def test_guard_none_reproduces_nan_and_guards_fix_it() -> None:
    emb = _mixed_sign_entropy_embeddings()
    h = [knn_entropy(e) for e in emb]
    assert h[0] < 0 and h[1] > 0 and h[2] < 0

    raw = npib_similarity(emb, guard="none")
    # sqrt(H_tight * H_wide) = sqrt(negative): the released code's NaN.
    assert np.isnan(raw[0, 1]) and np.isnan(raw[1, 2])

    for guard in ("abs", "shift"):
        s = npib_similarity(emb, guard=guard)
        assert np.all(np.isfinite(s)) and np.all(s >= 0), guard
        np.testing.assert_array_equal(s, s.T)
        np.testing.assert_array_equal(np.diag(s), np.ones(3))
        clipped = npib_similarity(emb, guard=guard, clip=True)
        assert np.all(np.isfinite(clipped)) and np.all((clipped >= 0) & (clipped <= 1)), guard

    # Where both entropies are negative the code's value is finite, and "abs" agrees with it.
    s_abs = npib_similarity(emb, guard="abs")
    assert s_abs[0, 2] == pytest.approx(raw[0, 2], rel=1e-12)


def test_unknown_guard_rejected() -> None:
    with pytest.raises(ValueError):
        npib_similarity([np.zeros((10, 2))] * 2, guard="clip")


# 5. batched MI ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 40])
def test_mutual_information_matrix_equals_sklearn_per_pair(n: int) -> None:
    """The batched KSG estimate is scikit-learn's, bit for bit, on rank data full of distance ties."""
    rng = np.random.default_rng(n)
    base = rng.standard_normal((n, 30))
    layers = [base + 0.3 * i * rng.standard_normal(base.shape) for i in range(5)] + [rng.standard_normal((n, 30))]
    embeddings = layer_embeddings(layers)
    embeddings.append(embeddings[0].copy())  # an exact duplicate layer
    for n_neighbors, seed in ((5, 0), (3, 7)):
        expected = np.array([[mutual_information(a, b, n_neighbors=n_neighbors, seed=seed) for b in embeddings] for a in embeddings])
        np.testing.assert_array_equal(mutual_information_matrix(embeddings, n_neighbors=n_neighbors, seed=seed), expected)


def test_mutual_information_matrix_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfold.scoring.manifold as manifold

    embeddings = layer_embeddings([_anisotropic(np.random.default_rng(i), n=24) for i in range(4)])
    whole = mutual_information_matrix(embeddings)
    monkeypatch.setattr(manifold, "_KSG_BLOCK", 1)  # one feature column per block
    np.testing.assert_array_equal(mutual_information_matrix(embeddings), whole)


# 6. torch ports against the numpy/scikit-learn code they replaced ----------------------------
#
# The references below are the replaced implementations: the per-layer numpy diffusion map
# (np.linalg.cond, ridge retries, np.linalg.svd; kept once, in benchmarks/mka_similarity.py) and
# scikit-learn's NearestNeighbors entropy. The SVD's column signs are left to LAPACK there, so the reference gets
# the same sign rule as the port before comparing (largest-magnitude entry positive).


def _reference_diffusion_map(features: np.ndarray, sigma: float = 8.0, alpha: float = 0.5, dim: int = 2) -> np.ndarray:
    """The replaced per-layer numpy diffusion map, as benchmarks/mka_similarity.py keeps it for timing."""
    x = np.asarray(features, dtype=np.float64).reshape(features.shape[0], -1)
    return load_benchmark("mka_similarity").numpy_diffusion_map(x, sigma, alpha, dim)


def _reference_knn_entropy(y: np.ndarray, k: int) -> float:
    from sklearn.neighbors import NearestNeighbors

    y = np.asarray(y, dtype=np.float64)
    n, d = y.shape
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(y).kneighbors(y)
    r_k = np.maximum(distances[:, -1], np.finfo(np.float64).tiny)
    return float(-np.mean(np.log(k / (n * r_k**d))))


def _layers_of_a_residual_stream(n: int, seed: int, layers: int = 6) -> list[np.ndarray]:
    """Hidden states that drift layer by layer, with a large shared offset (an outlier dimension)."""
    rng = np.random.default_rng(seed)
    h = _anisotropic(rng, n=n, d=24) + np.r_[100.0, np.zeros(23)]
    out = []
    for _ in range(layers):
        h = h + 0.3 * np.tanh(h @ rng.standard_normal((24, 24)) / 5)
        out.append(h.copy())
    return out


@pytest.mark.parametrize(("n", "dim"), [(32, 2), (64, 3)])
def test_batched_diffusion_maps_equal_the_numpy_reference(n: int, dim: int) -> None:
    layers = _layers_of_a_residual_stream(n, seed=n)
    layers.append(layers[2].copy())  # a duplicate layer
    layers[0][5] = layers[0][6]  # duplicated samples: a near-singular kernel
    batched = diffusion_maps(layers, dim=dim).numpy()
    for got, x in zip(batched, layers):
        expected = _reference_diffusion_map(x, dim=dim)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    # The ranks MKA works on come out identical, not just close -- except between the duplicated
    # samples of layer 0, whose equal coordinates are ordered by rounding (as between LAPACK builds).
    for got, x in zip(layer_embeddings(layers[1:], dim=dim), layers[1:]):
        np.testing.assert_array_equal(got, rank_normalise(_reference_diffusion_map(x, dim=dim)))


def test_diffusion_map_signs_are_canonical_and_equivariant() -> None:
    rng = np.random.default_rng(4)
    x = _anisotropic(rng, n=50)
    y = diffusion_map(x)
    largest = np.argmax(np.abs(y), axis=0)
    assert np.all(y[largest, [0, 1]] > 0)
    perm = rng.permutation(50)
    back = np.empty_like(y)
    back[perm] = diffusion_map(x[perm])
    np.testing.assert_allclose(back, y, rtol=0, atol=1e-9)  # no sign alignment needed any more


def test_knn_entropies_equal_scikit_learn() -> None:
    rng = np.random.default_rng(5)
    embeddings = [rank_normalise(rng.standard_normal((40, 2))) for _ in range(5)]
    embeddings.append(rng.uniform(size=(40, 3)))  # another shape in the same call
    for k in (1, 3, 16, 39):
        got = knn_entropies(embeddings, k)
        expected = np.array([_reference_knn_entropy(e, k) for e in embeddings])
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert knn_entropy(embeddings[-1], 3) == pytest.approx(_reference_knn_entropy(embeddings[-1], 3), rel=1e-12)


def test_knn_entropy_of_duplicated_points_is_finite() -> None:
    y = np.random.default_rng(6).uniform(size=(40, 2))
    y[1:4] = y[0]  # r_3 = 0 for these four points: floored at the smallest normal float
    k, tiny = 3, np.finfo(np.float64).tiny
    r_k = np.maximum(np.sort(np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1)), axis=1)[:, k], tiny)
    expected = -np.mean(np.log(k) - np.log(40) - 2 * np.log(r_k))
    # The replaced code took log(k / (N r^2)) with r^2 = tiny^2 = 0: -inf. Now large and finite.
    assert knn_entropy(y, k) == pytest.approx(expected, rel=1e-12) and expected < -100


def test_similarity_of_real_activations_equals_the_reference_chain() -> None:
    """stories260K's layer outputs through the whole chain: the same ranks, the same MI, the same NPIB."""
    from conftest import models_dir

    from layerfold.capture import capture_statistics
    from layerfold.models.llama2c import load_llama2c_model

    path = models_dir() / "stories260K" / "stories260K.bin"
    if not path.is_file():
        pytest.skip("stories260K not present (set LAYERFOLD_MODELS_DIR)")
    model = load_llama2c_model(path)
    blocks = torch.randint(0, model.config.vocab_size, (32, 16), generator=torch.Generator().manual_seed(0))
    features = capture_statistics(model, blocks, 8, None).sample_features[1:]  # [5 layers, 32, 64] float32

    embeddings = layer_embeddings(list(features))
    reference = [rank_normalise(_reference_diffusion_map(f.double().numpy())) for f in features]
    for got, expected in zip(embeddings, reference):
        np.testing.assert_array_equal(got, expected)
    entropy = np.array([_reference_knn_entropy(e, 16) for e in reference])
    np.testing.assert_allclose(knn_entropies(embeddings, 16), entropy, rtol=1e-12)
    mi = np.array([[mutual_information(a, b) for b in reference] for a in reference])
    np.testing.assert_array_equal(mutual_information_matrix(embeddings), mi)
    expected = 0.5 * (mi / np.sqrt(np.outer(entropy, entropy)) + (mi / np.sqrt(np.outer(entropy, entropy))).T)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(npib_similarity(embeddings, k_entropy=16), expected, rtol=1e-12)
