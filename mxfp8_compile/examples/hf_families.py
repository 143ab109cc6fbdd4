"""Every transformers MoE family with the experts interface, built tiny and offline.

transformers 5.x applies a family's experts through ``@use_experts_implementation``: one
``Experts`` module holding 3D weights (``gate_up_proj`` or ``up_proj``, and ``down_proj``) whose
forward ``config._experts_implementation`` picks:

- ``grouped_mm``: ``torch._grouped_mm`` over the tokens sorted by expert (the training path);
- ``batched_mm``: each token's expert weights gathered, then one ``bmm`` (meant for generation);
- ``eager``: the family's own loop over the experts that received tokens.

``deepgemm`` and ``sonicmoe`` call CUDA-only kernels and are not built here.

A tiny model keeps the family's architecture (its layer types, attention, router and shared
experts) at hidden size 128, 4 experts of width 64, top-2, one layer of each layer type, and no
dropout or router jitter (random in training mode).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pathlib
import pkgutil
from typing import Any

import torch

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
HIDDEN, EXPERTS, EXPERT_WIDTH, TOP_K, VOCAB = 128, 4, 64, 2, 512

# Config values a family needs beyond the generic shrink, found by building each one: defaults
# of None, top-k under another name, layer patterns that the shrink would leave without an
# attention or a MoE layer, and sizes that must agree with each other.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse"]},  # None by default
    "diffusion_gemma": {"moe_intermediate_size": EXPERT_WIDTH, "top_k_experts": TOP_K},  # None by default
    "dots1": {"n_shared_experts": 1},  # None by default, and multiplied
    "dots3_note": {  # its sliding-window layer's own sizes (head_dim 256 = 192 + 64)
        "per_layer_config": {"2": {"num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
                                   "qk_nope_head_dim": 192}},
    },
    "muse_spark": {"moe_hidden_size": 2 * HIDDEN},  # the experts' own width, between two projections
    "ernie4_5_vl_moe": {  # text and vision experts; M-RoPE sections for head_dim 32
        "moe_intermediate_size": [EXPERT_WIDTH, EXPERT_WIDTH // 2],
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [6, 6, 4]},
    },
    "gemma4": {"enable_moe_block": True, "moe_intermediate_size": EXPERT_WIDTH, "top_k_experts": TOP_K},  # off by default
    "glm4v_moe": {  # M-RoPE sections for head_dim 32 at partial rotary 0.5
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 3, 3]},
    },
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "mamba_n_heads": 4},
    "hunyuan_v1_moe": {"head_dim": 32},  # None by default
    "inkling": {"head_dim": 32, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 32},
    "inkling2": {"head_dim": 32, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 32},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},  # attention + dense MLP, then Mamba + MoE
    "kimi_linear": {"linear_num_heads": 4, "linear_head_dim": 32},
    "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["conv", "conv", "full_attention"], "num_dense_layers": 1},
    "qwen4_exp": {  # linear, linear, indexed attention; the indexer's sizes are None by default
        "head_dim": 32, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 32, "indexer_budget": 8,
        "indexer_compress_ratio": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 32, "linear_value_head_dim": 32, "hc_lowrank": 32,
    },
}
# Families whose directory name is not a registered model type: the text model's type.
_MODEL_TYPES = {"inkling": "inkling_text"}


@functools.cache
def experts_families() -> tuple[str, ...]:
    """The transformers model families whose modeling code uses ``@use_experts_implementation``
    (transformers' own test for whether ``experts_implementation`` can be set)."""
    import transformers.models

    root = pathlib.Path(transformers.models.__path__[0])
    found = []
    for module in pkgutil.iter_modules(transformers.models.__path__):
        path = root / module.name / f"modeling_{module.name}.py"
        if path.exists() and "@use_experts_implementation" in path.read_text():
            found.append(module.name)
    return tuple(sorted(found))


def tiny_text_config(family: str) -> Any:
    """The family's text config, shrunk (see the module docstring) and with its overrides."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    config = AutoConfig.for_model(_MODEL_TYPES.get(family, family))
    for nested in ("thinker_config", "text_config"):  # multimodal: the language model alone
        config = getattr(config, nested, None) or config
    # a family with per-layer sizes (Dots3): the shrink sets the global ones, the overrides each layer's
    heterogeneous = getattr(config, "is_heterogeneous", False)
    if heterogeneous:
        config.allow_global_per_layer_attribute_access = True
    _shrink(config)
    if heterogeneous:
        config.allow_global_per_layer_attribute_access = False
    _apply(config, _OVERRIDES.get(family, {}))
    return config


def tiny_model(family: str, implementation: str = "grouped_mm", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The family's tiny text model (its causal LM where it has one), randomly initialised."""
    config = tiny_text_config(family)
    torch.manual_seed(0)
    model = _model_class(family, config)(config).to(dtype)
    _keep_strict_fp32(model, dtype)
    model.set_experts_implementation(implementation)
    return model


def _keep_strict_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Upcast what the family keeps in fp32 whatever the dtype (``_keep_in_fp32_modules_strict``:
    Inkling2's router), as ``from_pretrained`` does and ``.to(dtype)`` does not."""
    from transformers.core_model_loading import build_glob_alternation

    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    if not strict or dtype not in (torch.float16, torch.bfloat16):
        return
    pattern, _, _ = build_glob_alternation(list(strict))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if pattern.search(name):
            tensor.data = tensor.data.float()


def experts_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The experts-interface modules under ``module``, by path."""
    return [(name, m) for name, m in module.named_modules() if _is_experts(m)]


@dataclasses.dataclass
class BlockCall:
    """How a model called its first MoE block (the module that owns an experts module: router,
    experts, shared experts; in some families the whole decoder layer), tensors detached."""

    path: str
    block: torch.nn.Module
    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states: ``hidden_states=`` or the first tensor argument."""
        if "hidden_states" in self.kwargs:
            return self.kwargs["hidden_states"]
        return next(a for a in self.args if isinstance(a, torch.Tensor))

    def run(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module`` (the block, or a compiled copy) called the same way on hidden states ``x``;
        its output hidden states, shaped as ``x``."""
        args, kwargs = self.args, self.kwargs
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": x}
        else:
            i = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            args = (*args[:i], x, *args[i + 1:])
        out = module(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # some blocks also return router logits
        return out.reshape(x.shape)  # some return their tokens flattened (Ernie 4.5 VL)


def moe_block_call(model: torch.nn.Module, tokens: int = 64) -> BlockCall:
    """``model``'s first MoE block and how ``model`` calls it on ``(2, tokens // 2)`` token ids."""
    path, block = next(((name, m) for name, m in model.named_modules()
                        if any(_is_experts(child) for child in m.children())), (None, None))
    if block is None:
        raise ValueError(f"{type(model).__name__} has no experts module")
    seen: list[tuple[tuple, dict]] = []

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append(torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs)))

    ids = torch.randint(0, VOCAB, (2, tokens // 2), generator=torch.Generator().manual_seed(0))
    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    (args, kwargs), = seen
    from transformers.cache_utils import Cache

    # a KV cache would carry the capture's keys into every later call
    kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
    return BlockCall(path, block, args, kwargs)


def _is_experts(module: torch.nn.Module) -> bool:
    # the attributes @use_experts_implementation's __init__ sets
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "is_concatenated")


def _model_class(family: str, config: Any) -> type:
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    for auto in (AutoModelForCausalLM, AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    # text configs of multimodal families that the auto classes do not map
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    candidates = [
        cls for cls in vars(modeling).values()
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is type(config)
        and cls.forward is not torch.nn.Module.forward
    ]
    if not candidates:
        raise ValueError(f"{family}: no model class for {type(config).__name__}")
    return min(candidates, key=lambda cls: (not cls.__name__.endswith("ForCausalLM"), not cls.__name__.endswith("Model")))


def _shrink(config: Any) -> None:
    from transformers import PretrainedConfig

    fields = vars(config)
    aliases = getattr(config, "attribute_map", {})  # e.g. num_experts_per_tok -> moe_k
    layers = fields.get("num_hidden_layers")
    per_layer = {k: v for k, v in fields.items() if isinstance(v, list) and layers and len(v) == layers}
    # one layer of each kind any per-layer list names, and the first two layers
    keep = {0, 1} | {v.index(kind) for v in per_layer.values() for kind in v}
    keep = sorted(i for i in keep if i < (layers or 0))
    for key, value in per_layer.items():
        setattr(config, key, [value[i] for i in keep])
    for key, value in list(fields.items()):
        if isinstance(value, PretrainedConfig):
            _shrink(value)
        elif isinstance(value, float) and any(word in key for word in ("dropout", "jitter")):
            setattr(config, key, 0.0)  # random in training mode: no two runs would compare
        elif isinstance(value, int) and not isinstance(value, bool) and "intermediate_size" in key:
            expert = any(word in key for word in ("moe", "expert", "shared"))
            setattr(config, key, EXPERT_WIDTH if expert else 2 * EXPERT_WIDTH)
    if isinstance(fields.get("num_key_value_heads"), int) and isinstance(fields.get("num_attention_heads"), int):
        grouped = config.num_key_value_heads < config.num_attention_heads  # keep GQA, or MHA (MLA needs it)
        config.num_key_value_heads = 2 if grouped else 4
    generic = dict(
        hidden_size=HIDDEN, num_attention_heads=4, vocab_size=VOCAB, num_experts_per_tok=TOP_K,
        num_experts=EXPERTS, n_routed_experts=EXPERTS, num_local_experts=EXPERTS, moe_num_experts=EXPERTS,
        n_group=1, topk_group=1, first_k_dense_replace=1, decoder_sparse_step=1, mlp_only_layers=[],
        moe_layer_freq=1, q_lora_rank=32, kv_lora_rank=32,
    )
    for key, value in generic.items():
        if aliases.get(key, key) in fields:
            setattr(config, aliases.get(key, key), value)
    if layers:
        config.num_hidden_layers = len(keep)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(fields.get(key), int) and fields[key] >= VOCAB:
            setattr(config, key, 0)


def _apply(config: Any, overrides: dict[str, Any]) -> None:
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(vars(config).get(key), PretrainedConfig):
            _apply(getattr(config, key), value)
        else:
            setattr(config, key, value)
