"""PEFT 0.21.2's own test suite, run against deltatune with only names aliased (issue 18).

The instrument, in four steps (nothing of PEFT's is copied into this repository):

1. Fetch PEFT 0.21.2's sdist from PyPI into a cache directory outside the repo (``pip download --no-deps
   --no-binary :all:``), unpack its ``tests/`` (plus an empty ``tests/__init__.py``: the sdist omits it and the
   tests use relative imports), and install the few test-only packages its test files import that the venv
   lacks (scipy, diffusers, parameterized, attrs) into ``<cache>/deps`` with ``pip install --target``.
2. Collect the chosen test files (against real ``peft``), classify every test by the method it exercises, and
   pick a deterministic, stratified sample (``--max-tests``; every (file, test function, method) stratum gets
   its turn before any gets a second test).
3. Run the sample with pytest in subprocesses, twice: (a) against the installed real ``peft`` -- the baseline;
   a test that needs the model hub fails offline (``HF_HUB_OFFLINE=1``) and so drops out; results are cached in
   ``<cache>/baseline.jsonl`` so later runs only pay for (b); (b) the baseline's passing tests against deltatune,
   through an alias shim: ``<cache>/shim/peft/...`` is put first on ``PYTHONPATH``; each of its modules resolves
   a PEFT name through ``ALIASES`` below (PEFT name -> deltatune dotted path(s), first one that imports wins),
   else the same name in the deltatune module(s) of ``MODULES``. A name with no counterpart becomes a
   placeholder that raises ``MissingInDeltatune("peft.X")`` when it is called, instantiated, isinstance-checked
   or has an attribute read -- so the test fails at use and the failure names what is missing. No PEFT name is
   ever bound to PEFT code; only ``peft.import_utils``' environment probes (is_*_available, transformers'
   version) and ``infer_device`` are answered by the shim itself, because they describe the test machine, not
   the library (listed in ``SHIM_PROVIDED``). A guard plugin fails the run if real ``peft`` gets imported.
4. Report: pass rate among the baseline-passing, public-API tests for methods deltatune has; the same
   counting every method; and the failures grouped (missing name -> which name, unexpected kwarg -> which,
   otherwise exception type + normalised message), most frequent first, with example test ids. Per-test
   results go to ``<cache>/results.json``.

"Public API": a test whose own source (or its test class's) uses a private PEFT name (``_x`` or from a ``._x``
module) is counted apart. Method: a PEFT config class named in the test id, else a LoRA-variant keyword
deltatune lacks (KaSA, EVA, CorDA, LoftQ, ...), else the config classes the test's source uses; "generic" when
none. A test touching any method deltatune lacks is "other".

Usage::

    python bench/peft_suite.py                               # default sample, ~15 min on a busy 2-core box
    python bench/peft_suite.py --max-tests 0                 # every collected test (hours)
    python bench/peft_suite.py --files test_config.py -k lora --max-tests 200
    python bench/peft_suite.py --report-only                 # re-print the last results.json
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PEFT_VERSION = "0.21.2"
DEFAULT_CACHE = Path(os.environ.get("PEFT_SUITE_CACHE", "/work/cache/peft_suite"))
REPO = Path(__file__).resolve().parents[1]

# Test files that build their own tiny models (MLPs, convs, embeddings defined in the file, or transformers
# config classes) and use the public API. Left out: test_decoder_models / test_encoder_decoder_models /
# test_feature_extraction_models / test_vision_models / test_seq_classifier / test_stablediffusion /
# test_hub_features / test_auto (hub model ids), test_gpu_examples / test_common_gpu / test_gptqmodel /
# test_quantization / test_torch_compile / test_lora_megatron (accelerator, quantisation backends), and the
# files for single methods deltatune lacks (test_xlora, test_poly, test_shira, test_vblora, ...).
DEFAULT_FILES = [
    "test_custom_models.py", "test_config.py", "test_initialization.py", "test_other.py",
    "test_tuners_utils.py", "test_low_level_api.py", "test_trainable_tokens.py", "test_vera.py", "test_boft.py",
    "test_mapping.py", "test_mixed.py", "test_loraplus.py", "test_lora_variants.py", "test_helpers.py",
    "test_target_parameters.py", "test_lora_conversion.py",
]
# Imported by the chosen test files but not dependencies of deltatune's venv: installed into <cache>/deps.
TEST_DEPS = ["scipy", "diffusers", "parameterized", "attrs"]

# ---------------------------------------------------------------------------------------------------------
# The alias table. Keys: PEFT module paths; MODULES maps each to the deltatune module(s) whose same-named
# objects it re-exports; ALIASES maps "<peft module>:<name>" to the deltatune object(s) under another name.
# Every target is deltatune's; the first that imports wins.
MODULES: dict[str, list[str]] = {
    "peft": ["deltatune", "deltatune.mapping", "deltatune.peft_model", "deltatune.config", "deltatune.auto",
             "deltatune.status", "deltatune.save_and_load", "deltatune.errors"],
    "peft.auto": ["deltatune.auto"],
    "peft.config": ["deltatune.config", "deltatune.prompt.config"],
    "peft.mapping": ["deltatune.mapping", "deltatune.registry"],
    "peft.mapping_func": ["deltatune.mapping"],
    "peft.peft_model": ["deltatune.peft_model"],
    "peft.mixed_model": ["deltatune.peft_model"],
    "peft.helpers": ["deltatune.helpers"],
    "peft.optimizers": ["deltatune.optimizers"],
    "peft.tuners": ["deltatune"],
    "peft.tuners._buffer_dict": [],
    "peft.tuners.tuners_utils": ["deltatune.core.tuner", "deltatune.core.layer", "deltatune.core.targeting"],
    "peft.tuners.lora": ["deltatune.lora", "deltatune.lora.config", "deltatune.lora.layer"],
    "peft.tuners.lora.config": ["deltatune.lora.config", "deltatune.lora.corda", "deltatune.lora.eva",
                                 "deltatune.lora.lora_ga", "deltatune.lora.loftq"],
    "peft.tuners.lora.layer": ["deltatune.lora.layer"],
    "peft.tuners.lora.model": ["deltatune.lora"],
    "peft.tuners.lora.variants": ["deltatune.lora.layer", "deltatune.lora.alora"],
    "peft.tuners.lora.corda": ["deltatune.lora.corda"],
    "peft.tuners.lora.monteclora": [],
    "peft.tuners.adalora": ["deltatune.adalora", "deltatune.adalora.config", "deltatune.adalora.layer"],
    "peft.tuners.ia3": ["deltatune.ia3", "deltatune.ia3.config", "deltatune.ia3.layer"],
    "peft.tuners.loha": ["deltatune.loha", "deltatune.loha.config", "deltatune.loha.layer"],
    "peft.tuners.lokr": ["deltatune.lokr", "deltatune.lokr.config", "deltatune.lokr.layer"],
    "peft.tuners.lokr.layer": ["deltatune.lokr.layer"],
    "peft.tuners.vera": ["deltatune.vera", "deltatune.vera.config", "deltatune.vera.layer"],
    "peft.tuners.oft": ["deltatune.oft", "deltatune.oft.config", "deltatune.oft.layer"],
    "peft.tuners.boft": ["deltatune.boft", "deltatune.boft.config", "deltatune.boft.layer"],
    "peft.tuners.ln_tuning": ["deltatune.ln_tuning", "deltatune.ln_tuning.config", "deltatune.ln_tuning.layer"],
    "peft.tuners.trainable_tokens": ["deltatune.trainable_tokens", "deltatune.trainable_tokens.layer"],
    "peft.tuners.trainable_tokens.layer": ["deltatune.trainable_tokens.layer"],
    "peft.tuners.lily": ["deltatune.lily"],
    "peft.tuners.lily.layer": ["deltatune.lily.layer"],
    "peft.tuners.delora": ["deltatune.delora"],
    "peft.tuners.delora.model": ["deltatune.delora"],
    "peft.utils": ["deltatune.utils", "deltatune.save_and_load", "deltatune.core.modules_to_save", "deltatune.config"],
    "peft.utils.other": ["deltatune.utils", "deltatune.core.modules_to_save", "deltatune.quantization"],
    "peft.utils.constants": ["deltatune.utils"],
    "peft.utils.hotswap": ["deltatune.hotswap"],
    "peft.utils.quantization_utils": [],
    "peft.utils.save_and_load": ["deltatune.save_and_load", "deltatune.utils"],
    "peft.utils.peft_types": ["deltatune.config"],
    "peft.import_utils": [],
}
ALIASES: dict[str, list[str]] = {
    # PEFT's base classes and their deltatune counterparts
    "peft.tuners.tuners_utils:BaseTunerLayer": ["deltatune.core.layer.AdapterLayer"],
    "peft.tuners.tuners_utils:BaseTuner": ["deltatune.core.tuner.AdapterModel"],
    "peft:PeftError": ["deltatune.errors.DeltatuneError"],
    "peft:NoMatchingPeftModuleError": ["deltatune.errors.TargetModuleError"],
    "peft.utils:INCLUDE_LINEAR_LAYERS_SHORTHAND": ["deltatune.core.targeting.ALL_LINEAR"],
    "peft.utils.constants:INCLUDE_LINEAR_LAYERS_SHORTHAND": ["deltatune.core.targeting.ALL_LINEAR"],
    "peft.utils:TrainableTokensWrapper": ["deltatune.trainable_tokens.TokenAdapterWrapper"],
    "peft:PromptEncoder": ["deltatune.prompt.encoders.PromptEncoder"],
    # LoRA layer classes: PEFT names them by base layer, deltatune prefixes them
    "peft.tuners.lora.layer:Linear": ["deltatune.lora.layer.LoraLinear"],
    "peft.tuners.lora.layer:Embedding": ["deltatune.lora.layer.LoraEmbedding"],
    "peft.tuners.lora.layer:Conv1d": ["deltatune.lora.layer.LoraConv"],
    "peft.tuners.lora.layer:Conv2d": ["deltatune.lora.layer.LoraConv"],
    "peft.tuners.lora.layer:Conv3d": ["deltatune.lora.layer.LoraConv"],
    "peft.tuners.lora:Linear": ["deltatune.lora.layer.LoraLinear"],
    "peft.tuners.lora:Embedding": ["deltatune.lora.layer.LoraEmbedding"],
    "peft.tuners.lora:Conv2d": ["deltatune.lora.layer.LoraConv"],
}
# Answered by the shim itself: probes of the test machine, not library behaviour (see module docstring).
SHIM_PROVIDED = ["peft.import_utils:is_*", "peft.utils:infer_device"]

# ---------------------------------------------------------------------------------------------------------
# Method classification.
HAS_CONFIGS = {
    "LoraConfig": "LoRA", "AdaLoraConfig": "AdaLoRA", "IA3Config": "IA3", "LoHaConfig": "LoHa",
    "LoKrConfig": "LoKr", "VeraConfig": "VeRA", "OFTConfig": "OFT", "BOFTConfig": "BOFT",
    "LNTuningConfig": "LN tuning", "TrainableTokensConfig": "trainable tokens",
    "PromptTuningConfig": "prompt tuning", "PromptEncoderConfig": "p-tuning", "PrefixTuningConfig": "prefix tuning",
    "MultitaskPromptTuningConfig": "multitask prompt tuning",
    # LoRA initialisations (issue 19): their sub-configs are LoRA's
    "EvaConfig": "LoRA", "CordaConfig": "LoRA", "LoftQConfig": "LoRA", "LoraGAConfig": "LoRA",
}


def _registered_configs() -> dict[str, str]:
    """Every method on deltatune's registry (all of PEFT's since issue 22): config class name -> label."""
    from deltatune.registry import METHODS, load_builtins

    load_builtins()
    return {m.config_cls.__name__: m.config_cls.__name__.removesuffix("Config") for m in METHODS.values()}


HAS_CONFIGS = {**_registered_configs(), **HAS_CONFIGS}  # the labels above win where both name a config
NEUTRAL_CONFIGS = {"PeftConfig", "PromptLearningConfig", "PretrainedConfig", "AutoConfig", "GenerationConfig",
                   "BitsAndBytesConfig", "LlamaConfig", "BertConfig", "GPT2Config", "OPTConfig", "T5Config"}
# LoRA variants / features deltatune lacks, recognised in test ids and names (case-insensitive).
LACKING_LORA_VARIANTS = {
    "KaSA": r"kasa", "VeLoRA": r"velora", "BD-LoRA": r"bd[-_ ]?lora", "MonteCLoRA": r"monteclora",
    "Arrow": r"arrow", "LoRA-FA": r"lora[-_ ]?fa(?![a-z])", "Riemannian LoRA": r"riemannian",
    "LoRA intruders": r"intruder",
}
HAS_KEYWORDS = [  # fallback on test class / function names, most specific first
    ("AdaLoRA", r"adalora"), ("LoKr", r"lokr"), ("LoHa", r"loha"), ("BOFT", r"boft"), ("VeRA", r"vera(?!ge)"),
    ("IA3", r"ia3"), ("LN tuning", r"ln_?tuning"), ("trainable tokens", r"trainable_?tokens"),
    ("prefix tuning", r"prefix"), ("prompt tuning", r"prompt"), ("OFT", r"(?<![a-z])oft"), ("LoRA", r"lora|dora"),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Step 1: fetch
def fetch(cache: Path, python: str) -> Path:
    root = cache / f"peft-{PEFT_VERSION}"
    if not (root / "tests").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        sdist = cache / f"peft-{PEFT_VERSION}.tar.gz"
        if not sdist.exists():
            log(f"downloading peft=={PEFT_VERSION} sdist into {cache}")
            subprocess.run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"peft=={PEFT_VERSION}", "-d", str(cache)], check=True, timeout=600)
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    (root / "tests" / "__init__.py").touch()  # the sdist omits it; the tests import each other relatively
    missing = [d for d in TEST_DEPS if not _importable(python, {"attrs": "attr"}.get(d, d), cache / "deps")]
    if missing:
        log(f"installing test-only packages into {cache / 'deps'}: {missing}")
        subprocess.run([python, "-m", "pip", "install", "--no-deps", "--target", str(cache / "deps"), *missing],
                       check=True, timeout=900)
    (cache / "pytest.ini").write_text(  # PEFT's own pytest config wants pytest-cov; keep only its markers
        "[pytest]\nmarkers =\n    single_gpu_tests: x\n    multi_gpu_tests: x\n    regression: x\n"
        "    bitsandbytes: x\n")
    return root


def _importable(python: str, module: str, extra: Path) -> bool:
    env = dict(os.environ, PYTHONPATH=str(extra))
    return subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------------------
# The shim and the recording plugin (written into the cache, never into the repo)
SHIM_CORE = '''
"""Generated by deltatune's bench/peft_suite.py: PEFT's names, deltatune's objects. Not PEFT."""
import fnmatch, importlib, importlib.util, os

MODULES = {modules!r}
ALIASES = {aliases!r}


class MissingInDeltatune(ImportError):
    pass


IN_TEST = False  # set by the recording plugin while a test runs


def _fail_for(full):
    raise MissingInDeltatune(f"{{full}} has no deltatune counterpart")


class _MissingValue:
    """What calling a missing name at import time gives (test modules build configs at module level): any
    use of it during a test raises."""

    def __init__(self, full):
        object.__setattr__(self, "_full", full)

    def __repr__(self):
        return f"<missing {{self._full}}()>"

    def __getattr__(self, name):
        if name.startswith("__") or not IN_TEST:
            raise AttributeError(name)
        _fail_for(self._full)

    def __call__(self, *a, **k):
        _fail_for(self._full)

    def __iter__(self):
        _fail_for(self._full)

    def __bool__(self):
        _fail_for(self._full)

    def __getitem__(self, key):
        _fail_for(self._full)


class _MissingMeta(type):
    def _fail(cls, *a, **k):
        _fail_for(cls.__peft_name__)

    def __call__(cls, *a, **k):
        if not IN_TEST:
            return _MissingValue(cls.__peft_name__)
        cls._fail()

    # A config class of a method deltatune lacks: nothing of deltatune's is one (the suite's shared helpers
    # branch on such checks for every method). Any other missing class: the check itself is the missing use.
    def __instancecheck__(cls, obj):
        if cls.__name__.endswith("Config"):
            return False
        cls._fail()

    def __subclasscheck__(cls, sub):
        if cls.__name__.endswith("Config"):
            return False
        cls._fail()

    def __getattr__(cls, name):
        if name.startswith("__") or not IN_TEST:  # import time (inspect.signature, ...): just absent
            raise AttributeError(name)
        cls._fail()

    def __iter__(cls):
        cls._fail()

    def __getitem__(cls, key):
        cls._fail()

    def __contains__(cls, key):
        cls._fail()

    def __len__(cls):
        cls._fail()

    def __bool__(cls):
        cls._fail()


class _MissingException(Exception):
    pass


def missing(module, name):
    full = f"{{module}}.{{name}}"
    if name.endswith(("Error", "Exception", "Warning")):  # usable in pytest.raises / except clauses
        return type(name, (_MissingException,), {{"__peft_name__": full, "__module__": module}})
    return _MissingMeta(name, (), {{"__peft_name__": full, "__module__": module, "__qualname__": name}})


def _resolve_dotted(path):
    mod, _, attr = path.rpartition(".")
    try:
        return True, getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        return False, None


def _env_probe(name):
    """peft.import_utils: whether a package is installed / transformers' version; describes the machine."""
    if name.startswith("is_transformers_ge_v"):
        from packaging import version
        import transformers
        want = name[len("is_transformers_ge_v"):].replace("_", ".")
        return lambda: version.parse(transformers.__version__) >= version.parse(want)
    if name.startswith("is_") and name.endswith("_available"):
        pkg = {{"bnb": "bitsandbytes", "auto_gptq": "auto_gptq", "torchao": "torchao"}}.get(name[3:-10], name[3:-10])
        return lambda *a, **k: importlib.util.find_spec(pkg) is not None
    return None


def resolve(module, name):
    if module == "peft.import_utils":
        probe = _env_probe(name)
        if probe is not None:
            return probe
    if name == "infer_device" and module == "peft.utils":
        return lambda: "cpu"
    for path in ALIASES.get(f"{{module}}:{{name}}", []):
        ok, obj = _resolve_dotted(path)
        if ok:
            return obj
    for mod in MODULES.get(module, []):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, name):
            return getattr(m, name)
    sub = f"{{module}}.{{name}}"
    if sub in MODULES or any(k.startswith(sub + ".") for k in MODULES):
        return importlib.import_module(sub)
    parts = module.split(".")
    if module not in MODULES and len(parts) >= 3 and parts[1] == "tuners":  # peft.tuners.<m>[.<x>]: deltatune.<m>
        for mod in dict.fromkeys([f"deltatune.{{'.'.join(parts[2:])}}", f"deltatune.{{parts[2]}}"]):
            try:
                m = importlib.import_module(mod)
            except ImportError:
                continue
            if hasattr(m, name):
                return getattr(m, name)
    return missing(module, name)
'''

SHIM_MODULE = '''
"""Generated shim module {module}: resolves names to deltatune (see peft/_shim.py)."""
from peft._shim import resolve as _resolve


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    value = _resolve({module!r}, name)
    globals()[name] = value
    return value
'''

PLUGIN = '''
"""Generated by deltatune's bench/peft_suite.py: records each test's outcome (JSON lines), per-test timeout,
and (shim run) refuses to go on if the real peft package got imported."""
import json, os, signal, sys

import pytest

_OUT = open(os.environ["PEFT_SUITE_OUT"], "a", buffering=1)
_TIMEOUT = float(os.environ.get("PEFT_SUITE_TEST_TIMEOUT", "0"))
_SHIM = os.environ.get("PEFT_SUITE_SHIM")


class TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise TestTimeout(f"test ran over {{_TIMEOUT:.0f}} s")


def _check_real_peft():
    mod = sys.modules.get("peft")
    if _SHIM and mod is not None and not str(getattr(mod, "__file__", "") or "").startswith(_SHIM):
        raise RuntimeError(f"real peft was imported from {{mod.__file__}}; the shim must come first")


def pytest_collectreport(report):
    if report.failed:
        msg = str(report.longrepr)
        line = next((ln for ln in msg.splitlines()[::-1] if ln.startswith("E ")), msg[-300:])
        _OUT.write(json.dumps({{"collect_error": report.nodeid, "message": line[:1000]}}) + "\\n")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _check_real_peft()
    _OUT.write(json.dumps({{"started": item.nodeid}}) + "\\n")
    shim = sys.modules.get("peft._shim")
    if shim is not None:
        shim.IN_TEST = True
    if _TIMEOUT:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, _TIMEOUT)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    shim = sys.modules.get("peft._shim")
    if shim is not None:
        shim.IN_TEST = False
    if _TIMEOUT:
        signal.setitimer(signal.ITIMER_REAL, 0)


_seen = {{}}


def pytest_runtest_logreport(report):
    nid = report.nodeid
    rec = _seen.setdefault(nid, {{"nodeid": nid, "outcome": "passed", "duration": 0.0}})
    rec["duration"] += report.duration
    if report.skipped and rec["outcome"] == "passed":
        rec["outcome"] = "skipped"
        rec["message"] = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)[:500]
    elif report.failed and rec["outcome"] != "failed":
        rec["outcome"] = "failed"
        rec["when"] = report.when
        crash = getattr(report.longrepr, "reprcrash", None)
        rec["message"] = (crash.message if crash else str(report.longrepr))[:2000]
        rec["location"] = f"{{crash.path.rsplit('/', 1)[-1]}}:{{crash.lineno}}" if crash else ""
        text = str(report.longrepr)
        rec["tail"] = text[-1500:]
    if report.when == "teardown":
        if getattr(report, "wasxfail", None) is not None:
            rec["outcome"] = "xfail"
        _OUT.write(json.dumps(rec) + "\\n")
'''


def write_shim(cache: Path) -> Path:
    shim = cache / "shim"
    pkg = shim / "peft"
    if pkg.exists():
        import shutil
        shutil.rmtree(pkg)
    (pkg).mkdir(parents=True)
    (pkg / "_shim.py").write_text(SHIM_CORE.format(modules=MODULES, aliases=ALIASES))
    for module in MODULES:
        parts = module.split(".")
        d = shim.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text(SHIM_MODULE.format(module=module))
    return shim


def write_plugin(cache: Path) -> Path:
    d = cache / "plugin"
    d.mkdir(parents=True, exist_ok=True)
    (d / "peft_suite_plugin.py").write_text(PLUGIN.format())
    return d


# ---------------------------------------------------------------------------------------------------------
# Step 2: collect, classify, sample
def pytest_cmd(python: str, cache: Path, root: Path) -> list[str]:
    return [python, "-m", "pytest", "-c", str(cache / "pytest.ini"), f"--rootdir={root}", "-p", "no:cacheprovider",
            "-p", "no:randomly", "-n", "0", "-q", "--continue-on-collection-errors", "-W", "ignore"]


def base_env(cache: Path, first: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    # HF_HUB_OFFLINE=1 as asked; PEFT's hub_online_once() lifts it for a model's first load, so the endpoint
    # points at a closed local port too: a hub access fails at once instead of waiting on a network that isn't there
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([*(str(p) for p in first), str(cache / "deps")]))
    env.pop("PEFT_SUITE_SHIM", None)
    return env


def collect(python: str, cache: Path, root: Path, files: list[str], kexpr: str | None) -> list[str]:
    key = re.sub(r"[^A-Za-z0-9]+", "_", ",".join(files) + "|" + (kexpr or ""))[:150]
    out = cache / f"collect_{key}.txt"
    if not out.exists():
        cmd = pytest_cmd(python, cache, root) + ["--collect-only"] + [f"tests/{f}" for f in files]
        if kexpr:
            cmd += ["-k", kexpr]
        res = subprocess.run(cmd, cwd=root, env=base_env(cache, []), capture_output=True, text=True, timeout=900)
        ids = [ln for ln in res.stdout.splitlines() if "::" in ln and not ln.startswith(("ERROR", "FAILED"))]
        out.write_text("\n".join(ids))
    return [ln for ln in out.read_text().splitlines() if ln]


class SourceIndex:
    """Per test: the PEFT config classes and private PEFT names its source (and its class's) mentions."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, tuple[dict, set[str], set[str]]] = {}

    def _file(self, rel: str):
        if rel not in self.cache:
            tree = ast.parse((self.root / rel).read_text())
            private: set[str] = set()
            peft_names: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft"):
                    for a in node.names:
                        local = a.asname or a.name
                        peft_names.add(local)
                        if a.name.startswith("_") or "._" in node.module:
                            private.add(local)
            funcs: dict[tuple[str, str], str] = {}
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    funcs[("", node.name)] = ast.get_source_segment(self.root.joinpath(rel).read_text(), node) or ""
                elif isinstance(node, ast.ClassDef):
                    src = (self.root / rel).read_text()
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            funcs[(node.name, sub.name)] = ast.get_source_segment(src, sub) or ""
            self.cache[rel] = (funcs, private, peft_names)
        return self.cache[rel]

    def info(self, nodeid: str) -> tuple[str, set[str]]:
        rel, *rest = nodeid.split("::")
        func = rest[-1].split("[")[0]
        cls = rest[0] if len(rest) > 1 else ""
        funcs, private, _ = self._file(rel)
        src = funcs.get((cls, func), "")
        used_private = {n for n in private if re.search(rf"\b{re.escape(n)}\b", src)}
        return src, used_private


PEFT_CONFIG_NAMES: set[str] = set()  # the *Config names PEFT's __init__ exports (filled from the sdist)


def load_peft_config_names(root: Path) -> None:
    text = (root / "src" / "peft" / "__init__.py").read_text()
    PEFT_CONFIG_NAMES.update(re.findall(r"\b([A-Z][A-Za-z0-9]*Config)\b", text))
    PEFT_CONFIG_NAMES.update(re.findall(r"\b([A-Z][A-Za-z0-9]*Config)\b", "CordaConfig EvaConfig LoftQConfig "
                                        "ArrowConfig BdLoraConfig KasaConfig LoraGAConfig VeloraConfig"))
    PEFT_CONFIG_NAMES.difference_update(NEUTRAL_CONFIGS)


def _peft_configs(text: str) -> set[str]:
    found = set(re.findall(r"\b([A-Z][A-Za-z0-9]*Config)\b", text))
    return {c for c in found if c in HAS_CONFIGS or c in PEFT_CONFIG_NAMES}


def classify(nodeid: str, src: str) -> tuple[str, bool]:
    """(method label, whether deltatune has that method)."""
    params = nodeid.split("[", 1)[1] if "[" in nodeid else ""
    names = nodeid.split("[", 1)[0]
    low_params, low_names = params.lower(), names.lower()
    cfgs = _peft_configs(params)
    for label, pat in LACKING_LORA_VARIANTS.items():
        if re.search(pat, low_params) or re.search(pat, low_names):
            return f"LoRA variant: {label}", False
    for cfg in sorted(PEFT_CONFIG_NAMES - set(HAS_CONFIGS)):  # a lacking method named in the id ("RoAd mixed ...")
        stem = cfg.removesuffix("Config")
        if re.search(rf"(?<![a-z]){re.escape(stem.lower())}(?![a-z])", f"{low_params} {low_names}"):
            return stem, False
    if cfgs:
        lacking = sorted(c for c in cfgs if c not in HAS_CONFIGS)
        if lacking:
            return lacking[0].removesuffix("Config"), False
        return HAS_CONFIGS[sorted(cfgs)[0]], True
    src_cfgs = _peft_configs(src)
    lacking = sorted(c for c in src_cfgs if c not in HAS_CONFIGS)
    for label, pat in HAS_KEYWORDS:
        if re.search(pat, low_names):
            if lacking:
                return lacking[0].removesuffix("Config"), False
            return label, True
    if lacking:
        return lacking[0].removesuffix("Config"), False
    has = sorted(HAS_CONFIGS[c] for c in src_cfgs if c in HAS_CONFIGS)
    if has:
        return has[0], True
    return "generic", True


def sample(ids: list[str], meta: dict[str, dict], max_tests: int, seed: int, other_share: float) -> list[str]:
    """``max_tests`` ids: ``other_share`` of them from methods deltatune lacks, the rest from those it has."""
    if max_tests <= 0 or len(ids) <= max_tests:
        return ids
    has = [n for n in ids if meta[n]["has_method"]]
    other = [n for n in ids if not meta[n]["has_method"]]
    n_other = min(len(other), round(max_tests * other_share))
    n_has = min(len(has), max_tests - n_other)
    n_other = min(len(other), max_tests - n_has)
    picked = set(_stratified(has, meta, n_has, seed)) | set(_stratified(other, meta, n_other, seed))
    return [n for n in ids if n in picked]  # collection order: module-scoped fixtures are shared


def _stratified(ids: list[str], meta: dict[str, dict], max_tests: int, seed: int) -> list[str]:
    """Round-robin over (file, test function, method) strata, each stratum shuffled with a fixed seed."""
    if len(ids) <= max_tests:
        return ids
    strata: dict[tuple, list[str]] = collections.defaultdict(list)
    for nid in ids:
        rel, *rest = nid.split("::")
        strata[(rel, rest[-1].split("[")[0], meta[nid]["method"])].append(nid)
    rng = random.Random(seed)
    queues = []
    for key in sorted(strata):
        q = strata[key][:]
        rng.shuffle(q)
        queues.append(q)
    rng.shuffle(queues)
    picked: list[str] = []
    while len(picked) < max_tests and queues:
        queues = [q for q in queues if q]
        for q in queues:
            if len(picked) >= max_tests:
                break
            picked.append(q.pop())
    return picked


# ---------------------------------------------------------------------------------------------------------
# Step 3: run
def run_ids(python: str, cache: Path, root: Path, ids: list[str], out: Path, env: dict, test_timeout: float,
            deadline: float, chunk: int) -> dict[str, dict]:
    """Runs ``ids`` (appending records to ``out``), restarting after a crash; returns nodeid -> record."""
    done = read_records(out)
    todo = [n for n in ids if n not in done]
    env = dict(env, PEFT_SUITE_OUT=str(out), PEFT_SUITE_TEST_TIMEOUT=str(test_timeout))
    attempts: dict[str, int] = {}
    while todo and time.time() < deadline:
        batch = todo[:chunk]
        argfile = cache / "args.txt"
        argfile.write_text("\n".join(batch))
        budget = max(30, int(deadline - time.time()))
        cmd = ["timeout", "-k", "10", str(budget)] + pytest_cmd(python, cache, root) + \
            ["-p", "peft_suite_plugin", f"@{argfile}"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        done = read_records(out)
        left = [n for n in batch if n not in done]
        log(f"  {len(batch) - len(left)}/{len(batch)} recorded in {time.time() - t0:.0f}s (rc {proc.returncode})")
        started = read_started(out)
        crashed = [n for n in left if n in started]
        if crashed:  # the process died inside a test: record it, rerun the rest of the batch
            _append(out, {"nodeid": crashed[0], "outcome": "failed", "when": "call", "duration": 0.0,
                          "message": f"process died during the test (rc {proc.returncode})"})
        elif left and proc.returncode in (124, 137):
            break  # out of time: the rest stay unrun
        elif left:  # never collected: the module failed to import, or the id does not exist under the shim
            errors = read_collect_errors(out)
            text = proc.stdout + proc.stderr
            tail = text.strip().splitlines()[-1:] or [""]
            unknown = {str(Path(m).relative_to(root)) if m.startswith(str(root)) else m
                       for m in re.findall(r"(?:found no collectors for|not found:) (\S+)", text)}
            for n in left:
                attempts[n] = attempts.get(n, 0) + 1
                reason = errors.get(n.split("::")[0])
                if reason is None and any(n == u or n.startswith(u + "[") for u in unknown):
                    reason = "not collected: the test id does not exist under the shim"
                if reason is None and attempts[n] < 3:
                    continue  # pytest stops a whole run on an unknown id: retry without the bad ones
                _append(out, {"nodeid": n, "outcome": "failed", "when": "collect", "duration": 0.0,
                              "message": reason or f"not collected: {tail[0][:300]}"})
        done = read_records(out)
        todo = [n for n in todo if n not in done]
    return {n: done[n] for n in ids if n in done}


def _append(path: Path, rec: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _lines(path: Path):
    if not path.exists():
        return
    for ln in path.read_text().splitlines():
        try:
            yield json.loads(ln)
        except json.JSONDecodeError:
            continue


def read_records(path: Path) -> dict[str, dict]:
    return {r["nodeid"]: r for r in _lines(path) if "nodeid" in r}


def read_started(path: Path) -> set[str]:
    return {r["started"] for r in _lines(path) if "started" in r}


def read_collect_errors(path: Path) -> dict[str, str]:
    return {r["collect_error"]: r["message"] for r in _lines(path) if "collect_error" in r}


# ---------------------------------------------------------------------------------------------------------
# Step 4: categorise and report
def category(rec: dict) -> str:
    msg = rec.get("message", "") or ""
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    m = re.search(r"(peft\.[\w.]+) has no deltatune counterpart", msg)
    if m:
        return f"missing name: {m.group(1)}"
    m = re.search(r"cannot import name '(\w+)' from '([\w.]+)'", msg)
    if m:
        return f"missing name: {m.group(2)}.{m.group(1)}"
    m = re.search(r"No module named '([\w.]+)'", msg)
    if m:
        return f"missing module: {m.group(1)}"
    m = re.search(r"got an unexpected keyword argument '(\w+)'", msg)
    if m:
        who = re.search(r"(\w+(?:\.\w+)?)\(\) got an unexpected", msg)
        return f"unexpected kwarg: {(who.group(1) + '(') if who else ''}{m.group(1)}{')' if who else ''}"
    m = re.search(r"AttributeError: '(\w+)' object has no attribute '(\w+)'", msg)
    if m:
        return f"missing attribute: {m.group(1)}.{m.group(2)}"
    m = re.search(r"AttributeError: (?:type object|module) '([\w.]+)' has no attribute '(\w+)'", msg)
    if m:
        return f"missing attribute: {m.group(1)}.{m.group(2)}"
    if first.startswith("AssertionError") or first.startswith("assert ") or "Failed: DID NOT" in first:
        return f"assertion: {test_func(rec['nodeid'])}"
    if rec.get("when") == "collect":
        return f"not collected: {first[:120]}"
    exc = re.match(r"([\w.]+(?:Error|Exception|Warning|Timeout|Exit|Interrupt)):?\s*(.*)", first)
    if exc:
        text = re.sub(r"\d+(\.\d+)?", "N", exc.group(2))
        text = re.sub(r"'[^']*'", "'…'", text)
        return f"{exc.group(1).rsplit('.', 1)[-1]}: {text[:110]}"
    return f"other: {first[:120]}"


def test_func(nodeid: str) -> str:
    rel, *rest = nodeid.split("::")
    return f"{rel.rsplit('/', 1)[-1]}::{'::'.join(rest).split('[')[0]}"


def report(results: dict, top: int) -> str:
    tests = results["tests"]
    base_pass = [t for t in tests.values() if t["baseline"] == "passed"]
    public = [t for t in base_pass if not t["private"]]
    has = [t for t in public if t["has_method"]]
    ran_has = [t for t in has if t.get("deltatune")]
    ran_pub = [t for t in public if t.get("deltatune")]
    lines = []

    def rate(group):
        n = len(group)
        k = sum(t["deltatune"] == "passed" for t in group)
        return f"{k}/{n} = {100 * k / n:.1f}%" if n else "n/a"

    lines.append(f"PEFT {PEFT_VERSION} suite against deltatune: {results['command']}")
    lines.append(f"files: {', '.join(results['files'])}")
    lines.append(f"collected {results['n_collected']}, sampled {results['n_sampled']}; baseline (real peft, "
                 f"offline): {len(base_pass)} passed, "
                 + ", ".join(f"{v} {k}" for k, v in sorted(collections.Counter(
                     t["baseline"] for t in tests.values() if t["baseline"] != "passed").items())))
    lines.append(f"baseline-passing tests using private PEFT names (counted apart): "
                 f"{sum(t['private'] for t in base_pass)}; their deltatune rate: "
                 f"{rate([t for t in base_pass if t['private'] and t.get('deltatune')])}")
    lines.append("")
    lines.append(f"PASS RATE, public API, methods deltatune has: {rate(ran_has)}")
    lines.append(f"PASS RATE, public API, every method:          {rate(ran_pub)} (in the sample)")
    pop = results.get("population", {})
    lacks = [t for t in ran_pub if not t["has_method"]]
    if pop.get("has") and pop.get("other") and ran_has and lacks:
        r_has = sum(t["deltatune"] == "passed" for t in ran_has) / len(ran_has)
        r_other = sum(t["deltatune"] == "passed" for t in lacks) / len(lacks)
        w = pop["has"] / (pop["has"] + pop["other"])
        lines.append(f"  weighted by the collected tests ({pop['has']} for methods deltatune has, {pop['other']} "
                     f"for others): {100 * (w * r_has + (1 - w) * r_other):.1f}%")
    if len(ran_has) < len(has):
        lines.append(f"  ({len(has) - len(ran_has)} baseline-passing tests not run against deltatune: time ran out)")
    lines.append("")
    lines.append("per method (public API): passed/total")
    by_method: dict[str, list] = collections.defaultdict(list)
    for t in ran_pub:
        by_method[t["method"]].append(t)
    for meth, group in sorted(by_method.items(), key=lambda kv: (not kv[1][0]["has_method"], -len(kv[1]))):
        mark = "" if group[0]["has_method"] else "  (deltatune lacks it)"
        lines.append(f"  {meth:32s} {rate(group)}{mark}")
    lines.append("")
    fails = [t for t in ran_has if t["deltatune"] != "passed"]
    cats: dict[str, list] = collections.defaultdict(list)
    for t in fails:
        cats[t["category"]].append(t)
    lines.append(f"failure categories, public API, methods deltatune has ({len(fails)} failures, "
                 f"{len(cats)} categories), most frequent first:")
    for i, (cat, group) in enumerate(sorted(cats.items(), key=lambda kv: -len(kv[1]))[:top], 1):
        ex = group[0]
        lines.append(f"{i:3d}. [{len(group)}] {cat}")
        lines.append(f"       e.g. {ex['nodeid'][:200]}")
        msg = (ex.get("message") or "").strip().splitlines()
        if msg and not cat.startswith("missing name"):
            lines.append(f"       {msg[0][:220]}")
    lines.append("")
    lines.append("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="outside the repo (default %(default)s)")
    ap.add_argument("--files", default=",".join(DEFAULT_FILES), help="comma-separated files under PEFT's tests/")
    ap.add_argument("-k", dest="kexpr", default=None, help="pytest -k expression applied at collection")
    ap.add_argument("--max-tests", type=int, default=1000, help="stratified sample size; 0 = all (default %(default)s)")
    ap.add_argument("--other-share", type=float, default=0.2,
                    help="share of the sample from methods deltatune lacks (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-timeout", type=float, default=60.0, help="seconds per test (SIGALRM)")
    ap.add_argument("--budget", type=float, default=900.0, help="wall seconds for the two runs together")
    ap.add_argument("--chunk", type=int, default=400, help="tests per pytest process")
    ap.add_argument("--refresh-baseline", action="store_true", help="forget the cached real-peft results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--top", type=int, default=40, help="failure categories to print")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    cache: Path = args.cache.resolve()
    if REPO in cache.parents or cache == REPO:
        sys.exit("--cache must be outside the repository")
    results_path = cache / "results.json"
    if args.report_only:
        print(report(json.loads(results_path.read_text()), args.top))
        return
    timings: dict[str, float] = {}
    t0 = time.time()
    root = fetch(cache, args.python)
    timings["fetch"] = time.time() - t0
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    t0 = time.time()
    ids = collect(args.python, cache, root, files, args.kexpr)
    timings["collect"] = time.time() - t0
    index = SourceIndex(root)
    load_peft_config_names(root)
    meta: dict[str, dict] = {}
    for nid in ids:
        src, private = index.info(nid)
        method, has = classify(nid, src)
        meta[nid] = {"method": method, "has_method": has, "private": sorted(private),
                     "hub": "hub_online_once(" in src}
    picked = sample(ids, meta, args.max_tests, args.seed, args.other_share)
    log(f"collected {len(ids)} tests in {len(files)} files; running {len(picked)}")
    plugin = write_plugin(cache)
    shim = write_shim(cache)
    deadline = time.time() + args.budget
    baseline_out = cache / "baseline.jsonl"
    if args.refresh_baseline and baseline_out.exists():
        baseline_out.unlink()
    # a test whose own source loads a hub model (PEFT wraps those in hub_online_once) cannot pass offline: it is
    # recorded as such without running it (offline, huggingface_hub retries for ~45 s before it gives up)
    known = read_records(baseline_out)
    for nid in picked:
        if meta[nid]["hub"] and nid not in known:
            _append(baseline_out, {"nodeid": nid, "outcome": "needs hub", "duration": 0.0,
                                   "message": "its source calls hub_online_once(): needs the model hub"})
    t0 = time.time()
    log("(a) baseline: real peft")
    base = run_ids(args.python, cache, root, picked, baseline_out, base_env(cache, [plugin]), args.test_timeout,
                   time.time() + 0.5 * args.budget, args.chunk)  # the rest is for (b)
    timings["baseline run"] = time.time() - t0
    passing = [n for n in picked if base.get(n, {}).get("outcome") == "passed"]
    dt_out = cache / "deltatune.jsonl"
    if dt_out.exists():
        dt_out.unlink()
    env = base_env(cache, [shim, plugin])
    env["PEFT_SUITE_SHIM"] = str(shim)
    t0 = time.time()
    log(f"(b) deltatune through the shim: {len(passing)} baseline-passing tests")
    order = {n: i for i, n in enumerate(ids)}
    dt_res: dict[str, dict] = {}
    has_first = [n for n in passing if meta[n]["has_method"]]
    rest = [n for n in passing if not meta[n]["has_method"]]
    for group in (has_first, rest):  # methods deltatune has first: a short budget still gives the headline
        group.sort(key=order.__getitem__)
        dt_res.update(run_ids(args.python, cache, root, group, dt_out, env, args.test_timeout, deadline, args.chunk))
    timings["deltatune run"] = time.time() - t0
    tests = {}
    for nid in picked:
        rec = {"nodeid": nid, **meta[nid], "baseline": base.get(nid, {}).get("outcome", "not run"),
               "private": bool(meta[nid]["private"]), "private_names": meta[nid]["private"]}
        if nid in dt_res:
            d = dt_res[nid]
            rec["deltatune"] = d["outcome"]
            if d["outcome"] != "passed":
                rec.update(message=d.get("message", ""), when=d.get("when"), location=d.get("location", ""),
                           tail=d.get("tail", ""))
                rec["category"] = category({**d, "nodeid": nid})
        tests[nid] = rec
    command = "python bench/peft_suite.py " + shlex.join(sys.argv[1:])
    results = {"peft_version": PEFT_VERSION, "command": command.strip(), "files": files, "n_collected": len(ids),
               "n_sampled": len(picked), "population": {
                   "has": sum(m["has_method"] for m in meta.values()),
                   "other": sum(not m["has_method"] for m in meta.values())},
               "timings": timings, "aliases": ALIASES, "modules": MODULES,
               "shim_provided": SHIM_PROVIDED, "tests": tests}
    results_path.write_text(json.dumps(results, indent=1))
    print(report(results, args.top))
    print(f"\nper-test results: {results_path}")


if __name__ == "__main__":
    main()
