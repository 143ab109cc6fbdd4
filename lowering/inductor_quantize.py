"""Inductor lowering of ``mxfp8::quantize_rebase`` through the plugin's own ``TritonTemplate``.

A custom op without a lowering is an opaque fallback kernel: whatever produces its input (the
``silu(h1) * h3`` before a down projection, a gather of routed tokens) is written to memory by
one kernel and read back by the cast. Lowered through a template whose input is read with
``load_input``, Inductor can fuse that producer into the cast as a prologue: one kernel reads
``h1`` and ``h3`` and writes the rebased e4m3 rows and their scales.

The template holds a whole row in one tile (``K <= MAX_ONE_READ_K``), reads it once and uses the
row kernel's own math (``_row_scales``, ``_quantize_rebase_tile``), so both paths give the same
bits. Its single output is a flat uint8 buffer: the (R, K) data, then the R row scales (a
second output would be a mutated input, and Inductor does not fuse prologues into templates
that mutate); the lowering returns an e4m3 view and a uint8 view of it. Anything else (CPU, 3D
or strided inputs, longer rows) falls back to the custom op and its kernels.

The producer reads more bytes than it writes (two bf16 inputs, one output), which Inductor's
prologue heuristic declines by default; the lowering opts the producer in the way
``invoke_quant`` does (``V.graph.invoke_quant_ops``), since reading h1 and h3 once in the cast
beats writing h and reading it back.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplate, autotune_select_algorithm, realize_inputs
from torch._inductor.virtualized import V

import mxfp8_compile.ops  # noqa: F401  (defines the op lowered here)
from mxfp8_compile.lowering.triton_quantize import MAX_ONE_READ_K, row_tile
from mxfp8_compile.numerics import BLOCK_SIZE, ScaleMode

_OP = torch.ops.mxfp8.quantize_rebase.default


@SymbolicGridFn
def _grid(rows: Any, meta: dict[str, Any], *, cdiv: Any) -> tuple[Any, int, int]:
    return (cdiv(rows, meta["BLOCK_R"]), 1, 1)


_TEMPLATE = TritonTemplate(
    name="mxfp8_quantize_rebase",
    grid=_grid,
    source=r"""
from mxfp8_compile.lowering.triton_quantize import _quantize_rebase_tile, _row_scales

{{def_kernel("X")}}
    R = {{size("X", 0)}}
    K = {{size("X", 1)}}
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_K)[None, :]
    mask = (rows < R) & (cols < K)
    {{load_input("X", "x", ("rows", "cols"), mask="mask", index_shape=("BLOCK_R", "BLOCK_K"))}}
    row_scale = _row_scales(x, RCEIL)
    q = _quantize_rebase_tile(x, row_scale, BLOCK_R, BLOCK_K, RCEIL, True)
    idx = rows * K + cols
    {{store_output(("idx",), "q", "mask", val_shape=("BLOCK_R", "BLOCK_K"))}}
    # the row scales follow the data in the same buffer
    tl.store(out_ptr0 + R * K + rows, row_scale[:, None].to(tl.uint8), mask=rows < R)
""",
)


def _templated(x: ir.IRNode) -> bool:
    """Whether the template takes the realized ``x``: a 2D CUDA tensor with contiguous static
    rows of at most ``MAX_ONE_READ_K`` elements, a multiple of 32. A transposed view (a dense
    wgrad's dy^T or x^T) would be read strided by a whole row per element: the custom op's
    column kernel reads it coalesced."""
    k = x.get_size()[-1]
    return (
        x.get_device() is not None and x.get_device().type == "cuda" and len(x.get_size()) == 2
        and isinstance(k, (int, sympy.Integer)) and int(k) % BLOCK_SIZE == 0
        and 0 < int(k) <= MAX_ONE_READ_K and x.get_stride()[-1] == 1
    )


def _opt_in_prologue(x: ir.IRNode) -> None:
    """Let Inductor fuse x's producer into the cast even though it reads more than it writes."""
    quant_ops = getattr(V.graph, "invoke_quant_ops", None)
    if quant_ops is None:
        return
    try:
        name = x.get_operation_name()
    except (AttributeError, NotImplementedError):  # a graph input: nothing to fuse
        return
    if name is not None:
        quant_ops.add(name)


@register_lowering(_OP, type_promotion_kind=None)
def _lower_quantize_rebase(x: ir.TensorBox, mode: str = "rceil") -> tuple[ir.TensorBox, ir.TensorBox]:
    # a view (the 2D reshape of a 3D activation) becomes a ReinterpretView of its realized
    # buffer: the template reads its input through a layout, which a plain View lacks, and
    # the layout's strides say whether the rows are contiguous
    x = realize_inputs(x)
    if not _templated(x):
        return fallback_handler(_OP, add_to_fallback_set=False)(x, mode)
    _opt_in_prologue(x)
    rows, k = x.get_size()
    k = int(k)
    device = x.get_device()
    layout = ir.FixedLayout(device, torch.uint8, [rows * k + rows], [1])
    block_r, block_k, num_warps = row_tile(k)
    choices: list[Any] = []
    _TEMPLATE.maybe_append_choice(
        choices, input_nodes=[x], layout=layout, call_sizes=[rows], num_stages=1, num_warps=num_warps,
        BLOCK_R=block_r, BLOCK_K=block_k, RCEIL=ScaleMode.parse(mode) is ScaleMode.RCEIL,
    )
    if not choices:  # the template could not be generated: the custom op's kernel does the work
        return fallback_handler(_OP, add_to_fallback_set=False)(x, mode)
    result = autotune_select_algorithm("mxfp8_quantize_rebase", choices, [x], layout)
    out = result[0] if isinstance(result, tuple) else result  # torch 2.13 returns (node, choice)
    storage, _ = ir.as_storage_and_layout(out)
    data = ir.ReinterpretView(data=storage, layout=ir.FixedLayout(device, torch.float8_e4m3fn, [rows, k], [k, 1], 0))
    scales = ir.ReinterpretView(data=storage, layout=ir.FixedLayout(device, torch.uint8, [rows], [1], rows * k))
    return ir.TensorBox.create(data), ir.TensorBox.create(scales)
