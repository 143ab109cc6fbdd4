"""A small Mixture-of-Experts language model of our own, in the style of the real clients.

Each block: RMSNorm, causal attention (q/k/v/o linears), RMSNorm, MoE: a router gate, top-k
routing, SiLU-gated routed experts whose 3D weights (E, out, in) go through
``torch._grouped_mm`` as ``W.transpose(-2, -1)`` on tokens sorted by expert (ragged, possibly
empty groups, as HF transformers and torchtitan produce them), and a dense shared expert.
The model takes token embeddings (B, S, dim), so input gradients can be compared, and returns
logits through an lm_head.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    dim: int = 128
    heads: int = 4
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    shared_hidden: int = 128  # 0: no shared expert
    vocab: int = 256
    init_std: float = 0.02  # as torchtitan and HF transformers (initializer_range) initialize
    rope_theta: float = 0.0  # rotary position embedding's base (Qwen3: 1e6, Llama: 1e4); 0: none

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"MoEConfig: dim {self.dim} does not split into {self.heads} heads; "
                             "choose heads that divide dim")
        if self.rope_theta < 0 or (self.rope_theta and self.dim // self.heads % 2):
            raise ValueError(f"MoEConfig: rope_theta {self.rope_theta} with head dim {self.dim // self.heads}: "
                             "the rotary embedding needs a positive base and an even head dim (rope_theta=0 "
                             "turns it off)")


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, H, S, D), D even, in fp32 and back to its dtype:
    the halves of each head's channels are rotated pairwise (the HF transformers and GPT-NeoX
    layout), position p by angle p * theta^(-2i/D) for channel pair i."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        # None when off: under dynamic=True Dynamo makes a float attribute symbolic, and testing
        # 0.0 for truth would specialize on it and trace the frame a second time (when on, the
        # rotation specializes on theta: one restart of the first trace, no recompile)
        self.rope_theta = cfg.rope_theta or None
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope_theta is not None:
            q, k = rotary(q, self.rope_theta), rotary(k, self.rope_theta)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class GroupedExperts(nn.Module):
    """SiLU-gated experts: ``w2 @ (silu(w1 @ x) * (w3 @ x))`` per expert, on sorted tokens."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(cfg.experts, cfg.expert_hidden, cfg.dim))
        self.w3 = nn.Parameter(torch.empty(cfg.experts, cfg.expert_hidden, cfg.dim))
        self.w2 = nn.Parameter(torch.empty(cfg.experts, cfg.dim, cfg.expert_hidden))

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        h1 = torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=offs)
        h3 = torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(h1) * h3, self.w2.transpose(-2, -1), offs=offs)


class SharedExpert(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.shared_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.shared_hidden, bias=False)
        self.w2 = nn.Linear(cfg.shared_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclasses.dataclass(frozen=True)
class Routing:
    """Top-k routing of T tokens over E experts, in expert order (each expert's slots together,
    tokens in order within an expert): ``source`` (T*k,) the token of each slot, ``weights``
    (T*k, 1) its normalized routing weight in the tokens' dtype, ``counts`` (E,) int64 slots per
    expert."""

    source: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor


def route(gate: nn.Linear, tokens: torch.Tensor, experts: int, top_k: int) -> Routing:
    """Softmax over the gate's logits (fp32), top-k, weights renormalized over the k chosen."""
    probs = gate(tokens).float().softmax(dim=-1)
    weights, expert_ids = probs.topk(top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(tokens.dtype)
    flat_ids = expert_ids.flatten()
    order = torch.sort(flat_ids, stable=True).indices
    counts = torch.zeros(experts, dtype=torch.int64, device=tokens.device)
    counts = counts.scatter_add(0, flat_ids, torch.ones_like(flat_ids))
    return Routing(order // top_k, weights.flatten()[order, None], counts)


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.experts_count, self.top_k = cfg.experts, cfg.top_k
        self.gate = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.experts = GroupedExperts(cfg)
        self.shared_expert = SharedExpert(cfg) if cfg.shared_hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        r = route(self.gate, tokens, self.experts_count, self.top_k)
        offs = torch.cumsum(r.counts, 0, dtype=torch.int32)
        routed = self.experts(tokens[r.source], offs) * r.weights
        out = torch.zeros_like(tokens).index_add(0, r.source, routed)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.moe_norm = nn.RMSNorm(cfg.dim)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))


class MoEModel(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for name, param in self.named_parameters():
            if param.dim() >= 2:  # every linear and expert weight; norms keep their ones
                nn.init.normal_(param, std=cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(
    cfg: MoEConfig | None = None, *, batch: int = 2, seq: int = 64, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[MoEModel, tuple[torch.Tensor]]:
    """The example model (bf16 by default) and one input batch of embeddings (B, S, dim)."""
    cfg = cfg or MoEConfig()
    torch.manual_seed(seed)
    model = MoEModel(cfg).to(dtype)
    x = torch.randn(batch, seq, cfg.dim, dtype=dtype)
    return model, (x,)
