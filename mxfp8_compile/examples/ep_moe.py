"""An expert-parallel MoE block of our own: torchtitan's all-to-all dispatcher with torchao's
padded permutation, in plain torch, so a compiled graph holds the whole pipeline.

One block per rank of the expert-parallel group (``ep`` ranks, ``experts / ep`` local experts
each), on the rank's tokens ``x`` (T, D)::

    gate, top-k, sort by expert           tokens grouped by destination rank (rank-major experts)
    counts all-to-all + wait              (E,) counts -> (ep, E_local) counts from every rank
    .tolist() splits                      host split sizes (unbacked SymInts under Dynamo)
    token all-to-all + wait               (R, D) rows, rank-major: (r0: e0, e1, ..), (r1: e0, ..)
    permute with padding                  cat a zero row, gather (Mp, D) expert-major rows, each
                                          expert's group padded to a multiple of ``align`` with
                                          copies of the zero row (torchao's index -1)
    grouped GEMMs                         ``torch._grouped_mm`` on (Mp, D): SiLU-gated experts
                                          (``expert="swiglu"``), or one GEMM per expert
                                          (``"linear"``, the pipeline torchao's EP tests measure)
    unpermute                             scatter rows back to rank-major order, padding dropped
    combine all-to-all + wait             splits swapped; (T*k, D) rows back on their source rank
    weight and scatter-add                (T, D)

Collectives are the functional ones (``all_to_all_single_autograd`` is differentiable in torch
2.11 and 2.13), so ``torch.compile(fullgraph=True)`` with
``torch._dynamo.config.capture_scalar_outputs = True`` captures the block as one graph.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from mxfp8_compile.examples.moe import route


@dataclasses.dataclass(frozen=True)
class EPMoEConfig:
    dim: int = 256
    experts: int = 8  # global; each rank holds experts // ep of them
    top_k: int = 2
    hidden: int = 256
    align: int = 32  # local expert groups are padded to a multiple of this many rows
    init_std: float = 0.02
    expert: str = "swiglu"  # or "linear": y = x W^T, W (dim, dim) per expert

    def __post_init__(self) -> None:
        if self.expert not in ("swiglu", "linear"):
            raise ValueError(f"EPMoEConfig.expert must be 'swiglu' or 'linear', got {self.expert!r}")


class EPMoE(nn.Module):
    """The block on one rank. ``w1``/``w3`` (E_local, hidden, dim) and ``w2`` (E_local, dim,
    hidden) are this rank's slice of the global experts (``"linear"``: ``w2`` (E_local, dim,
    dim) alone); the gate is replicated."""

    def __init__(self, cfg: EPMoEConfig, group: dist.ProcessGroup | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        group = group or dist.group.WORLD
        self.group = group.group_name  # a name, not the object: the module stays deep-copyable
        self.ep = dist.get_world_size(group)
        if cfg.experts % self.ep:
            raise ValueError(f"{cfg.experts} experts do not split over {self.ep} ranks")
        self.local = cfg.experts // self.ep
        # Every rank draws the global weights from the same seed and keeps its slice.
        g = torch.Generator().manual_seed(seed)
        if cfg.expert == "swiglu":
            full = {
                "w1": (cfg.experts, cfg.hidden, cfg.dim),
                "w3": (cfg.experts, cfg.hidden, cfg.dim),
                "w2": (cfg.experts, cfg.dim, cfg.hidden),
            }
        else:
            full = {"w2": (cfg.experts, cfg.dim, cfg.dim)}
        mine = slice(dist.get_rank(group) * self.local, (dist.get_rank(group) + 1) * self.local)
        self.gate = nn.Linear(cfg.dim, cfg.experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(cfg.experts, cfg.dim, generator=g) * cfg.init_std)
        for name, shape in full.items():
            weight = torch.randn(*shape, generator=g) * cfg.init_std
            setattr(self, name, nn.Parameter(weight[mine].contiguous()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, ep = self.cfg, self.ep
        r = route(self.gate, x, cfg.experts, cfg.top_k)  # experts in rank order: slots grouped by rank
        with torch.no_grad():
            received = funcol.all_to_all_single(r.counts, None, None, self.group)
            received = torch.ops._c10d_functional.wait_tensor(received)
            input_splits = r.counts.view(ep, -1).sum(dim=1).tolist()
            output_splits = received.view(ep, -1).sum(dim=1).tolist()
        tokens = funcol.all_to_all_single_autograd(x[r.source], output_splits, input_splits, self.group)
        tokens = torch.ops._c10d_functional.wait_tensor(tokens)
        index, offs = _padded_permutation(received.view(ep, self.local), tokens.shape[0], cfg.align)
        padded = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])[index]
        out = self._experts(padded, offs)
        # Unpermute: every padding row lands on the extra last row, which is dropped.
        back = out.new_zeros(tokens.shape[0] + 1, out.shape[1]).index_put([index], out)[:-1]
        back = funcol.all_to_all_single_autograd(back, input_splits, output_splits, self.group)
        back = torch.ops._c10d_functional.wait_tensor(back)
        return torch.zeros_like(x).index_add(0, r.source, back * r.weights)

    def _experts(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if self.cfg.expert == "linear":
            return torch._grouped_mm(x, self.w2.transpose(-2, -1), offs=offs)
        h1 = torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=offs)
        h3 = torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(h1) * h3, self.w2.transpose(-2, -1), offs=offs)


def _padded_permutation(counts: torch.Tensor, rows: int, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices from rank-major received rows to expert-major groups padded to ``align``.

    ``counts`` (ep, E_local): rows received from each rank for each local expert, laid out
    rank-major in ``rows`` received rows. Returns ``index`` (rows + E_local * (align - 1),) into
    the received rows plus one appended zero row (index ``rows``: padding, and the unused tail)
    and ``offs`` (E_local,) int32 end offsets of the padded groups. Runs on the device, no sync.
    """
    ep, local = counts.shape
    segments = counts.t().reshape(-1)  # expert-major (e0 r0, e0 r1, .., e1 r0, ..)
    starts = (counts.reshape(-1).cumsum(0) - counts.reshape(-1)).view(ep, local).t().reshape(-1)
    segment_of_row = torch.arange(segments.shape[0], device=counts.device).repeat_interleave(
        segments, output_size=rows
    )
    expert_of_row = segment_of_row // ep
    sources = starts[segment_of_row] + torch.arange(rows, device=counts.device) - (
        segments.cumsum(0) - segments
    )[segment_of_row]
    sizes = counts.sum(dim=0)
    padded_sizes = (sizes + align - 1) // align * align
    padded_ends = padded_sizes.cumsum(0)
    # A row moves by where its group starts padded minus where it starts unpadded.
    shift = (padded_ends - padded_sizes) - (sizes.cumsum(0) - sizes)
    destinations = torch.arange(rows, device=counts.device) + shift[expert_of_row]
    index = torch.full((rows + local * (align - 1),), rows, dtype=torch.int64, device=counts.device)
    index = index.index_put([destinations], sources)
    return index, padded_ends.to(torch.int32)


def build(
    cfg: EPMoEConfig | None = None, *, tokens: int = 64, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
    group: dist.ProcessGroup | None = None,
) -> tuple[EPMoE, tuple[torch.Tensor]]:
    """This rank's block (in ``dtype``) and its tokens (T, D); the process group must exist.
    Weights are the same global draw on every rank; tokens differ per rank.

    Token rows and channels get magnitudes spread over 4 binades, as real activations have:
    with i.i.d. Gaussian tokens nearly every block of 32 has the same MX scale, whichever way
    it runs, which would hide the difference between scaling along rows and along tokens."""
    cfg = cfg or EPMoEConfig()
    model = EPMoE(cfg, group, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1 + dist.get_rank(group))
    rows, channels = (2 ** (4 * torch.rand(n, generator=g) - 2) for n in (tokens, cfg.dim))
    x = torch.randn(tokens, cfg.dim, generator=g) * rows[:, None] * channels
    return model, (x.to(dtype),)
