"""On an SM90 GPU (marked gpu; skipped without CUDA): the sm90 target for real."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import mxfp8_compile
from mx_cases import CASES
from mxfp8_compile import Config, numerics, ops
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.lowering import targets
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes import report as _report

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16
# These models are small: the cost model would keep their GEMMs in bf16. The tests check the
# FP8 path itself, so every GEMM is converted; the policy has its own tests (test_cost_policy).
EVERY_GEMM = {"cost_model": False}


def test_auto_target_is_sm90_on_hopper() -> None:
    device = torch.device("cuda")
    if targets.device_capability(device) != targets.SM90:
        pytest.skip(f"not an SM90 GPU: capability {targets.device_capability(device)}")
    assert targets.select_target(Config(), device) == "sm90"


@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_reference_numerics_are_the_same_bits_on_cuda(mode: str) -> None:
    blocks = torch.cat([c.tensor().float() for c in CASES])
    g = torch.Generator().manual_seed(0)
    random = torch.randn(333, 256, generator=g) * torch.exp2(torch.randint(-60, 60, (333, 1), generator=g).float())
    for x in (blocks, random, random.bfloat16()):
        q_cpu, s_cpu = numerics.to_mx(x, mode=mode)
        q_gpu, s_gpu = numerics.to_mx(x.cuda(), mode=mode)
        assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)) and torch.equal(s_gpu.cpu(), s_cpu)
    offs = torch.tensor([0, 1, 33, 200, 333], dtype=torch.int32)
    cpu = numerics.to_mx_token_groups(random.bfloat16(), offs, mode=mode)
    gpu = numerics.to_mx_token_groups(random.bfloat16().cuda(), offs.cuda(), mode=mode)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           (b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b).cpu())


@pytest.mark.parametrize("fast_accum,bar", [(False, 50), (True, 35)])
def test_rowwise_gemms_on_cuda_match_their_emulation(fast_accum: bool, bar: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=g).to(BF16)
    w = (torch.randn(8, 512, 1024, generator=g) / 32).to(BF16)
    dy = torch.randn(4096, 512, generator=g).to(BF16)
    offs = torch.tensor([0, 300, 1000, 1000, 2600, 3000, 4000, 4096], dtype=torch.int32)
    q, s = ops.quantize(x)
    qbt, sbt = ops.quantize(w)
    ra, rsa = ops.rebase_rowwise(q, s, -1)
    rbt, rsb = ops.rebase_rowwise(qbt, sbt, -1)
    qd, sd, po = ops.quantize_token_groups(dy, offs)
    qx, sx, _ = ops.quantize_token_groups(x, offs)
    rd, rsd = ops.rebase_token_groups(qd, sd, po)
    rx, rsx = ops.rebase_token_groups(qx, sx, po)
    rsa, rsb, rsd, rsx = (numerics.e8m0_to_fp32(r) for r in (rsa, rsb, rsd, rsx))
    calls = [
        (ops.scaled_grouped_mm_rowwise, (ra, rsa, rbt.mT, rsb, offs, BF16, fast_accum)),
        (ops.scaled_grouped_mm_rowwise, (rd.t(), rsd, rx, rsx, po, BF16, fast_accum)),
        (ops.scaled_mm_rowwise, (ra, rsa, rbt[0].t(), rsb[0], BF16, fast_accum)),
    ]
    for op, args in calls:
        emulated = op(*args)
        on_gpu = op(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        assert sqnr(emulated, on_gpu.cpu()) >= bar, op


@pytest.mark.parametrize("outlier", [1, 100, 1000, 10000])
def test_rebase_sqnr_on_outlier_activations(outlier: float) -> None:
    # DESIGN section 6: a few channels of x 100-10000x larger than the rest; target >= 40 dB
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 4096, device="cuda", generator=g)
    b = torch.randn(4096, 1024, device="cuda", generator=g)
    channels = torch.randperm(4096, device="cuda", generator=g)[:16]
    a[:, channels] *= outlier
    value = numerics.rebase_gemm_sqnr(a, b)
    print(f"rebase SQNR vs exact MX, {outlier}x outliers: {value:.1f} dB")
    assert value >= 40


@pytest.mark.usefixtures("no_compile_caches")  # a cache hit skips the pass and its report
@pytest.mark.parametrize("weight_blocks", ["1x32", "32x32"])
def test_moe_model_with_inductor_on_sm90(weight_blocks: str) -> None:
    torch.manual_seed(0)
    model, (x,) = build(MoEConfig(layers=1, dim=1024, expert_hidden=1024, shared_hidden=1024), seq=512)
    model, x = model.cuda(), x.cuda()
    reference = copy.deepcopy(model)
    target = torch.randn(x.shape[:-1] + (256,), device="cuda")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    # torchao's scope (experts converted): the routers see the same bf16 inputs in both runs,
    # so no top-k choice flips and the comparison measures the GEMMs.
    options = {"include_fqns": ["experts"], "cost_model": False, "weight_blocks": weight_blocks}
    out = torch.compile(model, backend="mxfp8", options=options)(x1)
    F.mse_loss(out.float(), target).backward()
    report = mxfp8_compile.last_report()
    assert report.target == "sm90" and sum(s.fqn.endswith("experts") for s in report.converted()) == 9
    ref = torch.compile(reference)(x2)
    F.mse_loss(ref.float(), target).backward()
    worst = min((sqnr(p.grad, q.grad), name) for (name, p), q in zip(reference.named_parameters(), model.parameters()))
    print(f"sm90 {weight_blocks} weights vs torch.compile bf16: output {sqnr(ref, out):.1f} dB, input grad "
          f"{sqnr(x2.grad, x1.grad):.1f} dB, worst weight grad {worst}")
    assert sqnr(ref, out) >= 23 and sqnr(x2.grad, x1.grad) >= 29 and worst[0] >= 21, worst


GATHERED_OPS = ("mxfp8::quantize_rebase_gathered", "mxfp8::quantize_rebase_token_groups_gathered")


@pytest.mark.usefixtures("no_compile_caches")  # a cache hit would not show the ops it calls
def test_hf_unsort_backward_is_cast_through_the_permutation_on_sm90() -> None:
    # HF 5.x's experts: x[perm] in the forward, and in the backward the unsort's index_put by
    # the inverse permutation, both cast through the permutation (4 casts in each of 2 layers).
    # CPU: test_sm90.py compares the bits with the permuted copy under AOTAutograd. Through
    # Inductor the two graphs fuse the kernels around the removed copy differently, and any
    # bf16 rounding that moves before an MX cast moves its e4m3 bytes (CPU, emulated: the two
    # differ at 26-29 dB, as Inductor and AOTAutograd do). So here: the gathered ops run, and
    # each tensor is as close to bf16 with them as with the copy (CPU: the same to 0.1 dB).
    pytest.importorskip("transformers")
    from mxfp8_compile.examples.clients import hf_example

    torch.manual_seed(0)
    model, (x,) = hf_example("qwen3_moe", tokens=256)
    model, x = model.cuda(), x.cuda()

    def step(compiled: torch.nn.Module, module: torch.nn.Module) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = compiled(xg)
        out.float().pow(2).mean().backward()
        return [out, xg.grad, *(p.grad for p in module.parameters() if p.grad is not None)]

    reference = copy.deepcopy(model)
    bf16 = step(torch.compile(reference), reference)
    calls, closeness = [], []
    for gathered in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="mxfp8", options={**EVERY_GEMM, "gathered_casts": gathered})
        step(compiled, model)  # compiles the forward and the backward
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = step(compiled, model)
            torch.cuda.synchronize()
        calls.append(sum(e.name in GATHERED_OPS for e in prof.events()))
        closeness.append([sqnr(a.float(), b.float()) for a, b in zip(bf16, result, strict=True)])
    on, off = closeness
    print(f"HF qwen3_moe against bf16, gathered casts / permuted copy: output {on[0]:.1f} / {off[0]:.1f} dB, "
          f"input grad {on[1]:.1f} / {off[1]:.1f} dB, worst {min(on):.1f} / {min(off):.1f} dB")
    assert calls == [8, 0]
    assert len(on) > 10 and on[0] >= 20 and on[1] >= 18
    assert all(abs(a - b) <= 1.0 for a, b in zip(on, off)), (on, off)


def test_quantize_rebase_kernel_is_bit_exact() -> None:
    from kernel_cases import mismatches

    assert mismatches("cuda", large=True) == []


def test_cast_ops_run_their_triton_kernels() -> None:
    x = torch.randn(256, 512, device="cuda", dtype=BF16)
    offs = torch.tensor([100, 256], device="cuda", dtype=torch.int32)
    tiles = ops.square_tile_scales(x)
    rows, weights = torch.randperm(256, device="cuda"), torch.rand(256, device="cuda", dtype=BF16)
    for call, expected in (
        (lambda: ops.quantize_rebase(x), ["_quantize_rebase_rows_kernel"]),
        (lambda: ops.quantize_rebase(x.t()), ["_column_amax_kernel", "_quantize_rebase_columns_kernel"]),
        (lambda: ops.quantize_rebase_token_groups(x, offs), ["_column_amax_kernel", "_quantize_rebase_columns_kernel"]),
        (lambda: ops.square_tile_scales(x), ["_square_tile_scales_kernel"]),
        (lambda: ops.quantize_rebase_square(x.t(), tiles.t()), ["_quantize_rebase_square_kernel"]),
        (lambda: ops.quantize_rows_and_token_groups(x, offs), ["_mx_rows_and_token_groups_kernel"]),
        (lambda: ops.quantize(x), ["_mx_rows_and_token_groups_kernel"]),
        (lambda: ops.quantize_token_groups(x, offs), ["_mx_rows_and_token_groups_kernel"]),
        (lambda: ops.quantize_token_groups_transposed(x, offs), ["_mx_rows_and_token_groups_kernel"]),
        (lambda: ops.quantize_rebase_gathered(x, rows, weights), ["_quantize_rebase_rows_kernel"]),
        (lambda: ops.quantize_rebase_token_groups_gathered(x, rows, weights, offs),
         ["_column_amax_kernel", "_quantize_rebase_columns_kernel"]),
        (lambda: ops.quantize_rows_and_token_groups_gathered(x, rows, None, offs), ["_mx_rows_and_token_groups_kernel"]),
    ):
        call()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        # besides the Triton kernels only setup: the zero fill of the amax buffer, the offsets of a
        # transposed view's row groups (an arange); no copies, no aten math
        setup = [k for k in kernels if "FillFunctor" in k or "arange_cuda_out" in k]
        assert [k for k in kernels if k not in setup] == expected and len(setup) <= 2, kernels


@pytest.mark.usefixtures("no_compile_caches")
def test_silu_mul_fuses_into_the_cast_kernel() -> None:
    # the plugin's Inductor lowering (registered when the plugin is used): the producer of the
    # down projection's input becomes the prologue of the cast template, one kernel in all
    import mxfp8_compile.lowering.inductor_quantize  # noqa: F401
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator(device="cuda").manual_seed(0)
    h1, h3 = (torch.randn(4096, 2048, device="cuda", dtype=BF16, generator=g) for _ in range(2))
    (q, s), code = run_and_get_code(torch.compile(lambda a, b: ops.quantize_rebase(F.silu(a) * b)), h1, h3)
    code = "\n".join(code)
    kernels = re.findall(r"def (triton_\w+)\(", code)
    assert len(kernels) == 1 and "tem" in kernels[0] and "silu" in kernels[0], kernels
    assert "ops.mxfp8.quantize_rebase.default(" not in code  # no fallback call to the custom op
    h = torch.compile(lambda a, b: F.silu(a) * b)(h1, h3)  # Inductor's own rounding of h
    rq, rs = ops.quantize_rebase(h)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.usefixtures("no_compile_caches")
@pytest.mark.parametrize("producer", ["rms_norm", "graph input"])
def test_cast_template_reads_a_2d_view_of_a_3d_activation(producer: str) -> None:
    # a dense linear's input: (B, S, K) reshaped to (B*S, K), an Inductor View that the template
    # must read through a layout (this once failed to lower in a training run)
    import mxfp8_compile.lowering.inductor_quantize  # noqa: F401
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator(device="cuda").manual_seed(0)
    x, w = torch.randn(4, 512, 768, device="cuda", dtype=BF16, generator=g), torch.rand(768, device="cuda", dtype=BF16)
    if producer == "rms_norm":
        def before(a: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(a, (768,), w)
    else:
        def before(a: torch.Tensor) -> torch.Tensor:
            return a
    (q, s), code = run_and_get_code(torch.compile(lambda a: ops.quantize_rebase(before(a).reshape(-1, 768))), x)
    assert "ops.mxfp8.quantize_rebase.default(" not in "\n".join(code)  # the template, not the fallback
    rq, rs = ops.quantize_rebase(torch.compile(before)(x).reshape(-1, 768))
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.usefixtures("no_compile_caches")
def test_cast_of_a_transposed_view_is_left_to_the_column_kernel() -> None:
    # a dense wgrad's operand, dy^T: the lowering hands it to the custom op, whose column kernel
    # reads it coalesced; the row template read it strided (2.2 ms of train_moe's step against
    # 1.2 ms more in the column kernels)
    import mxfp8_compile.lowering.inductor_quantize  # noqa: F401
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(4096, 768, device="cuda", dtype=BF16, generator=torch.Generator(device="cuda").manual_seed(0))
    (q, s), code = run_and_get_code(torch.compile(lambda a: ops.quantize_rebase((2 * a).t())), x)
    code = "\n".join(code)
    assert "ops.mxfp8.quantize_rebase.default(" in code and not re.findall(r"def (triton_tem\w+)\(", code)
    rq, rs = ops.quantize_rebase((2 * x).t())
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.usefixtures("no_compile_caches")
def test_max_autotune_keeps_every_expert_gemm_converted() -> None:
    # Inductor autotunes the GEMMs left in bf16 (router, attention) and every generated kernel;
    # the plugin's ops and cast templates must come through it. Small, since autotuning is slow.
    torch.manual_seed(0)
    model, (x,) = build(MoEConfig(layers=1, dim=256, heads=2, expert_hidden=256, shared_hidden=256), seq=256)
    model, x = model.cuda(), x.cuda()
    reference = copy.deepcopy(model)
    config = Config(include_fqns=["experts"], cost_model=False)
    out = torch.compile(model, backend=mxfp8_compile.backend(config, mode="max-autotune-no-cudagraphs"))(x)
    out.float().square().mean().backward()
    report = mxfp8_compile.last_report()
    assert report.target == "sm90" and sum(s.fqn.endswith("experts") for s in report.converted()) == 9
    ref = torch.compile(reference)(x)
    ref.float().square().mean().backward()
    print(f"max-autotune sm90 vs torch.compile bf16: output {sqnr(ref, out):.1f} dB, expert weight grads "
          f"{[round(sqnr(p.grad, q.grad), 1) for p, q in zip(reference.parameters(), model.parameters())]}")
    assert sqnr(ref, out) >= 23


@pytest.mark.usefixtures("no_compile_caches")
@pytest.mark.parametrize("width", [200, 264])
def test_odd_expert_widths_run_and_name_the_rule(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Expert and shared-expert widths that are multiples of 8, not of 16: what torch's FP8 GEMMs
    # refuse stays bf16 with the rule named, the rest converts, and a training step runs.
    model, (x,) = build(MoEConfig(layers=1, dim=256, expert_hidden=width, shared_hidden=width), seq=256)
    model, x = model.cuda(), x.cuda().requires_grad_()
    out = torch.compile(model, backend="mxfp8", options=EVERY_GEMM)(x)
    F.mse_loss(out.float(), torch.ones_like(out, dtype=torch.float32)).backward()
    torch.cuda.synchronize()
    report = mxfp8_compile.last_report()
    kept = [str(d) for _, d in report.skipped() if d.reason.name == "TARGET_RULE"]
    print(f"width {width}: {len(report.converted())} converted, {len(kept)} kept by the rule: {kept[0]}")
    assert report.target == "sm90" and len(kept) == 8 and all(f"N={width}" in k for k in kept)
    # the gate and up wgrads; with the contraction (the width) zero-padded, the down projection's
    # forward and the gate and up dgrads
    assert sum(s.fqn.endswith("experts") for s in report.converted()) == 5
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert sqnr(model(x), out) >= 23  # test_compile_moe's output bar
    # Without the rule, torch refuses the GEMM at run time: the rule is what keeps this model running.
    monkeypatch.setattr(targets, "broken_rule", lambda *args: None)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"divisible by 16"):
        torch.compile(model, backend=mxfp8_compile.backend(Config(cost_model=False), inductor=False))(x)
        torch.cuda.synchronize()


@pytest.mark.usefixtures("no_compile_caches")
def test_dynamic_token_counts_pad_and_convert_on_sm90() -> None:
    # dynamic=True: the dense wgrads contract over a symbolic token count, zero-padded to a
    # multiple of 32 on the device. The same GEMMs convert as in the static compile, and a
    # token count that is not a multiple of 32 runs through the same graph.
    model, (x,) = build(MoEConfig(layers=1, dim=256, expert_hidden=256, shared_hidden=256), seq=128)
    model, x = model.cuda(), x.cuda()

    def step(x: torch.Tensor, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor, set]:
        torch._dynamo.reset()
        x = x.clone().requires_grad_()
        mark = _report.recorded()
        out = torch.compile(model, backend="mxfp8", dynamic=dynamic, options=EVERY_GEMM)(x)
        out.float().pow(2).mean().backward()
        converted = {(s.role.value, s.fqn) for r in _report.reports_since(mark) for s in r.converted()}
        return out.detach(), x.grad, converted

    static_out, static_grad, static = step(x, dynamic=False)
    dynamic_out, dynamic_grad, dynamic = step(x, dynamic=True)
    padded = [str(e.decision) for r in mxfp8_compile.reports()[-2:] for e in r.entries if "zero-padded" in str(e.decision)]
    print(f"dynamic vs static: output {sqnr(static_out, dynamic_out):.1f} dB, input grad "
          f"{sqnr(static_grad, dynamic_grad):.1f} dB; {len(dynamic)} converted, {len(padded)} padded")
    assert dynamic == static and {role for role, _ in static} == {"forward", "dgrad", "wgrad"} and padded
    assert sqnr(static_out, dynamic_out) >= 30 and sqnr(static_grad, dynamic_grad) >= 25
    odd = x[:, :100].clone().requires_grad_()  # 200 tokens: padded by 24 rows on the device
    out = torch.compile(model, backend="mxfp8", dynamic=True, options=EVERY_GEMM)(odd)
    out.float().pow(2).mean().backward()
    with torch.no_grad():
        assert sqnr(model(odd), out) >= 23 and torch.isfinite(odd.grad).all()


@pytest.mark.usefixtures("no_compile_caches")
def test_bmm_experts_convert_through_inductor_on_sm90() -> None:
    from test_batched import BmmExperts, E, T, DIM

    torch.manual_seed(0)
    model = BmmExperts().to(BF16).cuda()
    x = torch.randn(E * T, DIM, device="cuda", dtype=BF16)
    x_ref, x_mx = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = model(x_ref)
    ref.float().pow(2).mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, backend="mxfp8", options={"dense_linears": False, "cost_model": False})(x_mx)
    out.float().pow(2).mean().backward()
    report = mxfp8_compile.last_report()
    db = {"output": sqnr(ref, out), "input grad": sqnr(x_ref.grad, x_mx.grad),
          **{n: sqnr(r, p.grad) for (n, p), r in zip(model.named_parameters(), ref_grads) if "proj" in n}}
    print(f"bmm experts on sm90 through Inductor: {sum(e.converted for e in report.entries)} converted; "
          + ", ".join(f"{k} {v:.1f} dB" for k, v in db.items()))
    assert report.target == "sm90" and sum(e.converted for e in report.entries if e.site.layout.name == "BATCHED") == 6
    assert db["output"] >= 23 and db["input grad"] >= 21 and db["gate_up_proj"] >= 21 and db["down_proj"] >= 21, db


def test_selftest_passes_on_this_gpu(capsys: pytest.CaptureFixture) -> None:
    assert mxfp8_compile.selftest(), capsys.readouterr().out
