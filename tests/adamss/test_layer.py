"""AdaMSS layers against the paper's per-subspace formula (Linear with and without bias, GPT-2's Conv1D), the
initialisation's properties (SVD, clusters, orthonormal A, zero B), merge/unmerge of weight and bias, several
adapters, PEFT's config refusals, and the model-level contract on GPT-2 (Conv1D, beyond PEFT) and BERT (biases).

The reference loops over the clusters: ``Δ[S_k] = B_k A_k V x̃`` with ``x̃ = [x; 1]`` and the rows put back by
index, not the layer's single ``B A V`` chain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import assert_merge_round_trip, base_output, layer_and_input
from support.models import output, perturb_trainable, tiny_gpt2
from transformers.pytorch_utils import Conv1D

from deltatune import AdamssConfig, AdamssLayer, AdamssModel, get_peft_model
from deltatune.adamss.kmeans import _lloyd_step, kmeans_labels
from deltatune.errors import ConfigError, MergeError, TargetModuleError

ATOL = 1e-5
KINDS = ["linear", "linear_nobias", "conv1D"]


def _adapt(kind: str, **config):
    model, x = layer_and_input(kind)
    config = {"r": 8, "num_subspaces": 3, "subspace_rank": 2, "init_weights": None, **config}
    pm = get_peft_model(model, AdamssConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _reference_delta(layer: AdamssLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``Δ(x̃)``, cluster by cluster."""
    x_tilde = torch.cat([x, torch.ones(*x.shape[:-1], 1)], -1) if layer.bias is not None else x
    v = layer.adamss_newB[name]
    out = torch.zeros(*x.shape[:-1], layer.out_features)
    for k in range(layer.num_subspaces[name]):
        rows = layer.seg_result[name][k]
        out[..., rows] = x_tilde @ (layer.adamss_B[name][k] @ layer.adamss_A[name][k] @ v).T
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind):
    pm, layer, x = _adapt(kind)
    assert isinstance(layer, AdamssLayer) and isinstance(pm.base_model, AdamssModel)
    n = 17 if kind != "linear_nobias" else 16  # 16 inputs (+ the bias column)
    assert layer.adamss_newB["default"].shape == (8, n)
    assert sum(b.shape[0] for b in layer.adamss_B["default"]) == 12
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x) + _reference_delta(layer, x),
                               atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_initialisation(kind):
    """``V`` orthonormal rows spanning ``[W | b]``'s top singular directions, the clusters a partition of the
    output rows, ``A_k`` orthonormal rows, ``B_k = 0`` (the identity), ``r_k = min(|S_k|, subspace_rank)``."""
    model, x = layer_and_input(kind)
    ref = output(model, {"x": x})
    pm = get_peft_model(model, AdamssConfig(target_modules=["layer"], r=100, num_subspaces=4, subspace_rank=2))
    layer = pm.base_model.model.layer
    weight = layer.base_layer.weight.T if kind == "conv1D" else layer.base_layer.weight
    full = torch.cat([weight, layer.bias[:, None]], 1) if layer.bias is not None else weight
    v = layer.adamss_newB["default"]
    assert v.shape[0] == min(full.shape)  # r=100 clamped to min(out, n)
    torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(full @ v.T @ v, full, atol=1e-4, rtol=0)  # full rank: V spans W̃'s rows
    rows = torch.cat([layer.seg_result["default"][k] for k in range(4)])
    assert sorted(rows.tolist()) == list(range(12)) and torch.equal(layer.scatter_index["default"], rows)
    for k in range(4):
        a, b = layer.adamss_A["default"][k], layer.adamss_B["default"][k]
        r_k = min(len(layer.seg_result["default"][k]), 2)
        assert a.shape == (r_k, v.shape[0]) and b.shape == (len(layer.seg_result["default"][k]), r_k)
        torch.testing.assert_close(a @ a.T, torch.eye(r_k), atol=1e-5, rtol=0)
        assert torch.all(b == 0)
    torch.testing.assert_close(output(pm.eval(), {"x": x}), ref, atol=0, rtol=0)


def test_dynamic_rank_counts_large_singular_values():
    pm, layer, _ = _adapt("linear", use_dynamic_rank=True, svd_threshold=0.5, subspace_rank=4)
    for k in range(3):
        rows = layer.seg_result["default"][k]
        sub = torch.linalg.svd(layer_u(layer)[rows], full_matrices=False)[1] ** 2  # eigenvalues of U_S U_Sᵀ
        want = max(1, min(int((sub > 0.5 * sub[0]).sum()), 4, len(rows)))
        assert layer.adamss_A["default"][k].shape[0] == want


def layer_u(layer: AdamssLayer) -> torch.Tensor:
    """``U`` of the seeded SVD (recomputed: the layer keeps only ``V``)."""
    from deltatune.adamss.layer import seeded_svd

    return seeded_svd(layer._weight_with_bias(), layer.adamss_newB["default"].shape[0], 0)[0]


def test_clusters_are_kmeans_of_the_left_singular_vectors():
    _, layer, _ = _adapt("linear")
    labels = kmeans_labels(layer_u(layer).numpy(), 3, 10, 123456789)
    for k in range(3):
        assert torch.equal(layer.seg_result["default"][k], torch.from_numpy(np.flatnonzero(labels == k)))


def _lloyd_reference(data: np.ndarray, k: int, max_iter: int, seed: int) -> np.ndarray:
    """scikit-learn's KMeans(init="random", n_init=1) written plainly, row by row, in float64."""
    x = data.astype(np.float64)
    tol = np.var(x, axis=0).mean() * 1e-4
    n = len(x)
    centres = x[np.random.RandomState(seed).choice(n, k, replace=False, p=np.full(n, 1 / n, np.float32))]
    old, done = None, False
    for _ in range(max_iter):
        labels = np.array([min(range(k), key=lambda j: ((row - centres[j]) ** 2).sum()) for row in x])
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
        shift = ((new - centres) ** 2).sum()
        centres = new
        if old is not None and np.array_equal(labels, old):
            done = True
            break
        if shift <= tol:
            break
        old = labels
    if not done:
        labels = np.array([min(range(k), key=lambda j: ((row - centres[j]) ** 2).sum()) for row in x])
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_equals_a_plain_lloyd(seed):
    data = np.random.RandomState(seed).randn(40, 6).astype(np.float32)
    assert np.array_equal(kmeans_labels(data, 5, 10, 123456789 + seed), _lloyd_reference(data, 5, 10, 123456789 + seed))


def test_kmeans_separates_blobs_and_relocates_empty_clusters():
    """Blobs come back whole when the draw seeds one centre in each (cluster j grows from the j-th seed); a cluster
    left empty takes the row farthest from its centre (scikit-learn's relocation)."""
    g = np.random.RandomState(0)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, 0]], dtype=np.float32)
    blob = np.repeat(np.arange(4), 6)
    data = centres[blob] + 0.1 * g.randn(24, 3).astype(np.float32)
    p = np.full(24, 1 / 24, np.float32)
    seed = next(s for s in range(100)
                if len(set(blob[np.random.RandomState(s).choice(24, 4, replace=False, p=p)])) == 4)
    seeds = np.random.RandomState(seed).choice(24, 4, replace=False, p=p)
    assert np.array_equal(kmeans_labels(data, 4, 10, seed), np.argsort(blob[seeds])[blob])
    far_centre = np.concatenate([data[:1], np.full((1, 3), 100.0, np.float32)])  # the second one wins no row
    labels, moved, _ = _lloyd_step(data, far_centre)
    assert np.all(labels == 0)
    farthest = ((data - data[:1]) ** 2).sum(1).argmax()
    np.testing.assert_allclose(moved[1], data[farthest])  # it restarts at the row farthest from its centre
    np.testing.assert_allclose(moved[0], (data.sum(0) - data[farthest]) / 23, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_round_trip_and_bias(kind):
    pm, layer, x = _adapt(kind)
    expected = output(pm, {"x": x})
    bias = None if layer.bias is None else layer.bias.detach().clone()
    assert_merge_round_trip(pm, layer, x, expected, atol=ATOL)
    if bias is not None:
        torch.testing.assert_close(layer.bias, bias, atol=1e-6, rtol=0)
        pm.merge_adapter()
        rows = layer.seg_result["default"][0]
        want = bias[rows] + (layer.adamss_B["default"][0] @ layer.adamss_A["default"][0]
                             @ layer.adamss_newB["default"])[:, -1]
        torch.testing.assert_close(layer.bias[rows], want, atol=1e-6, rtol=0)
        pm.unmerge_adapter()
    plain = pm.merge_and_unload()
    assert isinstance(plain.layer, Conv1D if kind == "conv1D" else torch.nn.Linear)
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)


def test_second_adapter_and_delete():
    pm, layer, x = _adapt("linear")
    pm.add_adapter("other", AdamssConfig(target_modules=["layer"], r=4, num_subspaces=2, init_weights=None))
    assert layer.adamss_newB["other"].shape == (4, 17)
    first = output(pm, {"x": x})
    pm.set_adapter("other")
    second = output(pm, {"x": x})
    torch.testing.assert_close(second, base_output(layer, x) + _reference_delta(layer, x, "other"), atol=ATOL,
                               rtol=1e-5)
    pm.base_model.set_adapter(["default", "other"])
    both = output(pm, {"x": x})
    torch.testing.assert_close(both, first + second - base_output(layer, x), atol=ATOL, rtol=1e-5)
    pm.delete_adapter("other")
    assert "other" not in layer.adamss_newB and "other" not in layer.seg_result
    pm.set_adapter("default")
    torch.testing.assert_close(output(pm, {"x": x}), first, atol=0, rtol=0)


def test_half_precision_base_keeps_fp32_factors():
    model, x = layer_and_input("linear")
    pm = get_peft_model(model.to(torch.bfloat16), AdamssConfig(target_modules=["layer"], r=8, num_subspaces=2))
    layer = pm.base_model.model.layer
    assert layer.adamss_A["default"][0].dtype == torch.float32 and layer.adamss_newB["default"].dtype == torch.bfloat16
    perturb_trainable(pm, std=0.2)
    y = pm(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    pm.merge_adapter()
    torch.testing.assert_close(pm(x.to(torch.bfloat16)), y, atol=0.05, rtol=0.02)


def test_config_refusals_and_defaults():
    config = AdamssConfig()
    assert (config.r, config.num_subspaces, config.subspace_rank, config.init_weights) == (100, 5, 1, "orthogonal")
    assert (config.asa_target_subspaces, config.init_warmup, config.final_warmup, config.mask_interval) == (
        50, 50, 1000, 100)
    assert AdamssConfig(init_weights=False).init_weights is None
    with pytest.raises(ConfigError, match="^init_weights must be 'orthogonal' or None, got gaussian"):
        AdamssConfig(init_weights="gaussian")
    with pytest.raises(ConfigError, match="^`mask_interval` must be a positive integer when `use_asa=True`"):
        AdamssConfig(use_asa=True, mask_interval=0)
    with pytest.raises(ConfigError, match="^`init_warmup` must be smaller than `final_warmup`"):
        AdamssConfig(use_asa=True, init_warmup=5, final_warmup=5)
    with pytest.raises(ConfigError, match="^`asa_target_subspaces` must be a positive integer"):
        AdamssConfig(use_asa=True, asa_target_subspaces=0)
    with pytest.raises(ConfigError, match="^`asa_schedule_exponent` must be a positive number"):
        AdamssConfig(use_asa=True, asa_schedule_exponent=0)
    AdamssConfig(mask_interval=0)  # unchecked without ASA, as PEFT


def test_unsupported_layer_is_refused():
    model, _ = layer_and_input("embedding")
    with pytest.raises(TargetModuleError, match="unsupported type: layer \\(Embedding\\)"):
        get_peft_model(model, AdamssConfig(target_modules=["layer"]))


def test_contract_on_gpt2_conv1d(tmp_path):
    check_model_contract(tiny_gpt2, "gpt2", lambda: AdamssConfig(r=8, num_subspaces=3, target_modules=["c_attn"]),
                         "adamss_", tmp_path)


def test_two_adapters_on_gpt2_with_biases(tmp_path):
    check_two_adapters(tiny_gpt2, "gpt2", AdamssConfig(r=8, num_subspaces=3, target_modules=["c_attn", "c_proj"]),
                       AdamssConfig(r=4, num_subspaces=2, subspace_rank=2, target_modules=["c_attn"]), tmp_path)


def test_f_linear_with_bias_column_equals_concatenated_input():
    """The layer's ``V[:, :in] x + V[:, in]`` is ``V x̃``."""
    _, layer, x = _adapt("linear")
    v = layer.adamss_newB["default"]
    torch.testing.assert_close(F.linear(x, v[:, :16], v[:, 16]), torch.cat([x, torch.ones(3, 5, 1)], -1) @ v.T,
                               atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite_bias_and_weight():
    """PEFT's sentence first; nothing is merged. A NaN in a subspace's ``B_k`` reaches weight and bias rows."""
    pm, layer, x = _adapt("linear")
    expected = output(pm, {"x": x})
    with torch.no_grad():
        layer.adamss_B["default"][0][0, 0] = float("nan")
    with pytest.raises(MergeError, match="^NaNs detected in the merged weights. The adapter default seems to be"):
        pm.merge_adapter(safe_merge=True)
    assert not layer.merged
    with torch.no_grad():
        layer.adamss_B["default"][0][0, 0] = 0.0
    pm.merge_adapter(safe_merge=True)
    assert layer.merged
    pm.unmerge_adapter()
    assert torch.isfinite(output(pm, {"x": x})).all() and output(pm, {"x": x}).shape == expected.shape


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_equals_scikit_learn(seed):
    """What PEFT's AdaMSS calls, ``KMeans(init="random", n_init=1, random_state=...).fit_predict`` of scikit-learn,
    gives the same labels: on random data and on an adapted layer's left singular vectors (PEFT's input)."""
    from sklearn.cluster import KMeans

    data = np.random.RandomState(seed).randn(64, 8).astype(np.float32)
    theirs = KMeans(n_clusters=5, init="random", n_init=1, max_iter=10, random_state=123456789 + seed)
    assert np.array_equal(kmeans_labels(data, 5, 10, 123456789 + seed), theirs.fit_predict(data))
    u = layer_u(_adapt("linear")[1]).numpy()
    theirs = KMeans(n_clusters=3, init="random", n_init=1, max_iter=10, random_state=seed)
    assert np.array_equal(kmeans_labels(u, 3, 10, seed), theirs.fit_predict(u))


def test_square_u_clusters_as_peft_with_scikit_learn_and_without_it(monkeypatch):
    """``r >= out`` makes ``U`` square: its orthonormal rows are all equally far apart, so K-means labels are decided
    by rounding. ``cluster_rows`` then calls scikit-learn itself (PEFT's labels exactly); without scikit-learn it
    falls back to deltatune's port, which still gives a valid clustering of every row."""
    import sys

    from sklearn.cluster import KMeans

    from deltatune.adamss.kmeans import cluster_rows

    u = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))[0].numpy()
    theirs = KMeans(n_clusters=5, init="random", n_init=1, max_iter=10, random_state=123456789).fit_predict(u)
    assert np.array_equal(cluster_rows(u, 5, 10, 123456789), theirs)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # `from sklearn.cluster import KMeans` fails
    assert np.array_equal(cluster_rows(u, 5, 10, 123456789), kmeans_labels(u, 5, 10, 123456789))
    assert sorted(set(cluster_rows(u, 5, 10, 123456789))) == [0, 1, 2, 3, 4]
