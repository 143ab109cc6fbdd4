"""What a GEMM and a cast cost on a target: the cost model's formulas and its measured constants.

The one place these numbers live. ``passes/cost_policy.py`` uses them to convert a GEMM only
where its FP8 path, with the casts it pays for, is predicted to beat bf16.

A GEMM of ``groups`` groups, each ``m`` x ``n`` output contracted over ``k``, takes::

    ms = overhead + 2 m n k groups / (tflops * e(m, m_half) * e(n, n_half) * e(k, k_half))
    e(d, half) = d / (d + half)

(throughput rises with each dim and saturates; ``half`` is the size at which a dim alone halves
it). A cast kernel moving ``bytes`` (``cast_bytes``: its input read once and its 1-byte elements
written once, the nominal traffic; the scale bytes and the token-group cast's second read of
its input are in its fitted bandwidth) along rows ``width`` elements long takes::

    ms = overhead + bytes / (tbps * e(width, width_half))

The constants come from ``benchmarks/calibrate_costs.py`` on the device named in ``measured``,
fitted by ``benchmarks/fit_costs.py``; ``benchmarks/RESULTS.md`` has the check of predicted
against measured speedups. Targets without a table (``emulated``, the reference; ``sm100``,
which no machine here can run) have no prediction: they convert every eligible GEMM.
"""

from __future__ import annotations

import dataclasses
import math

# GEMM kinds: the 2Dx3D grouped GEMM (forward, dgrad), the 2Dx2D grouped GEMM (wgrad: groups
# contract over their own tokens), a dense GEMM (forward, dgrad) and a dense wgrad (a small
# output contracted over every token: cuBLAS picks other kernels for it)
GEMM_KINDS = ("grouped", "grouped_wgrad", "dense", "dense_wgrad")
# Cast kinds: along contiguous rows, along a transposed view's rows (strided reads), along tokens
# per group (sm90's column cast: an amax pass, then the cast)
CAST_KINDS = ("rows", "transposed", "token_groups")


def cast_bytes(numel: int, itemsize: int) -> int:
    """A cast's nominal traffic: its input read once, its 1-byte elements written once."""
    return numel * (itemsize + 1)


def _efficiency(size: float, half: float) -> float:
    return size / (size + half)


@dataclasses.dataclass(frozen=True)
class GemmFit:
    """Throughput of one GEMM kind in one dtype (see the module docstring)."""

    tflops: float
    half: tuple[float, float, float]  # (m, n, k)
    overhead_us: float

    def ms(self, m: float, n: float, k: float, groups: int = 1) -> float:
        eff = math.prod(_efficiency(d, h) for d, h in zip((m, n, k), self.half))
        return self.overhead_us * 1e-3 + 2 * m * n * k * groups / (self.tflops * 1e9 * eff)


@dataclasses.dataclass(frozen=True)
class CastFit:
    """Bandwidth of one cast kind (see the module docstring)."""

    tbps: float
    width_half: float
    overhead_us: float

    def ms(self, nbytes: float, width: float) -> float:
        return self.overhead_us * 1e-3 + nbytes / (self.tbps * 1e9 * _efficiency(width, self.width_half))


@dataclasses.dataclass(frozen=True)
class TargetCosts:
    """A target's constants: GEMMs in bf16 and in FP8 (with fast accumulation), what exact
    accumulation costs on top, the casts, and the scale decoding of one operand."""

    measured: str
    bf16: dict[str, GemmFit]
    fp8: dict[str, GemmFit]
    exact_accum_factor: dict[str, float]
    casts: dict[str, CastFit]
    decode_us: float

    def gemm_ms(self, kind: str, dtype: str, m: float, n: float, k: float, groups: int = 1,
                fast_accum: bool = True) -> float:
        fit = (self.bf16 if dtype == "bf16" else self.fp8)[kind]
        factor = 1.0 if dtype == "bf16" or fast_accum else self.exact_accum_factor[kind]
        return fit.ms(m, n, k, groups) * factor

    def cast_ms(self, kind: str, nbytes: float, width: float) -> float:
        return self.casts[kind].ms(nbytes, width)


TABLES: dict[str, TargetCosts] = {}
# sm90 table: begin (benchmarks/fit_costs.py --write)
TABLES['sm90'] = TargetCosts(
    measured='NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, 2026-12-07',
    bf16={
        'grouped': GemmFit(tflops=718.7, half=(63.4, 83.2, 102.5), overhead_us=10.99),
        'grouped_wgrad': GemmFit(tflops=700.3, half=(23.7, 34.8, 159.1), overhead_us=8.38),
        'dense': GemmFit(tflops=716.4, half=(0.4, 17.7, 110.1), overhead_us=1.95),
        'dense_wgrad': GemmFit(tflops=719.5, half=(39.9, 13.6, 0.3), overhead_us=3.52),
    },
    fp8={
        'grouped': GemmFit(tflops=1285.7, half=(224.0, 138.4, 308.0), overhead_us=7.28),
        'grouped_wgrad': GemmFit(tflops=1323.7, half=(137.4, 152.4, 398.5), overhead_us=7.94),
        'dense': GemmFit(tflops=1481.4, half=(137.0, 68.7, 375.0), overhead_us=2.84),
        'dense_wgrad': GemmFit(tflops=1889.4, half=(462.1, 480.9, 0.3), overhead_us=3.97),
    },
    exact_accum_factor={
        'grouped': 1.209,
        'grouped_wgrad': 1.188,
        'dense': 1.158,
        'dense_wgrad': 1.006,
    },
    casts={
        'rows': CastFit(tbps=3.512, width_half=558.5, overhead_us=1.33),
        'transposed': CastFit(tbps=1.601, width_half=62.3, overhead_us=7.94),
        'token_groups': CastFit(tbps=1.446, width_half=3.5, overhead_us=8.13),
    },
    decode_us=1.4,
)
# sm90 table: end


def target_costs(target: str) -> TargetCosts | None:
    """The constants of ``target``, or None where it has none (it converts without predicting)."""
    return TABLES.get(target)
