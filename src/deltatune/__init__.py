"""deltatune: parameter-efficient fine-tuning with Hugging Face PEFT's API and file format."""

from deltatune.adalora import AdaLoraConfig, AdaLoraModel
from deltatune.adamss import AdamssConfig, AdamssLayer, AdamssModel
from deltatune.adaption_prompt import AdaptedAttention, AdaptionPromptConfig, AdaptionPromptModel
from deltatune.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from deltatune.beft import BeftConfig, BeftLayer, BeftModel
from deltatune.bitfit import BitFitConfig, BitFitModel
from deltatune.boft import BOFTConfig, BOFTModel
from deltatune.bottleneck import BottleneckConfig, BottleneckModel
from deltatune.c3a import C3AConfig, C3ALayer, C3ALinear, C3AModel
from deltatune.cartridge import (
    CartridgeConfig,
    CartridgeEncoder,
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)
from deltatune.config import PeftConfig, PeftType, PeftWarning, TaskType
from deltatune.core.targeting import check_target_module_exists
from deltatune.cpt import CPTConfig, CPTEmbedding
from deltatune.deft import DeftConfig, DeftLayer, DeftLinear, DeftModel
from deltatune.delora import DeloraConfig, DeloraLayer, DeloraModel
from deltatune.errors import (
    AdapterLoadError,
    AdapterNameError,
    ConfigError,
    ConfigKeysError,
    DeltatuneError,
    MergeError,
    NoMatchingPeftModuleError,
    PeftError,
    TargetModuleError,
)
from deltatune.export import ExportedLora, export_to_lora
from deltatune.fourierft import FourierFTConfig, FourierFTLayer, FourierFTLinear, FourierFTModel
from deltatune.frod import FrodConfig, FrodLayer, FrodModel
from deltatune.glora import GloraConfig, GloraLayer, GloraLinear, GloraModel
from deltatune.gralora import GraloraConfig, GraloraLayer, GraloraModel
from deltatune.hira import HiraConfig, HiraLayer, HiraModel
from deltatune.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.hra import HRAConfig, HRAConv2d, HRALayer, HRALinear, HRAModel
from deltatune.ia3 import IA3Config, IA3Model
from deltatune.lily import LilyConfig, LilyLayer, LilyModel
from deltatune.ln_tuning import LNTuningConfig, LNTuningModel
from deltatune.loha import LoHaConfig, LoHaModel
from deltatune.lokr import LoKrConfig, LoKrModel
from deltatune.lora import LoraConfig, LoraModel
from deltatune.lora.corda import CordaConfig
from deltatune.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from deltatune.lora.loftq import LoftQConfig, replace_lora_weights_loftq
from deltatune.lora.lora_ga import LoraGAConfig, preprocess_loraga
from deltatune.mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from deltatune.miss import MissConfig, MissLayer, MissLinear, MissModel
from deltatune.mixed_model import PeftMixedModel
from deltatune.oft import OFTConfig, OFTModel
from deltatune.optimizers import create_loraplus_optimizer
from deltatune.osf import OSFConfig, OSFLayer, OSFModel
from deltatune.peanut import PeanutConfig, PeanutLayer, PeanutModel
from deltatune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from deltatune.poly import PolyConfig, PolyLayer, PolyModel
from deltatune.prompt import (
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from deltatune.psoft import PsoftConfig, PsoftLayer, PsoftModel
from deltatune.pvera import PveraConfig, PveraLayer, PveraModel
from deltatune.quantization import dequantize, merge_and_report, prepare_model_for_kbit_training, quantize
from deltatune.randlora import RandLoraConfig, RandLoraLayer, RandLoraModel
from deltatune.registry import load_builtins
from deltatune.road import RoadConfig, RoadLayer, RoadModel
from deltatune.save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from deltatune.shadow import DetachedShadowModel, ShadowCache, ShadowConfig, ShadowLayer, ShadowModel
from deltatune.shira import ShiraConfig, ShiraLayer, ShiraModel
from deltatune.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from deltatune.supertuning import SupertuningConfig, SupertuningLayer, SupertuningLinear, SupertuningModel
from deltatune.tinylora import TinyLoraConfig, TinyLoraLayer, TinyLoraModel
from deltatune.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from deltatune.unilora import UniLoraConfig, UniLoraLayer, UniLoraModel
from deltatune.utils import cast_mixed_precision_params, shift_tokens_right
from deltatune.vblora import VBLoRAConfig, VBLoRALayer, VBLoRAModel
from deltatune.vera import VeraConfig, VeraModel
from deltatune.waveft import WaveFTConfig, WaveFTLayer, WaveFTLinear, WaveFTModel
from deltatune.xlora import XLoraConfig, XLoraModel

load_builtins()  # the methods of registry.BUILTIN, registered in that order

__version__ = "0.1.0"

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "AdaLoraModel",
    "BOFTModel",
    "BitFitModel",
    "BottleneckModel",
    "IA3Model",
    "LNTuningModel",
    "LoHaModel",
    "LoKrModel",
    "LoraModel",
    "OFTModel",
    "TrainableTokensModel",
    "VeraModel",
    # the methods of issue 22, one line each: config, layer, tuner
    "HiraConfig", "HiraLayer", "HiraModel",
    "LilyConfig", "LilyLayer", "LilyModel",
    "MissConfig", "MissLayer", "MissLinear", "MissModel",
    "HRAConfig", "HRAConv2d", "HRALayer", "HRALinear", "HRAModel",
    "C3AConfig", "C3ALayer", "C3ALinear", "C3AModel",
    "ShiraConfig", "ShiraLayer", "ShiraModel",
    "GraloraConfig", "GraloraLayer", "GraloraModel",
    "FourierFTConfig", "FourierFTLayer", "FourierFTLinear", "FourierFTModel",
    "RandLoraConfig", "RandLoraLayer", "RandLoraModel",
    "PveraConfig", "PveraLayer", "PveraModel",
    "PeanutConfig", "PeanutLayer", "PeanutModel",
    "GloraConfig", "GloraLayer", "GloraLinear", "GloraModel",
    "WaveFTConfig", "WaveFTLayer", "WaveFTLinear", "WaveFTModel",
    "VBLoRAConfig", "VBLoRALayer", "VBLoRAModel",
    "XLoraConfig", "XLoraModel",
    "AdaptionPromptConfig", "AdaptedAttention", "AdaptionPromptModel",
    "CartridgeConfig", "CartridgeEncoder", "compose_cartridge_adapters", "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text", "prompt_embeddings_from_past_key_values",
    "RoadConfig", "RoadLayer", "RoadModel",
    "BeftConfig", "BeftLayer", "BeftModel",
    "PsoftConfig", "PsoftLayer", "PsoftModel",
    "OSFConfig", "OSFLayer", "OSFModel",
    "FrodConfig", "FrodLayer", "FrodModel",
    "DeloraConfig", "DeloraLayer", "DeloraModel",
    "DeftConfig", "DeftLayer", "DeftLinear", "DeftModel",
    "SupertuningConfig", "SupertuningLayer", "SupertuningLinear", "SupertuningModel",
    "CPTConfig", "CPTEmbedding",
    "TinyLoraConfig", "TinyLoraLayer", "TinyLoraModel",
    "UniLoraConfig", "UniLoraLayer", "UniLoraModel",
    "DetachedShadowModel", "ShadowCache", "ShadowConfig", "ShadowLayer", "ShadowModel",
    "PolyConfig", "PolyLayer", "PolyModel",
    "AdamssConfig", "AdamssLayer", "AdamssModel",
    "get_peft_config",
    "AdaLoraConfig",
    "AdapterLoadError",
    "AdapterNameError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BOFTConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "ConfigError",
    "CordaConfig",
    "DeltatuneError",
    "EvaConfig",
    "IA3Config",
    "LoHaConfig",
    "LNTuningConfig",
    "LoKrConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "MergeError",
    "MultitaskPromptTuningConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "TrainableTokensConfig",
    "TunerLayerStatus",
    "TunerModelStatus",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "TargetModuleError",
    "TaskType",
    "VeraConfig",
    "check_target_module_exists",
    "create_loraplus_optimizer",
    "dequantize",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "prepare_model_for_compiled_hotswap",
    "ExportedLora",
    "export_to_lora",
    "merge_and_report",
    "prepare_model_for_kbit_training",
    "preprocess_loraga",
    "quantize",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
    # PEFT's names beside deltatune's (same objects): see deltatune.utils, deltatune.errors, deltatune.prompt
    "ConfigKeysError",
    "MultitaskPromptTuningInit",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PrefixEncoder",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderReparameterizationType",
    "PromptTuningInit",
    "cast_mixed_precision_params",
    "load_peft_weights",
    "set_base_model_state_dict",
    "shift_tokens_right",
    "utils",
]
