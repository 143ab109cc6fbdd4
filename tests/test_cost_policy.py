"""The cost policy (``passes/cost_policy.py``): which GEMMs a target's cost model keeps in bf16,
what the report says, and that its casts are the ones the rewrite emits.

Graphs are planned at real sizes on the meta device (the passes need shapes, not values), for
the sm90 target (the capability check reports an SM90 device), with a made-up table whose
verdicts are easy to tell, and once with the measured sm90 table."""

from __future__ import annotations

import collections
import re

import pytest
import torch

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.examples.moe import MoEConfig, MoEModel
from mxfp8_compile.lowering import costs, targets
from mxfp8_compile.passes import cost_policy
from mxfp8_compile.passes.find_gemms import apply_target_rules, find_gemms
from mxfp8_compile.passes.report import SkipReason
from mxfp8_compile.passes.rewrite_gemms import shared_cast_keys, shared_gather

BF16 = torch.bfloat16
# dense GEMMs lose in FP8 (a slower GEMM), grouped ones win (twice as fast, casts at 8 TB/s)
MADE_UP = costs.TargetCosts(
    measured="made up for the tests",
    bf16={kind: costs.GemmFit(500.0, (64.0, 64.0, 64.0), 5.0) for kind in costs.GEMM_KINDS},
    fp8={"grouped": costs.GemmFit(1000.0, (64.0, 64.0, 64.0), 5.0),
         "grouped_wgrad": costs.GemmFit(1000.0, (64.0, 64.0, 64.0), 5.0),
         "dense": costs.GemmFit(400.0, (64.0, 64.0, 64.0), 5.0),
         "dense_wgrad": costs.GemmFit(400.0, (64.0, 64.0, 64.0), 5.0)},
    exact_accum_factor={kind: 1.2 for kind in costs.GEMM_KINDS},
    casts={kind: costs.CastFit(8.0, 1.0, 3.0) for kind in costs.CAST_KINDS},
    decode_us=2.0,
)
PRESET = MoEConfig(dim=768, heads=12, layers=1, experts=8, top_k=2, expert_hidden=1536, shared_hidden=0)


@pytest.fixture
def sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "device_capability", lambda device: targets.SM90)


@pytest.fixture
def made_up_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(costs.TABLES, "sm90", MADE_UP)


def _plan(cfg: MoEConfig, config: Config, tokens: int = 8192, dynamic: bool | None = None,
          graphs: dict | None = None) -> mxfp8_compile.PassReport:
    """The training graph's report for the example model at ``tokens`` tokens, on the meta device."""
    with torch.device("meta"):
        model = MoEModel(cfg).to(BF16)
        x = torch.randn(tokens // 1024, 1024, cfg.dim, dtype=BF16, requires_grad=True)
    sink = graphs.__setitem__ if graphs is not None else None
    compiled = torch.compile(model, dynamic=dynamic,
                             backend=mxfp8_compile.backend(config, inductor=False, on_graph=sink))
    compiled(x).sum().backward()
    return mxfp8_compile.last_report()


def _ratio(text: str) -> float:
    return float(re.search(r"predicted (\d+\.\d+)x", text).group(1))


@pytest.mark.usefixtures("sm90", "made_up_table")
def test_gemms_predicted_slower_stay_bf16_with_their_ratio() -> None:
    report = _plan(PRESET, Config(target="sm90"))
    kept = [(s, d) for s, d in report.skipped() if d.reason is SkipReason.NOT_FASTER]
    converted = [e for e in report.entries if e.converted]
    # the made-up table: every dense GEMM loses (slower FP8 GEMM), every expert GEMM wins
    assert {s.layout.value for s, _ in kept} == {"dense"} and len(kept) == 12  # q, k, v, o: 3 roles each
    assert {e.site.layout.value for e in converted} == {"2Dx3D", "2Dx2D"} and len(converted) == 9
    for site, decision in kept:
        assert _ratio(str(decision)) <= 1.0, site
        assert re.search(r"bf16 \d+\.\d+ ms, FP8 \d+\.\d+ ms \+ casts \d+\.\d+ ms", str(decision))
    for e in converted:
        assert _ratio(e.decision.note) > 1.0
    assert "NOT_FASTER" in str(report.counts()) and "predicted" in report.to_text()


@pytest.mark.usefixtures("sm90", "made_up_table")
def test_the_policy_is_off_by_config_and_for_targets_without_a_table() -> None:
    off = _plan(PRESET, Config(target="sm90", cost_model=False))
    assert len(off.converted()) == 21 and not any("predicted" in str(e.decision) for e in off.entries)
    emulated = _plan(PRESET, Config(target="emulated"))
    assert [e.converted for e in emulated.entries] == [e.converted for e in off.entries]
    assert costs.target_costs("emulated") is None and costs.target_costs("sm100") is None


def _joint_graph(cfg: MoEConfig, tokens: int) -> torch.fx.Graph:
    """The training graph before any rewrite (no GEMM role enabled), on the meta device."""
    graphs: dict[str, torch.fx.GraphModule] = {}
    _plan(cfg, Config(target="sm90", gemms=()), tokens, graphs=graphs)
    return graphs["joint"].graph


@pytest.mark.usefixtures("sm90")
def test_a_shared_cast_is_paid_once() -> None:
    graph = _joint_graph(PRESET, 8192)
    matches = apply_target_rules(find_gemms(graph, Config(target="sm90")), "sm90")
    converted = [m for m in matches if m.decision]
    casts = {i: cost_policy._casts(m, MADE_UP) for i, m in enumerate(converted)}
    plans = {i: (cost_policy._gemm_times(m, Config(), MADE_UP), casts[i]) for i, m in enumerate(converted)}
    predictions = cost_policy._predict(plans, set(plans))
    distinct = {c.identity: c.ms for cs in casts.values() for c in cs}
    # the MoE's x along K (gate and up projections) and along tokens (their wgrads); the
    # attention's x along K (q, k, v) and along tokens (their wgrads): each cast once, its time split
    readers = collections.Counter(c.identity for cs in casts.values() for c in cs)
    assert sorted(n for n in readers.values() if n > 1) == [2, 2, 3, 3]
    assert sum(p.casts for p in predictions.values()) == pytest.approx(sum(distinct.values()))
    # a GEMM alone pays its casts in full: dropping the others raises its share
    first = next(i for i, cs in casts.items() if any(readers[c.identity] == 3 for c in cs))
    alone = cost_policy._predict(plans, {first})[first]
    assert alone.casts > predictions[first].casts


@pytest.mark.usefixtures("sm90")
def test_the_model_counts_the_casts_the_rewrite_emits() -> None:
    graphs: dict[str, torch.fx.GraphModule] = {}
    report = _plan(PRESET, Config(target="sm90", cost_model=False), graphs=graphs)
    rewritten = collections.Counter(n.target for n in graphs["joint"].graph.nodes)
    emitted = rewritten[torch.ops.mxfp8.quantize_rebase.default] + \
        rewritten[torch.ops.mxfp8.quantize_rebase_token_groups.default] + \
        rewritten[torch.ops.mxfp8.quantize_rebase_gathered.default] + \
        rewritten[torch.ops.mxfp8.quantize_rebase_token_groups_gathered.default]
    graph = _joint_graph(PRESET, 8192)
    matches = apply_target_rules(find_gemms(graph, Config(target="sm90")), "sm90")
    identities = {c.identity for m in matches if m.decision for c in cost_policy._casts(m, MADE_UP)
                  if c.identity[-1] != "decode"}
    assert len(report.converted()) == 21 and emitted == len(identities) == 36


@pytest.mark.usefixtures("sm90", "made_up_table")
def test_symbolic_token_counts_are_predicted_at_their_hints() -> None:
    static = _plan(PRESET, Config(target="sm90"), tokens=4096)
    dynamic = _plan(PRESET, Config(target="sm90"), tokens=4096, dynamic=True)
    assert [e.converted for e in dynamic.entries] == [e.converted for e in static.entries]
    for s, d in zip(static.entries, dynamic.entries):
        if "predicted" not in str(s.decision):  # router, lm_head: kept by their role
            assert str(d.decision) == str(s.decision)
        elif d.site.layout.value == "dense":
            # a dense wgrad's contraction over symbolic tokens is padded to a multiple of 32 (a copy)
            assert _ratio(str(d.decision)) <= _ratio(str(s.decision)), d.site.label
        else:  # expert GEMMs contract over K or each group's tokens: nothing padded
            assert _ratio(str(d.decision)) == _ratio(str(s.decision)), d.site.label


@pytest.mark.usefixtures("sm90")
def test_the_measured_sm90_table_keeps_small_widths_and_converts_real_ones() -> None:
    table = costs.target_costs("sm90")
    assert table is not None and re.search(r"H[12]00.*torch \d+\.\d+.*\d{4}-\d\d-\d\d", table.measured)
    # the training benchmark's small preset (dim 768, experts of width 1536, 8192 tokens): the
    # casts cost more than FP8 saves in every GEMM, so the step stays bf16
    small = _plan(PRESET, Config(target="sm90"))
    assert not small.converted() and {d.reason for _, d in small.skipped()} >= {SkipReason.NOT_FASTER}
    # Llama4-Scout's widths (dim 5120, 16 experts of width 8192, top-1, 16384 tokens): the dense
    # projections and the expert forward and wgrad pay
    scout = MoEConfig(dim=5120, heads=40, layers=1, experts=16, top_k=1, expert_hidden=8192, shared_hidden=8192)
    report = _plan(scout, Config(target="sm90"), tokens=16384)
    entries = [e for e in report.entries if e.converted]
    converted = collections.Counter((e.site.layout.value, e.site.role.value) for e in entries)
    assert converted[("dense", "forward")] == 7 and converted[("dense", "wgrad")] == 7  # q k v o, 3 shared
    assert converted[("2Dx3D", "forward")] >= 1 and converted[("2Dx2D", "wgrad")] >= 1
    assert all(_ratio(e.decision.note) > 1.0 for e in entries)


@pytest.mark.usefixtures("sm90")
def test_a_permutation_cast_through_spares_its_copy_while_all_its_readers_convert() -> None:
    graph = _joint_graph(PRESET, 8192)
    matches = apply_target_rules(find_gemms(graph, Config(target="sm90")), "sm90")
    permutations = cost_policy._permutations(matches, MADE_UP)
    roles = sorted(sorted(matches[i].site.role.value for i in p.readers) for p in permutations)
    # x[perm]: the gate and up projections and their wgrads; the down projection's dy (the
    # combine's gradient gathered): its dgrad and wgrad. One per expert block.
    assert roles == [["dgrad", "wgrad"], ["forward", "forward", "wgrad", "wgrad"]]
    x_perm = next(p for p in permutations if len(p.readers) == 4)
    plans = {i: (cost_policy._gemm_times(matches[i], Config(), MADE_UP), cost_policy._casts(matches[i], MADE_UP))
             for i in x_perm.readers}
    every = cost_policy._predict(plans, set(plans), permutations)
    assert all(every[i].spared == pytest.approx(x_perm.ms / 4) for i in x_perm.readers)
    assert x_perm.ms > 0 and "permuted copy spared" in every[min(plans)].describe()
    # one reader kept in bf16 reads the copy, so it is written: no reader is spared it
    assert all(p.spared == 0 for p in cost_policy._predict(plans, set(sorted(plans)[1:]), permutations).values())


@pytest.mark.usefixtures("sm90")
def test_a_permutation_that_something_else_reads_spares_nothing() -> None:
    # HF GPT-OSS: each layer's permuted dy is cast through its permutation, but an index_put
    # outside the GEMMs reads it too, so the copy is written whatever the GEMMs do; only x's
    # permutation (read by the GEMMs alone) counts
    pytest.importorskip("transformers")
    from mxfp8_compile.examples.clients import hf_example

    model, inputs = hf_example("gpt_oss")
    graphs: dict[str, torch.fx.GraphModule] = {}
    backend = mxfp8_compile.backend(Config(target="sm90", gemms=()), inductor=False, on_graph=graphs.__setitem__)
    torch.compile(model, backend=backend)(*inputs).float().sum().backward()
    matches = apply_target_rules(find_gemms(graphs["joint"].graph, Config(target="sm90")), "sm90")
    gathered = [key for key in shared_cast_keys([m for m in matches if m.decision]) if shared_gather(key)]
    permutations = cost_policy._permutations(matches, MADE_UP)
    assert len(gathered) == 4 and len(permutations) == 2
    for p in permutations:
        assert sorted(matches[i].site.role.value for i in p.readers) == ["forward", "wgrad"]


@pytest.mark.usefixtures("sm90")
def test_the_copy_a_kept_reader_would_write_converts_deepseek_v3s_down_wgrad() -> None:
    # DeepSeek-V3's widths at 32768 tokens: the down projection's wgrad alone is predicted 0.96x
    # (the measured table). Keeping it in bf16 also keeps the permuted dy it reads, and converting
    # it measured 1-2% faster and 7-18% lighter in step peak memory (benchmarks/RESULTS.md,
    # 2026-12-07). With the gathered casts that copy counts: every expert GEMM converts.
    dsv3 = MoEConfig(dim=7168, heads=56, layers=1, experts=8, top_k=1, expert_hidden=2048, shared_hidden=0)

    def expert_gemms(config: Config) -> list[tuple[bool, str]]:
        report = _plan(dsv3, config, tokens=32768)
        return [(e.converted, e.decision.note if e.converted else str(e.decision)) for e in report.entries
                if e.site.layout.value in ("2Dx3D", "2Dx2D")]

    on = expert_gemms(Config(target="sm90"))
    assert len(on) == 9 and all(converted and _ratio(text) > 1.0 for converted, text in on)
    kept = [text for converted, text in expert_gemms(Config(target="sm90", gathered_casts=False)) if not converted]
    assert len(kept) == 1 and _ratio(kept[0]) < 1.0 and "spared" not in kept[0]
