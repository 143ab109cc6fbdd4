"""Fit the cost model's constants to ``calibrate_costs.py``'s measurements, and check them.

Fits each GEMM kind and dtype (``GemmFit``: throughput, the three half-efficiency sizes, an
overhead) and each cast kind (``CastFit``) by least squares on log time, from the ``gemms`` and
``casts`` sections only. Then predicts every ``composed`` row (a role's FP8 GEMM with its casts
against bf16, on shapes partly off the fitting grid) and prints predicted against measured
speedups. ``--write`` puts the table into ``lowering/costs.py`` for the device the measurements
name.

    python benchmarks/fit_costs.py costs.json [--write lowering/costs.py] [--markdown check.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

import torch

from mxfp8_compile.lowering.costs import CAST_KINDS, GEMM_KINDS, CastFit, GemmFit, TargetCosts, cast_bytes

BF16_BYTES = 2
# calibrate_costs.py's roles -> (GEMM kind, whether its contraction is over tokens per group)
ROLE_KINDS = {"grouped forward": "grouped", "grouped dgrad": "grouped", "grouped wgrad": "grouped_wgrad",
              "dense forward": "dense", "dense dgrad": "dense", "dense wgrad": "dense_wgrad"}
CAST_KIND = {"rows": "rows", "weight rows": "rows", "transposed view": "transposed",
             "weight transposed view": "transposed", "token groups": "token_groups"}


def gemm_dims(role: str, tokens: int, k: int, n: int, experts: int) -> tuple[float, float, float, int]:
    """(m, n, k, groups) of ``role`` for x (T, K), dy (T, N) and weights (E, N, K): output rows and
    columns of each group and its contraction."""
    return {
        "grouped forward": (tokens / experts, n, k, experts),
        "grouped dgrad": (tokens / experts, k, n, experts),
        "grouped wgrad": (n, k, tokens / experts, experts),
        "dense forward": (tokens, n, k, 1),
        "dense dgrad": (tokens, k, n, 1),
        "dense wgrad": (n, k, tokens, 1),
    }[role]


def role_casts(role: str, tokens: int, k: int, n: int, experts: int) -> list[tuple[str, int, int]]:
    """The casts ``role``'s rewrite runs: (kind, elements, width along which it casts)."""
    return {
        "grouped forward": [("rows", tokens * k, k), ("rows", experts * n * k, k)],
        "grouped dgrad": [("rows", tokens * n, n), ("transposed", experts * n * k, n)],
        "grouped wgrad": [("token_groups", tokens * n, n), ("token_groups", tokens * k, k)],
        "dense forward": [("rows", tokens * k, k), ("rows", n * k, k)],
        "dense dgrad": [("rows", tokens * n, n), ("transposed", n * k, n)],
        "dense wgrad": [("transposed", tokens * n, tokens), ("transposed", tokens * k, tokens)],
    }[role]


def _fit(rows: list[tuple[tuple[float, ...], float]], model, init: list[float], steps: int = 3000) -> list[float]:
    """Parameters (their logs are optimised) minimising the squared log error of ``model``."""
    params = torch.tensor([math.log(v) for v in init], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    y = torch.log(torch.tensor([r[1] for r in rows], dtype=torch.float64))
    opt = torch.optim.Adam([params], lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        loss = ((torch.log(model(params.exp(), x)) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if step == steps // 2:
            opt.param_groups[0]["lr"] = 0.01
    return params.exp().tolist()


def _gemm_model(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # GemmFit.ms, differentiable
    tflops, hm, hn, hk, overhead = p
    m, n, k, groups = x.unbind(1)
    eff = (m / (m + hm)) * (n / (n + hn)) * (k / (k + hk))
    return overhead * 1e-3 + 2 * m * n * k * groups / (tflops * 1e9 * eff)


def _cast_model(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # CastFit.ms, differentiable
    tbps, half, overhead = p
    nbytes, width = x.unbind(1)
    return overhead * 1e-3 + nbytes / (tbps * 1e9 * width / (width + half))


def fit(data: dict) -> tuple[TargetCosts, dict[str, float]]:
    """The table, and the median absolute error of each fit (as a fraction of the time)."""
    errors: dict[str, float] = {}

    def gemm(kind: str, dtype: str) -> GemmFit:
        rows = [(gemm_dims(r["role"], r["T"], r["K"], r["N"], r["E"]), r["ms"]) for r in data["gemms"]
                if ROLE_KINDS[r["role"]] == kind and r["dtype"] == dtype and r["role"] != "grouped dgrad"]
        tflops, hm, hn, hk, overhead = _fit(rows, _gemm_model, [900.0 if dtype == "fp8" else 600.0, 64, 64, 64, 5])
        result = GemmFit(round(tflops, 1), (round(hm, 1), round(hn, 1), round(hk, 1)), round(overhead, 2))
        errors[f"{dtype} {kind}"] = statistics.median(abs(result.ms(*d) / ms - 1) for d, ms in rows)
        return result

    def cast(kind: str) -> CastFit:
        rows = [((cast_bytes(r["rows"] * r["width"], BF16_BYTES), r["width"]), r["ms"]) for r in data["casts"]
                if CAST_KIND.get(r["kind"]) == kind]
        tbps, half, overhead = _fit(rows, _cast_model, [2.5, 64, 5])
        result = CastFit(round(tbps, 3), round(half, 1), round(overhead, 2))
        errors[f"cast {kind}"] = statistics.median(abs(result.ms(*d) / ms - 1) for d, ms in rows)
        return result

    def exact_factor(kind: str) -> float:
        rows = {(r["role"], r["T"], r["K"], r["N"]): r["ms"] for r in data["gemms"] if r["dtype"] == "fp8"}
        ratios = [r["ms"] / rows[(r["role"], r["T"], r["K"], r["N"])] for r in data["gemms"]
                  if r["dtype"] == "fp8_exact" and ROLE_KINDS[r["role"]] == kind and r["role"] != "grouped dgrad"]
        return round(statistics.median(ratios), 3)

    meta = data["meta"]
    costs = TargetCosts(
        measured=f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}",
        bf16={k: gemm(k, "bf16") for k in GEMM_KINDS},
        fp8={k: gemm(k, "fp8") for k in GEMM_KINDS},
        exact_accum_factor={k: exact_factor(k) for k in GEMM_KINDS},
        casts={k: cast(k) for k in CAST_KINDS},
        decode_us=round(statistics.median(r["ms"] for r in data["casts"] if r["kind"] == "decode") * 1e3, 2),
    )
    return costs, errors


def predict(costs: TargetCosts, role: str, tokens: int, k: int, n: int, experts: int) -> float:
    """Predicted speedup of ``role`` with its casts over bf16 (``passes/cost_policy.py``'s sum)."""
    kind, dims = ROLE_KINDS[role], gemm_dims(role, tokens, k, n, experts)
    casts = sum(costs.cast_ms(c, cast_bytes(numel, BF16_BYTES), width) for c, numel, width in
                role_casts(role, tokens, k, n, experts))
    fp8 = costs.gemm_ms(kind, "fp8", *dims) + casts + 2 * costs.decode_us * 1e-3
    return costs.gemm_ms(kind, "bf16", *dims) / fp8


def check(costs: TargetCosts, data: dict) -> list[dict]:
    out = []
    for r in data.get("composed", []):
        predicted = predict(costs, r["role"], r["T"], r["K"], r["N"], r["E"])
        out.append({**r, "predicted": predicted, "error": predicted / r["speedup"] - 1})
    return out


def write_table(costs: TargetCosts, target: str, path: Path) -> None:
    """Replace ``target``'s entry between the markers in ``path`` (lowering/costs.py)."""
    text = path.read_text()
    begin, end = f"# {target} table: begin (benchmarks/fit_costs.py --write)\n", f"# {target} table: end\n"
    fields = [f"    measured={costs.measured!r},"]
    for name in ("bf16", "fp8", "exact_accum_factor", "casts"):
        fields.append(f"    {name}={{")
        fields += [f"        {kind!r}: {value!r}," for kind, value in getattr(costs, name).items()]
        fields.append("    },")
    fields.append(f"    decode_us={costs.decode_us!r},")
    entry = "\n".join([f"TABLES[{target!r}] = TargetCosts(", *fields, ")"]) + "\n"
    pattern = re.escape(begin) + ".*?" + re.escape(end)
    if not re.search(pattern, text, flags=re.S):
        raise SystemExit(f"{path} has no markers for {target}: add the lines {begin.strip()!r} and {end.strip()!r}")
    path.write_text(re.sub(pattern, lambda _: begin + entry + end, text, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("measurements")
    parser.add_argument("--target", default="sm90")
    parser.add_argument("--write", default=None, help="put the table into this file (lowering/costs.py)")
    parser.add_argument("--markdown", default=None, help="write the check's table here")
    parser.add_argument("--bar", type=float, default=0.15, help="the error the check allows")
    args = parser.parse_args()
    data = json.loads(Path(args.measurements).read_text())
    costs, errors = fit(data)
    print(repr(costs))
    for name, err in errors.items():
        print(f"fit {name}: median error {err:.1%}")
    rows = check(costs, data)
    if args.write:
        write_table(costs, args.target, Path(args.write))
    if not rows:
        print("no composed rows to check the predictions against")
        return
    lines = ["| role | T | K | N | E | bf16 ms | FP8 with casts ms | measured | predicted | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['role']} | {r['T']} | {r['K']} | {r['N']} | {r['E']} | {r['ms_bf16']:.3f} | "
              f"{r['ms_fp8_with_casts']:.3f} | {r['speedup']:.2f}x | {r['predicted']:.2f}x | {r['error']:+.0%} |"
              for r in rows]
    within = sum(abs(r["error"]) <= args.bar for r in rows)
    # what matters to the policy: the same side of 1.0 (convert or not)
    agree = sum((r["predicted"] > 1) == (r["speedup"] > 1) for r in rows)
    summary = (f"{within} of {len(rows)} predictions within {args.bar:.0%} of the measured speedup "
               f"(median error {statistics.median(abs(r['error']) for r in rows):.1%}, worst "
               f"{max(abs(r['error']) for r in rows):.0%}); the decision (faster than bf16 or not) agrees in "
               f"{agree} of {len(rows)}")
    print("\n".join(lines[:2] + [line for line, r in zip(lines[2:], rows) if abs(r["error"]) > args.bar]))
    print(summary)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines + ["", summary, ""]))


if __name__ == "__main__":
    main()
