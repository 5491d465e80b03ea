"""MKA layer similarity: diffusion-map manifolds and the NPIB score (Liu et al., EMNLP 2024).

This module measures; which pair MKA merges and with what weight is decided in :mod:`layerfold.methods.mka`.

Pipeline (formulas as in the released ``pipeline.py`` of SempraETY/Pruning-via-Merging)::

    features_l (N, D)  --diffusion_map-->  (N, dim)  --rank_normalise-->  Y_l (N, dim) in [0, 1)
    S_ij = MI(Y_i, Y_j) / sqrt(H(Y_i) H(Y_j))                             (npib_similarity)

Deliberate departures from the released code, all documented where they happen:

- The kernel is built over **calibration samples** (one row per sample). The released code meant to
  do this but, through ``L2_distance_chunked``/``next(...)``, built it over the first token rows of
  prompt 0 only.
- The NPIB denominator is guarded against negative kNN entropies (``guard=``), NaN is replaced by 0,
  and the matrix is symmetrised; ``guard="none"`` keeps the released behaviour for parity runs.
- The sign of every diffusion coordinate is fixed (largest-magnitude entry positive). The SVD leaves
  it to the LAPACK build, and the rank/KSG statistics are not invariant to it (see
  :func:`_canonical_signs`).

Everything is computed in float64; the functions are pure and deterministic (the only randomness,
the jitter ``mutual_info_regression`` adds, is seeded).

**Where it runs, and what it costs.** ``L`` layers, ``N`` calibration samples, ``F`` features per
sample (``hidden``, or ``T * hidden`` for a flattened activation stack), ``d = dim`` coordinates:

- diffusion maps (:func:`diffusion_maps`): ``L`` Gram matrices, ``O(L N^2 F)``, then the ``(N, N)``
  kernel algebra, condition numbers and SVDs of all layers batched, ``O(L N^3)``;
- kNN entropies (:func:`knn_entropies`): ``O(L N^2 d)`` distances and one ``k``-th value per point;
- MI matrix (:func:`mutual_information_matrix`): ``O((L d)^2 N^2)`` elementwise work;
- ranks and the KSG column scaling: ``O(L N d log N)`` in numpy (exact integer work and seeded jitter).

The first three are batched tensor ops on any torch device (the model's, in MKA) instead of ``O(L)``
numpy/scikit-learn calls with fixed per-call costs, and equal those calls: the MI bit for bit, the
diffusion coordinates and entropies to float64 rounding (the tests keep the replaced numpy code as
the reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.feature_selection import mutual_info_regression

ArrayLike = np.ndarray | torch.Tensor

GUARDS = ("abs", "shift", "none")

# Feature columns converted to float64 at a time when building the Gram matrix: bounds the extra
# memory to N x 65536 doubles even when a sample is a flattened (tokens x hidden) activation.
_FEATURE_CHUNK = 1 << 16

# Distance entries held at once by the kNN statistics (:func:`knn_entropies`,
# :func:`mutual_information_matrix`): bounds their memory to about this many float64 entries
# (256 MiB) whatever the number of layers and samples.
_KSG_BLOCK = 1 << 25


# --------------------------------------------------------------------------------------------
# Diffusion map
# --------------------------------------------------------------------------------------------


def _rows(features: ArrayLike) -> ArrayLike:
    """View ``features`` as ``(N, F)``: one row per sample, trailing axes flattened.

    A ``(N, T, d)`` activation stack becomes ``(N, T*d)``, so the distance between two samples is
    the Frobenius distance between their activation matrices: the sample x sample kernel the
    released code intended (its bug took token rows of prompt 0 instead).
    """
    if features.ndim < 2:
        raise ValueError(f"features must be (N samples, D features), got shape {tuple(features.shape)}")
    return features.reshape(features.shape[0], -1)


def _chunk_f64(x: ArrayLike, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Columns ``start:stop`` of a 2-D array or tensor as a fresh float64 tensor on ``device``.

    Always a copy: the caller centres it in place, which must never write into the input.
    """
    chunk = torch.as_tensor(x[:, start:stop])
    return chunk.detach().to(device=device, dtype=torch.float64, copy=True)


def _pairwise_l2(features_per_layer: Sequence[ArrayLike], device: torch.device) -> torch.Tensor:
    """Euclidean distances between the rows of every layer's features, ``(L, N, N)`` float64, exact-zero diagonal.

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product per layer and feature chunk, like the released
    code) but on column-centred data: distances are translation invariant, and LLM hidden states
    carry large shared offsets (outlier dimensions) that would otherwise cancel catastrophically.
    The precision matters because the kernel takes sqrt(distance), which turns a 1e-8 rounding
    residue on a duplicate pair into a 1e-4 change of its kernel entry.
    """
    grams = []
    for features in features_per_layer:
        x = _rows(features)
        n, f = x.shape
        gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        for start in range(0, f, _FEATURE_CHUNK):
            chunk = _chunk_f64(x, start, min(start + _FEATURE_CHUNK, f), device)
            chunk -= chunk.mean(dim=0, keepdim=True)
            gram += chunk @ chunk.T
        grams.append(gram)
    gram = torch.stack(grams)
    sq_norms = torch.diagonal(gram, dim1=-2, dim2=-1)
    # Rounding can leave tiny negatives; the code takes abs(), clamping at 0 is the same up to 1 ulp.
    sq_dist = (sq_norms[:, :, None] + sq_norms[:, None, :] - 2.0 * gram).clamp_min(0.0)
    dist = torch.sqrt(sq_dist)
    # A point's distance to itself is 0 by definition, not whatever the rounding left.
    dist.diagonal(dim1=-2, dim2=-1).zero_()
    # Exact symmetry, so that A below is exactly symmetric and U == V in its SVD.
    return 0.5 * (dist + dist.transpose(-2, -1))


def _canonical_signs(psi: torch.Tensor) -> torch.Tensor:
    """Flip each coordinate ``psi[l, :, k]`` so that its largest-magnitude entry is positive.

    An eigenvector's sign is arbitrary: LAPACK builds (numpy's OpenBLAS, torch's MKL, cuSOLVER) may
    return either. It is not harmless here: ranks reverse under a flip, and the KSG estimate of MI
    then breaks its distance ties (multiples of 1/N on rank data) with the same seeded jitter in the
    opposite direction, which moved entries of SmolLM2's similarity matrix by up to 0.026. Fixing
    the sign (scikit-learn's ``svd_flip`` rule) makes the embedding, and everything downstream, the
    same on every backend and device.
    """
    largest = psi.abs().argmax(dim=-2, keepdim=True)  # (L, 1, dim)
    signs = torch.sign(torch.gather(psi, -2, largest))
    return psi * torch.where(signs == 0, torch.ones_like(signs), signs)


def diffusion_maps(
    features_per_layer: Sequence[ArrayLike],
    sigma: float = 8.0,
    alpha: float = 0.5,
    dim: int = 2,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """MKA diffusion-map embedding of every layer's calibration samples, ``L x (N, D) -> (L, N, dim)``.

    All layers go through one batched computation on ``device`` (float64): the ``(N, N)`` kernel
    algebra, the condition-number check and the SVD of all ``L`` matrices at once. The result equals
    the per-layer numpy computation this replaced to float64 rounding (``tests/scoring/test_manifold.py``
    keeps that computation as the reference), with the sign of each coordinate fixed by
    :func:`_canonical_signs`; only coordinates whose top singular values coincide (a rotation within
    a degenerate eigenspace) could differ by more, as they do between LAPACK builds.

    Args:
        features_per_layer: ``L`` arrays or tensors of shape ``(N, D)`` (a ``(N, T, d)`` stack is
            flattened to ``(N, T*d)``), any float dtype, one row per calibration sample.
        sigma: kernel scale ``sigma_K`` (code default 8).
        alpha: density-normalisation exponent (code default 0.5).
        dim: embedding dimension ``d`` (code default 2).
        device: where the float64 work runs; the features are moved there chunk by chunk.

    Returns:
        ``(L, N, dim)`` float64 on ``device``: the diffusion coordinates ``psi_1 .. psi_dim``.
    """
    device = torch.device(device)
    counts = {f.shape[0] for f in features_per_layer}
    if len(counts) != 1:
        raise ValueError(f"every layer needs the same calibration samples, got sample counts {sorted(counts)}")
    n = counts.pop()
    if n < dim + 1:
        raise ValueError(f"need at least dim + 1 = {dim + 1} samples, got {n}")

    # D_ij = ||x_i - x_j||_2 between calibration samples.
    dist = _pairwise_l2(features_per_layer, device)

    # K_ij = exp(-(D_ij / sigma)^(1/2)): a Laplacian-type kernel on sqrt-distance, not a Gaussian
    # (exactly as coded). exp(-c |x - y|^b) is positive definite for 0 < b <= 2 (Schoenberg), so
    # A below is symmetric positive definite and its SVD is its eigendecomposition.
    kernel = torch.exp(-torch.sqrt(dist / sigma))

    # Coifman-Lafon alpha-normalisation: divide by (p_i p_j)^alpha, p = kernel density estimate,
    # so that the embedding reflects the manifold's geometry rather than the sampling density
    # (alpha = 0.5 is the Fokker-Planck normalisation).
    p = kernel.sum(dim=-2)
    k1 = kernel / (p[:, :, None] * p[:, None, :]) ** alpha

    # Symmetric normalisation A = V^-1/2 K1 V^-1/2, v_i^2 = degree of i: A is conjugate to the
    # Markov matrix V^-1 K1, so its top singular vector is ~ v (eigenvalue 1) and the next ones give
    # the diffusion coordinates after dividing by it.
    v = torch.sqrt(k1.sum(dim=-2))
    a = k1 / (v[:, :, None] * v[:, None, :])

    # The code's safeguard: if A is numerically singular (cond = inf), add a growing ridge
    # (1e-6 I, then x10 per retry, at most 10 times) so the SVD is well defined. Per layer, as coded:
    # only the layers still singular get the next ridge.
    eye = torch.eye(n, dtype=a.dtype, device=device)
    singular = ~torch.isfinite(torch.linalg.cond(a))
    ridge = 1e-6
    for _ in range(10):
        if not bool(singular.any()):
            break
        a = torch.where(singular[:, None, None], a + eye * ridge, a)
        singular = singular & ~torch.isfinite(torch.linalg.cond(a))
        ridge *= 10.0

    # As coded: NaN -> 0 and entries below 1e-12 in magnitude raised to 1e-12 (kernel entries that
    # underflowed for far-apart samples), so no row of A is exactly zero.
    a = torch.nan_to_num(a, nan=0.0)
    a = torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)

    u = torch.linalg.svd(a, full_matrices=False).U[..., : dim + 1]
    # psi_k = phi_k / phi_0 turns eigenvectors of the symmetric A into right eigenvectors of the
    # Markov matrix (the diffusion coordinates). phi_0 ~ v has one sign and no zeros in exact
    # arithmetic; the code's 1e-8 replacement only protects against a degenerate zero.
    phi0 = u[..., :1]
    phi0 = torch.where(phi0 == 0, torch.full_like(phi0, 1e-8), phi0)
    # Column 0 would be constant 1 (the trivial coordinate); keep psi_1 .. psi_dim.
    return _canonical_signs(u[..., 1 : dim + 1] / phi0)


def diffusion_map(
    features: ArrayLike, sigma: float = 8.0, alpha: float = 0.5, dim: int = 2, device: str | torch.device = "cpu"
) -> np.ndarray:
    """:func:`diffusion_maps` of one layer, ``(N, D) -> (N, dim)`` float64 numpy.

    Each column is defined up to sign by the SVD; the sign is fixed by :func:`_canonical_signs`.
    """
    return diffusion_maps([features], sigma=sigma, alpha=alpha, dim=dim, device=device)[0].cpu().numpy()


def rank_normalise(y: np.ndarray) -> np.ndarray:
    """Per-column ranks scaled to ``[0, 1)``: ``argsort(argsort(y, 0), 0) / N``, shape kept.

    Non-finite entries become 0 first (as coded), so a blown-up coordinate cannot poison the ranks.
    Ranks make the embedding invariant to monotone distortions of each coordinate (and to the
    arbitrary sign of each diffusion coordinate, up to a reflection that kNN statistics ignore).
    A stable sort makes ties (e.g. several zeros) resolve by sample order, deterministically.
    """
    y = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    ranks = np.argsort(np.argsort(y, axis=0, kind="stable"), axis=0, kind="stable")
    return ranks / y.shape[0]


def layer_embeddings(
    features_per_layer: Sequence[ArrayLike],
    sigma: float = 8.0,
    alpha: float = 0.5,
    dim: int = 2,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """``rank_normalise(diffusion_map(f))`` for every layer: ``L x (N, D_l) -> L x (N, dim)``.

    All layers must see the same ``N`` calibration samples in the same order: the NPIB compares
    layers sample by sample. The diffusion maps run batched on ``device`` (:func:`diffusion_maps`);
    the ranks, exact integer work on ``L x N x dim`` numbers, are taken in numpy.
    """
    coordinates = diffusion_maps(features_per_layer, sigma=sigma, alpha=alpha, dim=dim, device=device).cpu().numpy()
    return [rank_normalise(y) for y in coordinates]


# --------------------------------------------------------------------------------------------
# NPIB
# --------------------------------------------------------------------------------------------


def _as_2d(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(-1, 1) if y.ndim == 1 else y


def knn_entropies(embeddings: Sequence[np.ndarray], k: int = 50, device: str | torch.device = "cpu") -> np.ndarray:
    """kNN entropy estimate of every embedding ``(N, d)`` as coded: ``-mean log(k / (N r_k^d))`` in nats, ``(L,)``.

    ``r_k`` is each point's Euclidean distance to its k-th nearest other point; ``N < 2`` gives 0 (as
    coded). ``k`` must be below ``N``: the released code silently clamped it to ``N - 1``, which
    changes the estimator without saying so.

    This is the Kozachenko-Leonenko estimator without the unit-ball volume and digamma terms
    (``log pi`` short for ``d = 2``), so it can be, and on rank-normalised embeddings in
    ``[0, 1)^d`` (true differential entropy <= 0) usually is, **negative**; see
    :func:`npib_similarity` for what that does to the NPIB. Distances are floored at the smallest
    normal float and the logarithm is taken term by term, so that duplicated points give a large
    finite value instead of ``-inf`` (the replaced code computed ``r^d`` first, which underflowed to
    0 for ``d >= 2`` and gave ``-inf``; rank-normalised embeddings have no duplicated points).

    All layers of one shape are one batched tensor computation on ``device`` (exact differences, then
    the ``(k + 1)``-th smallest distance per point, the point itself being the smallest), in blocks of
    about ``_KSG_BLOCK`` entries. It replaced one scikit-learn ``NearestNeighbors`` call per layer,
    whose ~15 ms fixed cost was half of a 30-layer similarity; scikit-learn's brute-force distances
    use ``|a|^2 + |b|^2 - 2 a.b``, so the two agree to float64 rounding (within 4e-16 relative on
    SmolLM2's 30 rank-normalised layers), not bit for bit.
    """
    embeddings = [_as_2d(e) for e in embeddings]
    out = np.zeros(len(embeddings))
    shapes = sorted({e.shape for e in embeddings})
    for n, d in shapes:
        if n < 2:
            continue
        if not 1 <= k <= n - 1:
            raise ValueError(f"k={k} neighbours need at least k + 1 = {k + 1} samples, got {n}; lower k")
        index = [i for i, e in enumerate(embeddings) if e.shape == (n, d)]
        y = torch.from_numpy(np.stack([embeddings[i] for i in index])).to(device)
        rows = max(1, _KSG_BLOCK // (n * n * d))
        for start in range(0, len(index), rows):
            block = y[start : start + rows]
            distances = (block[:, :, None, :] - block[:, None, :, :]).square().sum(-1).sqrt()  # (b, N, N)
            r_k = torch.kthvalue(distances, k + 1, dim=-1).values.clamp_min(np.finfo(np.float64).tiny)
            # log(k / (N r^d)) as a sum of logs: r^d of the floored distance underflows to 0 for d >= 2.
            entropy = -(math.log(k) - math.log(n) - d * torch.log(r_k)).mean(dim=-1)
            out[index[start : start + rows]] = entropy.cpu().numpy()
    return out


def knn_entropy(y: np.ndarray, k: int = 50) -> float:
    """:func:`knn_entropies` of one embedding ``(N, d)``."""
    return float(knn_entropies([y], k)[0])


def mutual_information(y_i: np.ndarray, y_j: np.ndarray, n_neighbors: int = 5, seed: int = 0) -> float:
    """MKA's MI between two layer embeddings ``(N, d_i)`` and ``(N, d_j)``, in nats, ``>= 0``.

    As coded: for each coordinate ``k`` of ``y_j``, ``mutual_info_regression(y_i, y_j[:, k])``
    gives one KSG estimate per coordinate of ``y_i`` (marginal, not joint); average those, then
    average over ``k``. Not symmetric in ``(i, j)`` in general. ``n_neighbors`` is clamped to
    ``N - 1`` (as coded); ``seed`` fixes the small jitter scikit-learn adds to break ties, which
    makes the estimate deterministic.
    """
    y_i, y_j = _as_2d(y_i), _as_2d(y_j)
    n = y_i.shape[0]
    if y_j.shape[0] != n:
        raise ValueError(f"embeddings must share samples: {n} vs {y_j.shape[0]} rows")
    if n < 2:
        return 0.0
    n_neighbors = min(n_neighbors, max(1, n - 1))
    per_target = [
        float(
            np.mean(
                mutual_info_regression(
                    y_i, y_j[:, k], discrete_features=False, n_neighbors=n_neighbors, random_state=seed
                )
            )
        )
        for k in range(y_j.shape[1])
    ]
    return float(np.mean(per_target))


def _scaled(x: np.ndarray) -> np.ndarray:
    """``sklearn.preprocessing.scale(x, with_mean=False)`` for a dense float64 array, without its input checks.

    The same numpy calls on the same shapes (``nanstd`` over axis 0, near-zero scales set to 1 for a
    2-D array, exactly zero for a 1-D one), hence the same bits; scikit-learn's validation cost
    ~1.5 ms per call, 3 L d calls per similarity matrix. ``tests/scoring/test_manifold.py`` checks the
    whole MI matrix against scikit-learn's own estimator bit for bit, which covers this.
    """
    std = np.nanstd(x, axis=0)
    if np.isscalar(std) or std.ndim == 0:
        return x / (1.0 if std == 0.0 else std)
    std[std < 10 * np.finfo(std.dtype).eps] = 1.0
    return x / std


def _ksg_columns(embeddings: list[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every embedding column as ``mutual_info_regression`` sees it, as features and as targets.

    scikit-learn scales each feature and the target by its standard deviation and adds
    ``1e-10 * max(1, mean|.|)`` times standard-normal jitter drawn from ``RandomState(seed)``: first
    ``N x d`` draws for the features, then ``N`` for the target. With a fixed seed those draws are
    the same in every call, so each column's jittered version is computed once here, with
    scikit-learn's scaling (:func:`_scaled`) and the same arithmetic: ``(L*d, N)`` features, ``(L*d, N)`` targets.
    """
    n, d = embeddings[0].shape
    rng = np.random.RandomState(seed)
    noise_x = rng.standard_normal(size=(n, d))
    noise_y = rng.standard_normal(size=n)
    features, targets = [], []
    for y in embeddings:
        x = _scaled(np.array(y, dtype=np.float64))
        x += 1e-10 * np.maximum(1, np.mean(np.abs(x), axis=0)) * noise_x
        features.extend(x.T)
        for k in range(d):
            t = _scaled(np.array(y[:, k], dtype=np.float64))
            t += 1e-10 * np.maximum(1, np.mean(np.abs(t))) * noise_y
            targets.append(t)
    return np.stack(features), np.stack(targets)


def mutual_information_matrix(
    embeddings: list[np.ndarray], n_neighbors: int = 5, seed: int = 0, device: str | torch.device = "cpu"
) -> np.ndarray:
    """:func:`mutual_information` for every ordered pair of layers at once, ``(L, L)`` float64.

    ``out[i, j] == mutual_information(embeddings[i], embeddings[j], n_neighbors, seed)`` (diagonal
    included), to the last bit on the tested inputs (``tests/scoring/test_manifold.py``). It runs the
    Kraskov-Stoegbauer-Grassberger estimator of scikit-learn's ``_compute_mi_cc`` for all ``(L d)^2``
    pairs of columns as batched tensor ops on ``device`` instead of ``L^2 d`` calls into
    scikit-learn, whose per-call overhead dominated at MKA's sizes (a few thousand calls on a
    30-layer model, each on only N = 32 points). Everything that decides a count is exact in any
    order -- ``|a - b|``, ``max``, the k-th smallest value, ``<=`` -- so the neighbour counts equal
    scikit-learn's; the digamma terms and means are then taken in numpy as scikit-learn takes them.

    Per pair (feature column x, target column y) over N points, Chebyshev distance in (x, y):
    ``r_i`` = distance to the k-th nearest other point, lowered by one ulp; ``n_x(i)``, ``n_y(i)`` =
    other points within ``r_i`` in x alone and y alone; ``MI = max(0, psi(N) + psi(k) -
    mean psi(n_x + 1) - mean psi(n_y + 1))``. Work is ``O((L d)^2 N^2)`` elementwise, in blocks of
    about ``_KSG_BLOCK`` entries.
    """
    from scipy.special import digamma

    embeddings = [_as_2d(e) for e in embeddings]
    shapes = {e.shape for e in embeddings}
    if len(shapes) > 1:
        raise ValueError(f"every layer embedding needs the same shape (N samples, dim), got {sorted(shapes)}")
    n_layers, (n, d) = len(embeddings), embeddings[0].shape
    if n < 2:
        return np.zeros((n_layers, n_layers))
    k = min(n_neighbors, max(1, n - 1))
    features, targets = _ksg_columns(embeddings, seed)

    device = torch.device(device)
    x = torch.from_numpy(features).to(device)
    y = torch.from_numpy(targets).to(device)
    dx = (x[:, :, None] - x[:, None, :]).abs()  # (P, N, N) marginal distances, P = L * d
    dy = (y[:, :, None] - y[:, None, :]).abs()
    eye = torch.eye(n, dtype=torch.bool, device=device)
    count_x = torch.empty(x.shape[0], y.shape[0], n, dtype=torch.int64, device=device)
    count_y = torch.empty_like(count_x)
    rows = max(1, _KSG_BLOCK // max(1, y.shape[0] * n * n))
    for start in range(0, x.shape[0], rows):
        block = dx[start : start + rows, None]  # (b, 1, N, N)
        joint = torch.maximum(block, dy[None]).masked_fill(eye, math.inf)  # the point itself is no neighbour
        radius = torch.kthvalue(joint, k, dim=-1).values
        radius = torch.nextafter(radius, torch.zeros_like(radius))[..., None]
        # Counts include the point itself (distance 0), removed by the "- 1" as scikit-learn does.
        count_x[start : start + rows] = (block <= radius).sum(-1) - 1
        count_y[start : start + rows] = (dy[None] <= radius).sum(-1) - 1

    table = digamma(np.arange(1, n + 1, dtype=np.float64))  # psi(c + 1) for c = 0 .. N-1
    psi_x = table[count_x.cpu().numpy()]
    psi_y = table[count_y.cpu().numpy()]
    mi = digamma(n) + digamma(k) - np.mean(psi_x, axis=-1) - np.mean(psi_y, axis=-1)
    mi = np.maximum(0, mi).reshape(n_layers, d, n_layers, d)  # [i, feature a, j, target column k]
    # mutual_information: mean over the features of y_i, then over the target columns of y_j.
    return np.mean(np.mean(mi.transpose(0, 2, 3, 1), axis=-1), axis=-1)


def guarded_entropies(
    embeddings: list[np.ndarray], k_entropy: int, guard: str, eps: float = 1e-6, device: str | torch.device = "cpu"
) -> np.ndarray:
    """:func:`knn_entropies` of every layer after the entropy ``guard`` of :func:`npib_similarity`, ``(L,)``."""
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    entropy = knn_entropies(embeddings, k=k_entropy, device=device)
    if guard == "abs":
        entropy = np.maximum(np.abs(entropy), eps)
    elif guard == "shift":
        entropy = entropy - entropy.min() + eps
    return entropy


def npib_similarity(
    embeddings: list[np.ndarray],
    n_neighbors: int = 5,
    k_entropy: int = 50,
    guard: str = "abs",
    *,
    clip: bool = False,
    eps: float = 1e-6,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Normalised pairwise information bottleneck between layers, ``(L, L)`` float64, symmetric.

    ``S_ij = MI(i, j) / sqrt(H_i H_j)`` over the layer embeddings ``embeddings[l]`` of shape
    ``(N, dim)`` (normally from :func:`layer_embeddings`), with ``MI`` from
    :func:`mutual_information` and ``H`` from :func:`knn_entropy`. Because the MI estimate is not
    exactly symmetric, ``S`` is the mean of the ``(i, j)`` and ``(j, i)`` estimates (the code
    computed ``i <= j`` only and mirrored it).

    **Entropy guard.** The kNN entropy can be negative (it drops the ball-volume term, and
    rank-normalised data in the unit square have entropy <= 0 anyway). If ``H_i`` and ``H_j`` have
    opposite signs the released code takes the sqrt of a negative number, so ``S_ij`` is NaN and
    poisons the fusion ratios (MKA issue #4). Options:

    - ``"abs"`` (default): use ``max(|H|, eps)``. When both entropies are negative (the common
      case) ``sqrt(|H_i| |H_j|) = sqrt(H_i H_j)``, so this equals the released code wherever that
      is finite; it differs only where the code gives NaN. ``-H`` of a rank-normalised embedding is
      the (biased) copula negentropy, a fine positive scale.
    - ``"shift"``: ``H - min(H) + eps`` over all layers, positive and order preserving, but the
      layer with the smallest entropy gets a denominator ~``sqrt(eps)`` and hence a huge row; use a
      larger ``eps`` (e.g. 1 nat) for a meaningful shift. Kept as an ablation.
    - ``"none"``: raw ``H``, the released code's behaviour, for parity runs. The matrix is returned
      raw: NaN kept, no clipping, diagonal = the self-NPIB ``MI(i, i) / |H_i|`` (not 1).

    **Range (decision).** With ``"abs"``/``"shift"``, NaN becomes 0, ``S >= 0`` (KSG MI is
    already clipped at 0 by scikit-learn) and the diagonal is set to 1 (a layer is maximally
    similar to itself). The upper end is **not clipped by default**: the ratio is not bounded by 1
    (the MI of a continuous variable with itself is unbounded; on rank-normalised 2-D diffusion maps
    the self-NPIB is about 2.2, and on a synthetic residual stream with small per-layer updates
    every adjacent pair scored 1.0-1.5). Clipping at 1 would then tie all adjacent pairs, and the
    tie-break of :func:`most_similar_adjacent_pair` would silently reproduce the code's
    "always merge the last pair". ``clip=True`` clips to ``[0, 1]`` when a bounded score is needed
    (heatmaps); :func:`merge_alpha` clamps ``alpha`` to ``[0, 1]`` itself. So without ``clip`` an
    off-diagonal entry can exceed the conventional diagonal 1 (two identical layers score their
    self-NPIB ``MI_ii / |H_i|``, which is not bounded and varies from layer to layer by orders of
    magnitude on a real model); the diagonal only enters the code-mode row means of :func:`merge_alpha`.

    Args:
        embeddings: ``L`` arrays of shape ``(N, dim)``, same ``N`` samples in the same order.
        n_neighbors: KSG neighbours for the MI (code default 5).
        k_entropy: neighbours for the entropy (code default 50; at most ``N - 1``).
        guard: ``"abs"`` | ``"shift"`` | ``"none"`` as above.
        clip: clip the guarded matrix to ``[0, 1]`` (ignored for ``"none"``).
        eps: floor for ``|H|`` (``"abs"``) or margin of the shift (``"shift"``).
        seed: random state of scikit-learn's MI jitter.
        device: where the entropies and the pairwise MI run; same result anywhere.

    Returns:
        ``S`` of shape ``(L, L)``.
    """
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    embeddings = [_as_2d(e) for e in embeddings]
    counts = {e.shape[0] for e in embeddings}
    if len(counts) > 1:
        raise ValueError(f"every layer needs the same calibration samples, got sample counts {sorted(counts)}")

    entropy = guarded_entropies(embeddings, k_entropy, guard, eps, device)
    mi = mutual_information_matrix(embeddings, n_neighbors=n_neighbors, seed=seed, device=device)
    return npib_from_parts(mi, entropy, guard, clip=clip)


def npib_from_parts(mi: np.ndarray, entropy: np.ndarray, guard: str, *, clip: bool = False) -> np.ndarray:
    """:func:`npib_similarity` from its parts: the ``(L, L)`` MI matrix and the guarded entropies ``(L,)``."""
    with np.errstate(invalid="ignore"):
        # NaN where H_i H_j < 0 under guard="none", exactly as numpy does in the released code.
        denominator = np.sqrt(np.outer(entropy, entropy))
    with np.errstate(invalid="ignore", divide="ignore"):
        s = mi / denominator
    s = 0.5 * (s + s.T)
    if guard == "none":
        return s

    s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    s = np.clip(s, 0.0, 1.0) if clip else np.maximum(s, 0.0)
    np.fill_diagonal(s, 1.0)
    return s
