"""K-means as scikit-learn's ``KMeans(init="random", n_init=1, algorithm="lloyd")`` runs it, in numpy.

AdaMSS clusters the rows of the left singular vectors with scikit-learn (PEFT imports it). The clustering is not in
the adapter's file: it is recomputed from the base weight whenever an adapter is built, so a file crosses between
PEFT and deltatune only if both compute the same clusters. :func:`cluster_rows` therefore calls scikit-learn's
``KMeans`` itself where scikit-learn is installed (PEFT cannot build an AdaMSS adapter without it, so any file PEFT
made came from it). deltatune does not depend on scikit-learn: without it, :func:`kmeans_labels` follows the
algorithm step for step (scikit-learn >= 1.3, float32 data):

1. ``tol = mean_j var(X[:, j]) · 1e-4``; ``X ← X - mean(X)`` (rows centred, for accurate distances);
2. initial centres: ``k`` distinct rows drawn by ``RandomState(seed).choice(n, k, replace=False, p=1/n)`` (the
   sample weights' probabilities, which select numpy's weighted draw);
3. Lloyd iterations, at most ``max_iter``: label each row with its nearest centre, ``argmin_j ‖c_j‖² - 2 x·c_j``
   (the first on ties); each centre becomes the mean of its rows; an emptied cluster takes the row farthest from
   its own centre (scikit-learn's relocation). Stop when the labels repeat (then they are final) or when
   ``Σ_j ‖c_j' - c_j‖² <= tol`` (then the rows are labelled once more against the final centres).

Float32 sums may differ from scikit-learn's threaded BLAS in the last bits; the labels differ only where a row is
equidistant from two centres to within that rounding. That happens when ``U`` is square (``r >= out``, e.g. a
layer with fewer than 100 outputs under PEFT's default ``r=100``): its rows are orthonormal, all equally far apart.
"""

from __future__ import annotations

import numpy as np


def _labels(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Nearest centre of each row of ``x: (n, d)`` among ``centers: (k, d)``: ``(n,)`` int32."""
    scores = (centers * centers).sum(axis=1)[None, :] - 2.0 * (x @ centers.T)  # ‖x‖² is the same for every j
    return scores.argmin(axis=1).astype(np.int32)


def _lloyd_step(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Lloyd iteration: ``(labels (n,), new centres (k, d), shift (k,) = ‖new - old‖)``."""
    k = centers.shape[0]
    labels = _labels(x, centers)
    sums = np.zeros_like(centers)
    np.add.at(sums, labels, x)  # row order, float32: scikit-learn's accumulation
    counts = np.bincount(labels, minlength=k).astype(x.dtype)
    empty = np.flatnonzero(counts == 0)
    if empty.size:  # scikit-learn's relocation: the rows farthest from their centres seed the empty clusters
        distances = ((x - centers[labels]) ** 2).sum(axis=1)
        far = np.argpartition(distances, -empty.size)[: -empty.size - 1 : -1]
        for new_id, row in zip(empty, far):
            old_id = labels[row]
            sums[old_id] -= x[row]
            sums[new_id] = x[row]
            counts[new_id] = 1
            counts[old_id] -= 1
    for j in range(k):
        if counts[j] > 0:
            sums[j] *= np.float32(1.0 / float(counts[j]))
    shift = np.sqrt(((sums - centers) ** 2).sum(axis=1))
    return labels, sums, shift


def kmeans_labels(data: np.ndarray, n_clusters: int, max_iter: int, random_state: int) -> np.ndarray:
    """scikit-learn's ``KMeans(n_clusters, init="random", n_init=1, max_iter, random_state).fit_predict(data)``.

    Args:
        data: ``(n, d)`` rows to cluster (cast to float32, as PEFT passes them).
        n_clusters: ``k <= n``.
        max_iter: Lloyd iterations at most.
        random_state: Seed of numpy's ``RandomState`` that picks the initial centres.

    Returns:
        ``(n,)`` int64 cluster of each row, in ``[0, k)``.
    """
    x = np.array(data, dtype=np.float32, order="C", copy=True)
    n = x.shape[0]
    if n < n_clusters:
        raise ValueError(f"n_samples={n} should be >= n_clusters={n_clusters}.")
    tol = np.mean(np.var(x, axis=0)) * 1e-4
    x -= x.mean(axis=0)
    weights = np.ones(n, dtype=x.dtype)
    seeds = np.random.RandomState(random_state).choice(n, size=n_clusters, replace=False, p=weights / weights.sum())
    centers = x[seeds].copy()
    labels_old = np.full(n, -1, dtype=np.int32)
    labels = labels_old
    converged = False
    for _ in range(max_iter):
        labels, centers, shift = _lloyd_step(x, centers)
        if np.array_equal(labels, labels_old):
            converged = True
            break
        if (shift**2).sum() <= tol:
            break
        labels_old = labels
    if not converged:
        labels = _labels(x, centers)  # the labels of the final centres
    return labels.astype(np.int64)


def cluster_rows(data: np.ndarray, n_clusters: int, max_iter: int, random_state: int) -> np.ndarray:
    """PEFT's clustering of ``data: (n, d)`` into ``n_clusters``: scikit-learn's ``KMeans(init="random", n_init=1)``
    where it is installed (PEFT's own call, bit for bit), else :func:`kmeans_labels`. Returns ``(n,)`` int64."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        return kmeans_labels(data, n_clusters, max_iter, random_state)
    kmeans = KMeans(n_clusters=n_clusters, init="random", n_init=1, max_iter=max_iter, random_state=random_state)
    return kmeans.fit_predict(np.asarray(data, dtype=np.float32)).astype(np.int64)
