"""Real client MoE models, built tiny and offline (no hub access): HF transformers 5.x families
and torchtitan 0.3.0's DeepSeek-V3 debugmodel. Each builder imports its package when called."""

from __future__ import annotations

import os

import torch

HF_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "llama4")


def hf_model(family: str, dtype: torch.dtype = torch.bfloat16, *, moe_layers: int = 2, hidden: int = 512) -> torch.nn.Module:
    """A tiny randomly initialized HF causal LM of ``family`` with ``moe_layers`` MoE layers
    (DeepSeek-V3 gets one dense layer in front, as its ``first_k_dense_replace`` asks)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    common = dict(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_hidden_layers=moe_layers, intermediate_size=512,
                                          moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2)
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_hidden_layers=moe_layers, intermediate_size=128,
                                         num_local_experts=8, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    elif family == "gpt_oss":
        cfg = transformers.GptOssConfig(**common, num_hidden_layers=moe_layers, intermediate_size=128,
                                        num_local_experts=8, num_experts_per_tok=2, head_dim=64,
                                        layer_types=["full_attention"] * moe_layers)
        cls = transformers.GptOssForCausalLM
    elif family == "deepseek_v3":  # MLA needs kv heads == heads
        cfg = transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, num_hidden_layers=1 + moe_layers, intermediate_size=256,
            moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32,
            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        )
        cls = transformers.DeepseekV3ForCausalLM
    elif family == "llama4":  # text only; its experts are torch.bmm on (E, tokens, hidden) views
        cfg = transformers.Llama4TextConfig(**common, num_hidden_layers=moe_layers, head_dim=128, intermediate_size=128,
                                            intermediate_size_mlp=256, num_local_experts=8, num_experts_per_tok=1,
                                            interleave_moe_layer_step=1)
        cls = transformers.Llama4ForCausalLM
    else:
        raise ValueError(f"unknown HF family {family!r}; known: {', '.join(HF_FAMILIES)}")
    torch.manual_seed(0)
    return cls(cfg).to(dtype)


class EmbedsToLogits(torch.nn.Module):
    """An HF causal LM as a function of its input embeddings (so input grads exist)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeds).logits


def hf_example(family: str, *, tokens: int = 64) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    model = hf_model(family)
    ids = torch.randint(0, 1000, (2, tokens), generator=torch.Generator().manual_seed(0))
    return EmbedsToLogits(model), (model.get_input_embeddings()(ids).detach(),)


def torchtitan_dsv3(*, force_balance: bool = False) -> torch.nn.Module:
    """torchtitan 0.3.0's DeepSeek-V3 ``debugmodel`` in bf16, SDPA attention (FlexAttention has
    no CPU backward; torchtitan's own CPU tests swap it the same way). ``force_balance`` uses
    the router's ``_debug_force_load_balance``: routing that no numerics can change."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import model_registry

    cfg = model_registry("debugmodel", attn_backend="flex").model
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        if layer.moe is not None:
            layer.moe.router._debug_force_load_balance = force_balance
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states(buffer_device=torch.device("cpu"))
    return model.bfloat16()


def torchtitan_example(*, tokens: int = 64) -> tuple[torch.nn.Module, tuple[object, ...]]:
    tok = torch.randint(0, 2000, (2, tokens), generator=torch.Generator().manual_seed(0))
    return torchtitan_dsv3(), (tok, torch.arange(tokens).expand(2, tokens), None)


def torchtitan_dsv3_ep(mesh: object, *, force_balance: bool = False) -> torch.nn.Module:
    """``torchtitan_dsv3`` with expert parallelism over ``mesh`` (a 1D ``DeviceMesh`` named
    ``"ep"``): every MoE layer keeps this rank's slice of its experts and dispatches tokens through
    torchtitan's ``AllToAllTokenDispatcher``, as torchtitan's ``parallelize`` does with ``Shard(0)``
    DTensors (plain tensors here: the dispatch runs on the local tensors either way)."""
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("dtensor")  # anything but "spmd_types": the dispatcher's funcol path
    model = torchtitan_dsv3(force_balance=force_balance)
    ep, rank = mesh.size(), mesh.get_local_rank()
    for block in model.layers.values():
        if not hasattr(block, "moe"):  # the dense first layer
            continue
        routed = block.moe.routed_experts
        routed.token_dispatcher.wire_meshes(ep_mesh=mesh)
        experts = routed.inner_experts
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            weight = getattr(experts, name).detach()
            local = weight.shape[0] // ep
            setattr(experts, name, torch.nn.Parameter(weight[rank * local:(rank + 1) * local].clone()))
    return model
