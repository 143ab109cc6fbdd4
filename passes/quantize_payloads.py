"""Carry the other token all-to-alls in 8 bits too (``Config.a2a_payloads == "all"``).

``hoist_quantize`` moves a quantization that a GEMM needs anyway above the all-to-all that
delivers its rows, which is exact. The other token all-to-alls of an expert-parallel graph, the
combine forward (expert outputs) and the dispatch backward (token gradients), carry GEMM outputs
into scatter-adds, where nothing is quantized. With ``a2a_payloads="all"`` their payload is
quantized in blocks of 32 along the last dim (``Config.a2a_wire_format``: MXINT8 by default, or
MXFP8 with ``Config.scale_mode``), crosses as uint8 data and scale bytes with the same splits,
and is dequantized on arrival to its own dtype: one rounding of what they carry, for about half
the bytes. Off by default, since it changes the numerics of tensors that no GEMM reads::

    t = all_to_all_single(x, out, in, g)       q, s = mxfp8.quantize_mxint8(x, -1)
    w = wait_tensor(t)                   ->    d = wait_tensor(all_to_all_single(q.view(u8), out, in, g))
                                               e = wait_tensor(all_to_all_single(s, out, in, g))
                                               w = mxfp8.dequantize_mxint8(d.view(i8), e, -1, x.dtype)

Runs after ``apply_hoists``: the all-to-alls it moved quantization above already carry uint8,
and those it planned but left as they were (``Config.a2a_wgrad="bf16_a2a"``, a reader that is
not row-local) stay so.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from mxfp8_compile.config import Config
from mxfp8_compile.numerics import BLOCK_SIZE, HIGH_PRECISION_DTYPES
from mxfp8_compile.passes._graph import insert_call, insert_multi, is_backward, known_multiple
from mxfp8_compile.passes.hoist_quantize import SHAPE_ONLY, a2a_targets, send_like
from mxfp8_compile.passes.report import Convert, HoistEntry, HoistSite, Skip, SkipReason

aten, mxfp8 = torch.ops.aten, torch.ops.mxfp8
c10d = torch.ops._c10d_functional


def _wire_ops(config: Config) -> tuple[object, tuple[object, ...], object, torch.dtype]:
    """``(quantize op, its arguments after the payload, dequantize op, data dtype)`` of the
    configured wire format."""
    if config.a2a_wire_format == "mxfp8":
        return mxfp8.quantize.default, (-1, config.scale_mode), mxfp8.dequantize.default, torch.float8_e4m3fn
    return mxfp8.quantize_mxint8.default, (-1,), mxfp8.dequantize_mxint8.default, torch.int8


def _note(wire_format: str) -> str:
    return (f"quantized for the wire only (a2a_payloads='all'): dequantized after it, one "
            f"{wire_format.upper()} rounding of the payload")


def quantize_other_payloads(graph: fx.Graph, config: Config, planned: set[str]) -> list[HoistEntry]:
    """Quantize the payload of every token all-to-all not in ``planned`` (the hoist's, by
    node name) around the collective; one report entry each. Nothing when ``config`` keeps
    them (``a2a_payloads="gemm_inputs"``)."""
    if config.a2a_payloads != "all":
        return []
    entries = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in a2a_targets() or node.name in planned:
            continue
        val = node.args[0].meta["val"]
        if val.dtype not in HIGH_PRECISION_DTYPES:  # counts, or MX bytes already
            continue
        shape = tuple(val.shape[1:])
        static = len(shape) >= 1 and all(isinstance(d, int) for d in shape)
        elements = math.prod(shape) if static else 0
        wait = _the_wait(node)
        carried = static and known_multiple(shape[-1], BLOCK_SIZE) and wait is not None
        site = HoistSite(
            a2a=node.name, backward=is_backward(node), crossed=(), gemms=(), wgrads=(), rows=str(val.shape[0]),
            row_bytes_before=elements * val.dtype.itemsize,
            row_bytes_after=elements + elements // BLOCK_SIZE if carried else elements * val.dtype.itemsize,
            notes=(_note(config.a2a_wire_format),) if carried else (), wire_only=True,
        )
        if carried:
            _carry_quantized(graph, node, wait, config)
            entries.append(HoistEntry(site, Convert()))
        else:
            detail = f"payload {tuple(val.shape)} {str(val.dtype).removeprefix('torch.')}"
            entries.append(HoistEntry(site, Skip(SkipReason.A2A_PAYLOAD_NOT_MX, detail)))
    return entries


def _the_wait(a2a: fx.Node) -> fx.Node | None:
    """The ``wait_tensor`` of ``a2a`` if, besides shape queries, it is all that reads it."""
    readers = [u for u in a2a.users if u.target not in SHAPE_ONLY]
    return readers[0] if len(readers) == 1 and readers[0].target == c10d.wait_tensor.default else None


def _carry_quantized(graph: fx.Graph, a2a: fx.Node, wait: fx.Node, config: Config) -> None:
    payload = a2a.args[0]
    provenance = f"quantize_payloads:{a2a.name}"
    quantize, extra, dequantize, data_dtype = _wire_ops(config)

    def call(target: object, *args: object) -> fx.Node:
        return insert_call(graph, target, args, like=a2a, provenance=provenance)

    data, scales = insert_multi(graph, quantize, (payload, *extra), like=a2a, provenance=provenance)
    sent = send_like(graph, a2a, (call(aten.view.dtype, data, torch.uint8), scales), provenance)
    received = call(dequantize, call(aten.view.dtype, sent[0], data_dtype), sent[1], -1, payload.meta["val"].dtype)
    wait.replace_all_uses_with(received)
    a2a.replace_all_uses_with(sent[0].args[0])  # shape queries: the data bytes have the payload's shape
    graph.erase_node(wait)
    graph.erase_node(a2a)
