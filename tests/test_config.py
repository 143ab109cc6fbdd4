"""Config: validated at construction, errors name the key and the allowed values."""

from __future__ import annotations

import dataclasses

import pytest

from mxfp8_compile import Config


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"scale_mode": "even"}, ValueError, r"Config.scale_mode: 'even' is not allowed; allowed values: 'rceil', 'floor'"),
        ({"target": "sm80"}, ValueError, r"Config.target: 'sm80' is not allowed; allowed values: 'auto', 'sm100', 'sm90', 'emulated'"),
        ({"gemms": ("fwd",)}, ValueError, r"Config.gemms: 'fwd' is not allowed; allowed values: 'forward', 'dgrad', 'wgrad'"),
        ({"operand_dtypes": ("float64",)}, ValueError, r"Config.operand_dtypes: 'float64' is not allowed"),
        ({"include_fqns": "experts"}, TypeError, r"Config.include_fqns must be a sequence of strings, got 'experts'"),
        ({"exclude_fqns": (3,)}, TypeError, r"Config.exclude_fqns must hold strings, got 3"),
        ({"min_gemm_size": -1}, ValueError, r"Config.min_gemm_size must be an int >= 0, got -1"),
        ({"min_gemm_size": True}, ValueError, r"Config.min_gemm_size must be an int >= 0, got True"),
        ({"dense_linears": "yes"}, TypeError, r"Config.dense_linears must be a bool, got 'yes'"),
        ({"fast_accum": ("fwd",)}, ValueError, r"Config.fast_accum: 'fwd' is not allowed; allowed values: 'forward', 'dgrad', 'wgrad'"),
        ({"fast_accum": "forward"}, TypeError, r"Config.fast_accum must be a sequence of strings, got 'forward'"),
        ({"a2a_wire_format": "int8"}, ValueError, r"Config.a2a_wire_format: 'int8' is not allowed; allowed values: 'mxint8', 'mxfp8'"),
        ({"weight_blocks": "16x16"}, ValueError, r"Config.weight_blocks: '16x16' is not allowed; allowed values: '1x32', '32x32'"),
        ({"a2a_wgrad": "bf16"}, ValueError, r"Config.a2a_wgrad: 'bf16' is not allowed; allowed values: 'dequant', 'requant', 'bf16_a2a'"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Config(**kwargs)


def test_sequences_become_tuples_and_configs_compare_by_value() -> None:
    config = Config(gemms=["forward", "dgrad"], exclude_fqns=["attn"])
    assert config.gemms == ("forward", "dgrad") and config.exclude_fqns == ("attn",)
    assert config == Config(gemms=("forward", "dgrad"), exclude_fqns=("attn",))
    assert hash(config) == hash(Config(gemms=("forward", "dgrad"), exclude_fqns=("attn",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scale_mode = "floor"


def test_fast_accum_takes_roles_or_a_bool() -> None:
    assert Config(fast_accum=True).fast_accum == ("forward", "dgrad", "wgrad")
    assert Config(fast_accum=False).fast_accum == ()
    assert Config(fast_accum=["forward"]) == Config(fast_accum=("forward",))


def test_options_map_onto_fields_and_unknown_keys_are_named() -> None:
    assert Config.from_options({"scale_mode": "floor", "dense_linears": False}) == Config(
        scale_mode="floor", dense_linears=False
    )
    assert Config.from_options(None) == Config()
    with pytest.raises(ValueError, match=r"unknown mxfp8 option 'mode'; allowed options: scale_mode, target, gemms"):
        Config.from_options({"mode": "floor"})
    with pytest.raises(ValueError, match=r"Config.target: 'gpu'"):
        Config.from_options({"target": "gpu"})


@pytest.mark.parametrize("bad", ["floor", {"scale_mode": "floor"}])
def test_backend_takes_a_config_and_says_how_to_make_one(bad: object) -> None:
    import mxfp8_compile

    with pytest.raises(TypeError, match=r"mxfp8_compile.backend\(\) takes a Config or None, got .*Config.from_options"):
        mxfp8_compile.backend(bad)
