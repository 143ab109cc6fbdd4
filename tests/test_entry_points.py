"""The three ways in: backend="mxfp8" (entry point, full Inductor on CPU), options, enabled()."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes import MXJointPass


def _moe_layer() -> tuple[torch.nn.Module, torch.Tensor]:
    model, (x,) = build(MoEConfig(layers=1))
    return model.layers[0].moe, x


def _decisions(report: mxfp8_compile.PassReport) -> list[tuple[str, str, str, bool, str]]:
    return [(e.site.role.value, e.site.layout.value, e.site.fqn, e.converted, str(e.decision)) for e in report.entries]


def test_backend_by_name_needs_no_import() -> None:
    code = (
        "import torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "fn = lookup_backend('mxfp8')\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mxfp8_compile.backend", "mxfp8_backend"]


@pytest.mark.slow
@pytest.mark.usefixtures("no_compile_caches")
def test_named_backend_with_inductor_trains_the_moe_layer() -> None:
    moe, x = _moe_layer()
    reference = torch.compile(moe, backend=mxfp8_compile.backend(inductor=False))
    x_ref = x.clone().requires_grad_()
    F.mse_loss(reference(x_ref).float(), torch.ones(1)).backward()
    aot_report = mxfp8_compile.last_report()
    torch._dynamo.reset()

    compiled = torch.compile(moe, backend="mxfp8")
    x1 = x.clone().requires_grad_()
    out = compiled(x1)
    F.mse_loss(out.float(), torch.ones(1)).backward()
    report = mxfp8_compile.last_report()
    assert report is not aot_report and report.graph == "training"
    # Inductor's joint graph gets the same decisions as the AOTAutograd-only mode.
    assert _decisions(report) == _decisions(aot_report)
    assert sum(s.fqn.endswith("experts") for s in report.converted()) == 9
    assert sqnr(moe(x), out) >= 23


@pytest.mark.usefixtures("no_compile_caches")
def test_options_map_onto_config() -> None:
    from mxfp8_compile.backend import mxfp8_backend

    moe, x = _moe_layer()
    seen = {}

    def spy(gm, example_inputs, *, options=None, mode=None):
        seen["config"] = Config.from_options(options)
        return mxfp8_backend(gm, example_inputs, options=options, mode=mode)

    with torch.no_grad():
        torch.compile(moe, backend=spy, options={"scale_mode": "floor", "gemms": ["forward"]})(x)
    assert seen["config"] == Config(scale_mode="floor", gemms=("forward",))
    assert mxfp8_compile.last_report().config == repr(seen["config"])


@pytest.mark.usefixtures("no_compile_caches")
def test_backend_takes_a_config_and_an_inductor_mode_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile refuses mode= with options=; backend(config, mode=...) carries both
    from torch._inductor import compile_fx

    seen = []
    real = compile_fx.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches))
        return real(gm, example_inputs, **kwargs)  # compiled without the mode: only the patches are checked

    monkeypatch.setattr(compile_fx, "compile_fx", spy)
    moe, x = _moe_layer()
    with torch.no_grad():
        torch.compile(moe, backend=mxfp8_compile.backend(Config(scale_mode="floor"), mode="max-autotune-no-cudagraphs"))(x)
    assert seen and seen[0]["max_autotune"] is True and "triton.cudagraphs" not in seen[0]
    assert "joint_custom_pre_pass" in seen[0]
    with pytest.raises(ValueError, match="mode='max-autotune' is Inductor's: it needs inductor=True"):
        mxfp8_compile.backend(mode="max-autotune", inductor=False)


def test_unknown_option_names_the_key_and_the_choices() -> None:
    moe, x = _moe_layer()
    with pytest.raises(Exception, match=r"unknown mxfp8 option 'scale'; allowed options: scale_mode, target"):
        torch.compile(moe, backend="mxfp8", options={"scale": "floor"})(x)


@pytest.mark.usefixtures("no_compile_caches")
def test_enabled_gives_the_backend_decisions_and_ends_with_the_block() -> None:
    moe, x = _moe_layer()
    with torch.no_grad():
        torch.compile(moe, backend="mxfp8")(x)
    by_backend = mxfp8_compile.last_report()
    torch._dynamo.reset()

    before = inductor_config.joint_custom_pre_pass
    with mxfp8_compile.enabled():
        with torch.no_grad():
            torch.compile(moe)(x)  # the first call compiles, inside the block
    assert inductor_config.joint_custom_pre_pass is before
    by_enabled = mxfp8_compile.last_report()
    assert by_enabled is not by_backend and _decisions(by_enabled) == _decisions(by_backend)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(moe)(x)  # a compilation after the block is untouched
    assert mxfp8_compile.last_report() is by_enabled


def test_enabled_nests_restores_on_error_and_keeps_a_user_pass() -> None:
    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            pass

        def uuid(self) -> str:
            return "user"

    user = UserPass()
    with inductor_config.patch(joint_custom_pre_pass=user):
        with mxfp8_compile.enabled(Config(scale_mode="floor")):
            outer = inductor_config.joint_custom_pre_pass
            assert outer.ours.config.scale_mode == "floor" and outer.user == (user,)
            with pytest.raises(RuntimeError, match="boom"):
                with mxfp8_compile.enabled(Config(scale_mode="rceil")):
                    inner = inductor_config.joint_custom_pre_pass
                    # the innermost config wins; the user's pass still runs after ours
                    assert inner.ours.config.scale_mode == "rceil" and inner.user == (user,)
                    raise RuntimeError("boom")
            assert inductor_config.joint_custom_pre_pass is outer
        assert inductor_config.joint_custom_pre_pass is user
    with mxfp8_compile.enabled():
        assert isinstance(inductor_config.joint_custom_pre_pass, MXJointPass)


def test_main_command_prints_decisions_and_sqnr(capsys: pytest.CaptureFixture[str]) -> None:
    from mxfp8_compile.__main__ import main

    assert main(["--no-inductor"]) == 0
    out = capsys.readouterr().out
    assert "    3  converted: forward 2Dx3D" in out and "    3  converted: wgrad 2Dx2D" in out
    assert "    6  skipped: KEEP_BF16" in out
    sqnr_line = next(line for line in out.splitlines() if line.startswith("SQNR against eager bf16"))
    output_db = float(sqnr_line.split("output ")[1].split(" dB")[0])
    assert output_db >= 23


def test_enabled_keeps_a_list_of_user_passes() -> None:
    # torch 2.13 takes a list per hook; every user pass keeps running, after ours, and hashing.
    calls = []

    class Counting(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, graph: torch.fx.Graph) -> None:
            calls.append(self.name)

        def uuid(self) -> str:
            return self.name

    with inductor_config.patch(joint_custom_pre_pass=[Counting("a"), Counting("b")]):
        with mxfp8_compile.enabled():
            hook = inductor_config.joint_custom_pre_pass
            hook(torch.fx.Graph())
            assert calls == ["a", "b"] and hook.uuid()[1:] == ("a", "b")


def test_enabled_warns_when_the_compile_inside_skips_inductor() -> None:
    from torch._inductor import compile_fx

    moe, x = _moe_layer()
    original = compile_fx.compile_fx
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"compiled graphs in this block without Inductor .* backend='mxfp8'"):
        with mxfp8_compile.enabled(), torch.no_grad():
            torch.compile(moe, backend="aot_eager")(x)
    assert compile_fx.compile_fx is original  # Inductor's entry restored
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # through Inductor: nothing to say
        with mxfp8_compile.enabled(), torch.no_grad():
            torch.compile(moe)(x)
