"""save_quantized / load_quantized: exact round trip and clear errors on bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.wa import QuantizedCheckpointError, load_quantized, quantize_model, save_quantized
from lowbit.wa.io import CONFIG_FILE, TENSORS_FILE

SPEC = "fmpq:a=4,block=64,group=32,int8_frac=0.25,sym=false"


@pytest.fixture
def saved(tmp_path, calib, make_tiny):
    model = quantize_model(make_tiny(), SPEC, calib=calib)
    save_quantized(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_is_exact(saved, ids, make_tiny):
    model, path = saved
    loaded = load_quantized(path, make_tiny())
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lowbit_wa.spec == SPEC and len(loaded.lowbit_wa.layers) == 14
    cfg = json.loads((path / CONFIG_FILE).read_text())
    assert cfg["lowbit_version"] and len(cfg["sha256"]) == 64 and cfg["config"]["int8_frac"] == 0.25


@pytest.mark.parametrize("spec", ["w8a8", "w4a16:group=32", "fmpq:a=8,block=32,group=32"])
def test_round_trip_other_methods(tmp_path, calib, ids, spec, make_tiny):
    model = quantize_model(make_tiny(), spec, calib=calib)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, make_tiny(), expect_spec=spec)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_corrupted_tensor_bytes_fail_checksum(saved, make_tiny):
    _, path = saved
    raw = bytearray((path / TENSORS_FILE).read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor's data
    (path / TENSORS_FILE).write_bytes(bytes(raw))
    with pytest.raises(QuantizedCheckpointError, match="checksum mismatch"):
        load_quantized(path, make_tiny())


def test_truncated_file_is_reported(saved, make_tiny):
    _, path = saved
    raw = (path / TENSORS_FILE).read_bytes()
    (path / TENSORS_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QuantizedCheckpointError, match="corrupted or unreadable"):
        load_quantized(path, make_tiny())


def test_missing_tensor_is_reported(saved, make_tiny):
    _, path = saved
    tensors = load_file(str(path / TENSORS_FILE))
    del tensors["model.layers.1.mlp.down_proj.w_scale"]
    save_file(tensors, str(path / TENSORS_FILE))
    with pytest.raises(QuantizedCheckpointError, match=r"missing \['model.layers.1.mlp.down_proj.w_scale'\]"):
        load_quantized(path, make_tiny())


def test_missing_files_are_reported(tmp_path, saved, make_tiny):
    with pytest.raises(QuantizedCheckpointError, match="wa_config.json is missing"):
        load_quantized(tmp_path / "nothing", make_tiny())
    _, path = saved
    (path / TENSORS_FILE).unlink()
    with pytest.raises(QuantizedCheckpointError, match="lacks wa_quantized.safetensors"):
        load_quantized(path, make_tiny())


def test_edited_config_is_reported(saved, make_tiny):
    _, path = saved
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg["config"]["int8_frac"] = 0.5
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(QuantizedCheckpointError, match="config checksum mismatch"):
        load_quantized(path, make_tiny())
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(QuantizedCheckpointError, match="not valid JSON"):
        load_quantized(path, make_tiny())


def test_different_expected_config_is_reported(saved, make_tiny):
    _, path = saved
    with pytest.raises(QuantizedCheckpointError, match="differs from the expected"):
        load_quantized(path, make_tiny(), expect_spec="fmpq:a=8,block=64,group=32")
    assert load_quantized(path, make_tiny(), expect_spec=SPEC) is not None


def test_different_base_model_is_reported(saved, make_tiny):
    _, path = saved
    with pytest.raises(QuantizedCheckpointError, match="different model"):
        load_quantized(path, make_tiny(intermediate=192))
    with pytest.raises(QuantizedCheckpointError, match="does not exist in the base model"):
        load_quantized(path, make_tiny(layers=1))


def test_error_is_a_value_error():
    assert issubclass(QuantizedCheckpointError, ValueError)


def test_save_requires_quantized_model(tmp_path, make_tiny):
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(make_tiny(), tmp_path)
