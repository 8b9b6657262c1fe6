"""PEFT's AdaMSS imports scikit-learn (``AdamssConfig.__post_init__`` refuses to run without it, and its layers
cluster with ``sklearn.cluster.KMeans``); this environment has no scikit-learn. :func:`install` puts deltatune's
re-implementation of the one estimator PEFT calls (:class:`deltatune.adamss.kmeans.KMeans`) in ``sys.modules`` as
``sklearn.cluster``, only where the real package is missing, so peft's AdaMSS can be compared with deltatune's.

With the stand-in both libraries cluster with the same code: the interop tests then check the state-dict names,
the SVD, the initialisation, the forward and the merge, not scikit-learn's K-means itself (which
:mod:`deltatune.adamss.kmeans` follows step for step).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

from deltatune.adamss.kmeans import KMeans


def install(monkeypatch) -> None:
    """Make ``import sklearn`` and ``from sklearn.cluster import KMeans`` work for one test (``monkeypatch`` takes
    the modules out again); a no-op where the real package is installed."""
    if "sklearn" in sys.modules or importlib.util.find_spec("sklearn") is not None:
        return
    sklearn = types.ModuleType("sklearn")
    cluster = types.ModuleType("sklearn.cluster")
    for module in (sklearn, cluster):  # a spec without origin: importlib.util.find_spec (torch._dynamo) accepts it
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    cluster.KMeans = KMeans
    sklearn.cluster = cluster
    monkeypatch.setitem(sys.modules, "sklearn", sklearn)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", cluster)
