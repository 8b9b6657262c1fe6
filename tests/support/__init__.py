"""What the tests share, in one package (``tests/`` is on ``sys.path``: ``from support.models import tiny_llama``).

- :mod:`support.models`: tiny seeded Llama / GPT-2 / BERT / T5 from ``transformers`` config classes, the plain
  torch :class:`~support.models.TinyNet` and :class:`~support.models.Holder`, fixed inputs, logits, seeded noise
  on adapter tensors, state snapshots.
- :mod:`support.layers`: ``layer_and_input(kind)``, one seeded base layer of each kind with an input; ``base_output``
  (the base with ``W + extra``) and ``assert_merge_round_trip``.
- :mod:`support.adapters`: adapter folders on disk (``adapter_dir``, ``edit_adapter_config``) and ``quiet()``.
- :mod:`support.family_checks`: the model-level checks (identity, disable, merge, gradients, files, mixed
  batches) one method runs on one model.
- :mod:`support.contract`: the small default config of every registered method, for ``tests/test_contract.py``.
- :mod:`support.tinymodels`: a tokenizer trained in-process, tiny Llama / BERT saved as model directories,
  and small data files (the CLI, training, distributed and integration tests).
- :mod:`support.server`: a real server on a free local port (``Running``, ``free_port``, ``API_KEY``).
- :mod:`support.smollm2`: the real SmolLM2-135M and BBC News for the slow tests (fixtures in tests/conftest.py).
"""
