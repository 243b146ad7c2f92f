"""Spec registry: defaults, resolved configs, and clear SpecErrors."""

from __future__ import annotations

import pytest

from lowbit.spec import SpecError
from lowbit.wa import WA_METHODS, parse_wa_spec, resolve_config


def test_registry_has_the_five_methods():
    assert set(WA_METHODS) == {"fmpq", "w8a8", "w4a16", "w4a8", "w4a4"}


def test_fmpq_defaults():
    p = parse_wa_spec("fmpq")
    assert p.options == {"w": 4, "a": 4, "block": 128, "group": 128, "int8_frac": 0.1, "sym": True, "pad": True,
                         "gptq": False, "damp": 0.1, "rotate": "none", "clip": False, "aclip": 1.0, "fold": True,
                         "prefill": "int"}
    cfg = resolve_config("fmpq:w=4,a=4,block=128,int8_frac=0.1")
    assert (cfg.w_bits, cfg.a_bits, cfg.block, cfg.group, cfg.int8_frac, cfg.permute) == (4, 4, 128, 128, 0.1, True)


def test_resolved_baselines():
    w8a8 = resolve_config("w8a8")
    assert (w8a8.w_bits, w8a8.a_bits, w8a8.group, w8a8.block, w8a8.permute) == (8, 8, 0, 0, False)
    w4a16 = resolve_config("w4a16:group=64,sym=false")
    assert (w4a16.w_bits, w4a16.a_bits, w4a16.group, w4a16.sym) == (4, 16, 64, False)
    w4a4 = resolve_config("w4a4:block=64,g=64")
    assert (w4a4.a_bits, w4a4.int8_frac, w4a4.permute) == (4, 0.0, False)
    w4a8 = resolve_config("fmpq:a=8,int8_frac=0")
    assert w4a8.a_bits == 8 and w4a8.int8_frac == 1.0  # every block INT8
    plain = resolve_config("w4a8:gptq=true,rotate=hadamard")
    assert (plain.w_bits, plain.a_bits, plain.int8_frac, plain.permute, plain.gptq, plain.rotate) == (4, 8, 1.0, False, True, "hadamard")
    assert plain.needs_calibration and not resolve_config("w4a16").needs_calibration


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("gptq", "allowed methods are fmpq, w8a8, w4a16, w4a8, w4a4"),
        ("w4a16:rotate=random", "one of ('none', 'hadamard')"),
        ("w4a8:gptq=perhaps", "must be bool"),
        ("w8a8:gptq=true", "allowed options are none"),
        ("fmpq:bits=4", "allowed options are w"),
        ("fmpq:a=3", "one of (4, 8)"),
        ("fmpq:w=2", "one of (4, 8)"),
        ("fmpq:int8_frac=1.5", "[0, 1]"),
        ("fmpq:int8_frac=lots", "must be float"),
        ("fmpq:block=63", "positive even integer"),
        ("fmpq:block=0", "positive even integer"),
        ("fmpq:block=96,group=64", "must divide one another"),
        ("fmpq:sym=maybe", "must be bool"),
        ("fmpq:a", "malformed option"),
        ("fmpq:a=4,a=8", "given twice"),
        ("w8a8:group=128", "allowed options are none"),
        ("w4a16:block=64", "allowed options are group"),
        ("fmpq+w4a4", "not supported"),
        ("", "allowed methods"),
    ],
)
def test_bad_specs_raise_spec_error(spec, fragment):
    with pytest.raises(SpecError) as exc:
        resolve_config(spec)
    assert fragment in str(exc.value)
