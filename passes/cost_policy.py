"""Convert a GEMM only where the target's cost model predicts that its FP8 path beats bf16.

A converted GEMM runs its FP8 GEMM plus the casts of its operands (and their scale decoding);
a cast that several converted GEMMs read is paid once, its time split among the GEMMs that read
it. Casts of one tensor the same way are one cast: the rewrite shares an activation's casts
between a grouped GEMM and its wgrad, and the partitioner's common-subexpression elimination
merges the rest (x cast for the q, k and v projections).
The predicted speedup of a GEMM is its bf16 time over that sum (``lowering/costs.py``). Starting
from every GEMM the other rules convert, the one predicted slowest is kept in bf16 and the shares
are computed again (the casts it shared now fall on fewer GEMMs), until every converted GEMM is
predicted faster than bf16. Kept GEMMs say ``NOT_FASTER`` with their predicted ratio; converted
ones carry theirs in the decision's note.

An activation that a token permutation produces (``passes/gathered_rows.py``) and that only
GEMMs read is cast through the permutation (``Config.gathered_casts``) once every one of those
GEMMs converts; the permuted copy, which any of them kept in bf16 would make the graph write, is
then never written. Its time (a read and a write of the copy, timed as a row cast of those
bytes) is counted as a saving, split among the GEMMs that read it, while all of them convert.

Shapes come from the graph; a symbolic size is read at its hint (the sizes it was traced at) or,
for a data-dependent size, at Inductor's ``unbacked_symint_fallback``. Grouped GEMMs are predicted
with equal groups (routing is unknown at compile time). Not modelled: what Inductor fuses into a
cast (a producer's pointwise ops), host launch overhead (the constants are GPU time), and the
copy that batched experts with a strided operand make.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.fx as fx

from mxfp8_compile.config import Config
from mxfp8_compile.lowering.costs import TargetCosts, cast_bytes, target_costs
from mxfp8_compile.passes.find_gemms import GemmMatch, Operand
from mxfp8_compile.passes.report import Convert, Layout, Role, Skip, SkipReason
from mxfp8_compile.passes.rewrite_gemms import (CastKey, cast_key, row_cast_key, shared_cast_keys, shared_gather,
                                                swaps_last_two, token_cast_keys)

SCALE_OPERANDS = 2  # each converted GEMM decodes the scales of both operands


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One GEMM's predicted times in ms: bf16, its FP8 GEMM, its share of the casts, and its
    share of the permuted copies that converting it with the other readers spares."""

    bf16: float
    fp8: float
    casts: float
    spared: float = 0.0

    @property
    def speedup(self) -> float:
        return self.bf16 / (self.fp8 + self.casts - self.spared)

    def describe(self) -> str:
        spared = f" - permuted copy spared {self.spared:.3f} ms" if self.spared else ""
        return (f"predicted {self.speedup:.2f}x: bf16 {self.bf16:.3f} ms, FP8 {self.fp8:.3f} ms + casts "
                f"{self.casts:.3f} ms{spared}")


@dataclasses.dataclass(frozen=True)
class _Cast:
    """A cast a GEMM needs: ``identity`` is equal for one cast read by several GEMMs."""

    identity: object
    ms: float


@dataclasses.dataclass(frozen=True)
class _Permutation:
    """A token permutation the casts read through once all of ``readers`` (match indices)
    convert, sparing the copy of ``ms``."""

    readers: frozenset[int]
    ms: float


def apply_cost_policy(matches: list[GemmMatch], config: Config, target: str) -> list[GemmMatch]:
    """``matches`` with every converted GEMM that ``target``'s cost model predicts no faster than
    bf16 kept in bf16 (``NOT_FASTER``) and the others' predictions in their notes; unchanged
    where ``Config.cost_model`` is off or the target has no constants."""
    costs = target_costs(target)
    if not config.cost_model or costs is None:
        return matches
    plans = {i: (_gemm_times(m, config, costs), _casts(m, costs))
             for i, m in enumerate(matches) if m.decision}
    permutations = _permutations(matches, costs) if config.gathered_casts else []
    converted, decisions = set(plans), {}
    while converted:
        predictions = _predict(plans, converted, permutations)
        slowest = min(sorted(converted), key=lambda i: predictions[i].speedup)
        if predictions[slowest].speedup > 1.0:
            break
        converted.discard(slowest)
        decisions[slowest] = Skip(SkipReason.NOT_FASTER, predictions[slowest].describe())
    for i in converted:
        note = "; ".join(filter(None, (matches[i].decision.note, f"predicted {predictions[i].speedup:.2f}x")))
        decisions[i] = Convert(note)
    return [dataclasses.replace(m, decision=decisions[i]) if i in decisions else m for i, m in enumerate(matches)]


def _predict(plans: dict[int, tuple[tuple[float, float], list[_Cast]]], converted: set[int],
             permutations: Sequence[_Permutation] = ()) -> dict[int, Prediction]:
    readers = collections.Counter(c.identity for i in converted for c in plans[i][1])
    spared: dict[int, float] = collections.defaultdict(float)
    for p in permutations:
        if p.readers <= converted:
            for i in p.readers:
                spared[i] += p.ms / len(p.readers)
    return {i: Prediction(bf16, fp8, sum(c.ms / readers[c.identity] for c in casts), spared[i])
            for i in converted for (bf16, fp8), casts in [plans[i]]}


def _permutations(matches: list[GemmMatch], costs: TargetCosts) -> list[_Permutation]:
    """The token permutations that the rewrite casts through when every GEMM of ``matches``
    that reads them converts (``rewrite_gemms._Casts``), with the time of the copy each spares."""
    candidates = [i for i, m in enumerate(matches) if m.decision]
    readers: dict[CastKey, set[int]] = collections.defaultdict(set)
    for i in candidates:
        for key in (row_cast_key(matches[i]), *token_cast_keys(matches[i])):
            if key is not None:
                readers[key].add(i)
    found = []
    for key in shared_cast_keys([matches[i] for i in candidates]):
        node = key[0]
        if shared_gather(key) is None or not _read_only_by(node, {matches[i].node for i in readers[key]}):
            continue
        rows, width = _cast_shape(node, False)
        copy_ms = costs.cast_ms("rows", 2 * rows * width * _itemsize(node), width)  # read and write
        found.append(_Permutation(frozenset(readers[key]), copy_ms))
    return found


def _read_only_by(node: fx.Node, gemms: set[fx.Node]) -> bool:
    """Whether every reader of ``node``, through transposes, is one of ``gemms``."""
    return all(user in gemms or (user.op == "call_function" and swaps_last_two(user) and _read_only_by(user, gemms))
               for user in node.users)


def _hint(size: int | torch.SymInt) -> int:
    """A size's value at compile time: its hint, or Inductor's fallback for a data-dependent one."""
    if isinstance(size, int):
        return size
    if size.node.has_hint():
        return int(size.node.hint)
    from torch._inductor import config as inductor_config

    return inductor_config.unbacked_symint_fallback


def _shape(operand: Operand) -> tuple[int, ...]:
    return tuple(_hint(d) for d in operand.shape)


def _gemm_times(m: GemmMatch, config: Config, costs: TargetCosts) -> tuple[float, float]:
    """(bf16 ms, FP8 ms) of ``m``'s GEMM alone: A (.., M, K) x B (.., K, N) over its groups."""
    a, b = _shape(m.a), _shape(m.b)
    rows, contraction, columns = a[-2], a[-1], b[-1]
    layout = m.site.layout
    over_tokens = layout is Layout.GROUPED_2D2D or (layout is Layout.BATCHED and m.site.role is Role.WGRAD)
    if layout is Layout.DENSE:
        kind, groups = "dense_wgrad" if m.site.role is Role.WGRAD else "dense", 1
    else:
        groups = _hint(m.offs.meta["val"].shape[0]) if m.offs is not None else a[0]
        kind = "grouped_wgrad" if over_tokens else "grouped"
        if layout is Layout.GROUPED_2D2D:
            contraction = contraction / groups  # (N, T) x (T, K): each group contracts its own tokens
        elif layout is Layout.GROUPED_2D3D:
            rows = rows / groups  # (T, K) x (E, K, N): each group its own tokens
    contraction = math.ceil(contraction / 32) * 32 if m.pads_contraction else contraction
    fast = m.site.role.value in config.fast_accum
    dims = (rows, columns, contraction)
    return (costs.gemm_ms(kind, "bf16", *dims, groups),
            costs.gemm_ms(kind, "fp8", *dims, groups, fast_accum=fast))


def _casts(m: GemmMatch, costs: TargetCosts) -> list[_Cast]:
    """The casts ``m``'s rewrite runs (``rewrite_gemms._cast_operands``), each with its time."""
    layout = m.site.layout
    decode = _Cast((m.site.label, "decode"), SCALE_OPERANDS * costs.decode_us * 1e-3)
    if layout is Layout.GROUPED_2D2D or (layout is Layout.BATCHED and m.site.role is Role.WGRAD):
        # A is dy^T and B is x: each cast along tokens, read as the (T, width) rows it is
        operands = ((m.a.node, not m.a.transposed), (m.b.node, m.b.transposed))
        casts = [_token_group_cast(m, node, transposed, costs) for node, transposed in operands]
    else:
        casts = [_row_cast(m, m.a.node, m.a.transposed, costs), _row_cast(m, m.b.node, not m.b.transposed, costs)]
    return [*casts, decode]


def _token_group_cast(m: GemmMatch, node: fx.Node, transposed: bool, costs: TargetCosts) -> _Cast:
    shape = _cast_shape(node, transposed)
    tokens, width = math.prod(shape[:-1]), shape[-1]
    ms = costs.cast_ms("token_groups", cast_bytes(tokens * width, _itemsize(node)), width)
    return _Cast(("token_groups", cast_key(node, transposed, m.offs)), ms)


def _row_cast(m: GemmMatch, node: fx.Node, transposed: bool, costs: TargetCosts) -> _Cast:
    """The cast of ``node`` (or its transpose) along its last dim; a padded contraction adds the
    copy that pads it (timed as a cast of the same bytes)."""
    shape = _cast_shape(node, transposed)
    rows, width = math.prod(shape[:-1]), shape[-1]
    strided = _hint(node.meta["val"].stride(-2 if transposed else -1)) != 1
    ms = costs.cast_ms("transposed" if strided else "rows", cast_bytes(rows * width, _itemsize(node)), width)
    if m.pads_contraction:
        ms += costs.cast_ms("rows", rows * width * 2 * _itemsize(node), width)
    return _Cast(("rows", cast_key(node, transposed, None), m.pads_contraction), ms)


def _cast_shape(node: fx.Node, transposed: bool) -> tuple[int, ...]:
    shape = tuple(_hint(d) for d in node.meta["val"].shape)
    return shape[:-2] + shape[-2:][::-1] if transposed else shape


def _itemsize(node: fx.Node) -> int:
    return node.meta["val"].dtype.itemsize
