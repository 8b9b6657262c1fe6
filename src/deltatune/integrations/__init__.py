"""Training with other libraries' trainers, as with PEFT, and without the ``peft`` package.

- :mod:`deltatune.integrations.transformers`: ``AdapterTrainer`` (``transformers.Trainer``) and the mixin
  behind every trainer here.
- :mod:`deltatune.integrations.trl`: ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer`` (needs ``trl``).

Import the submodule you use; this package imports neither ``transformers``' trainer nor ``trl``.
"""
