"""The example model's rotary position embedding: its contract, and that the plugin converts the
model with it exactly as without it (the rotation adds no GEMM); configurations it cannot build
are refused up front."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mxfp8_compile
from mxfp8_compile.examples.moe import MoEConfig, build, rotary


def test_rotary_leaves_position_zero_and_every_pair_norm_unchanged() -> None:
    x = torch.randn(2, 3, 16, 8)
    out = rotary(x, 10_000.0)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731 -- channel i pairs with i + D/2
    torch.testing.assert_close(pair_norm(out), pair_norm(x))
    assert not torch.allclose(out[:, :, 1:], x[:, :, 1:])


def test_rotary_scores_depend_on_the_distance_alone() -> None:
    # One query and one key vector at every position: q_p . k_p' must be a function of p - p'.
    q, k = torch.randn(8, dtype=torch.float32), torch.randn(8, dtype=torch.float32)
    seq = 12
    rq = rotary(q.expand(1, 1, seq, 8), 500.0)[0, 0]
    rk = rotary(k.expand(1, 1, seq, 8), 500.0)[0, 0]
    scores = rq @ rk.T
    for distance in range(-3, 4):
        diagonal = torch.diagonal(scores, offset=-distance)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal))
    assert not torch.allclose(torch.diagonal(scores, 0)[:1], torch.diagonal(scores, -1)[:1])


def test_rotary_keeps_bf16_and_the_plugin_converts_the_same_gemms() -> None:
    decisions = {}
    for theta in (0.0, 10_000.0):
        model, (x,) = build(MoEConfig(layers=1, rope_theta=theta))
        compiled = torch.compile(model, backend=mxfp8_compile.backend(inductor=False))
        out = compiled(x.requires_grad_())
        assert out.dtype == torch.bfloat16
        F.mse_loss(out.float(), torch.ones_like(out, dtype=torch.float32)).backward()
        report = mxfp8_compile.last_report()
        decisions[theta] = sorted((e.site.fqn, e.site.role, e.converted) for e in report.entries)
        reference = model(x.detach())
        torch.testing.assert_close(out.detach().float(), reference.float(), atol=0.1, rtol=0.1)
    assert decisions[0.0] == decisions[10_000.0]
    assert sum(converted for *_, converted in decisions[0.0]) > 0


@pytest.mark.parametrize(("fields", "message"), [
    (dict(dim=128, heads=3), "dim 128 does not split into 3 heads"),
    (dict(dim=12, heads=4, rope_theta=1e4), "head dim 3: the rotary embedding needs .* an even head dim"),
    (dict(rope_theta=-1.0), "rope_theta -1.0 .* needs a positive base"),
])
def test_configurations_the_model_cannot_build_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)
    assert MoEConfig(dim=12, heads=4).dim == 12  # an odd head dim is fine without the rotation
