"""Saving and loading weight/activation-quantized models.

A checkpoint is a directory holding

* ``wa_quantized.safetensors``: every QuantLinear buffer, keyed ``<layer name>.<buffer>``
  (``qweight``, ``w_scale``, ``w_zero``, ``perm``, ``int8_mask``, ``bias`` as present);
* ``wa_config.json``: format version, lowbit version, the method spec and its resolved config, the
  base model name, one entry per layer (name, in/out features, padded input, group, block, tensor
  names, dtypes and shapes, ``input_permuted``: whether a folded producer writes its input permuted,
  :mod:`lowbit.wa.fold`) and ``sha256``: the hash of every tensor (name, dtype, shape, bytes, in
  sorted name order), and ``config_sha256``: the hash of the spec, config and layer entries.

``qweight`` is stored in the layout the GEMM kernel reads (format version 2: 4-bit codes tile-split,
:mod:`lowbit.kernels.layout`; version 1 files, plain-packed, are refused: re-quantize). Folded producers
(gate/up, v_proj rows) are saved already permuted; on loading, the norms whose readers expect a permuted
input are rebuilt as :class:`~lowbit.wa.fold.PermutedRMSNorm`.

The rest of the model (embeddings, norms, LM head) comes from the base model given to
:func:`load_quantized`. Any inconsistency (bad hash, missing or extra tensors, shapes that disagree
with the config, a base model whose layers do not match, a different spec than expected, an
unreadable file) raises :class:`QuantizedCheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from lowbit.wa.fold import restore_norms
from lowbit.wa.linear import QuantLinear
from lowbit.wa.methods import WAConfig, resolve_config
from lowbit.wa.model import WAReport, _set_module, fp16_nbytes, model_nbytes

FORMAT = "lowbit-wa"
FORMAT_VERSION = 2  # 2: tile-split 4-bit qweight (the kernel's layout), input_permuted per layer
TENSORS_FILE = "wa_quantized.safetensors"
CONFIG_FILE = "wa_config.json"


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint is corrupted, incomplete, or does not match the model/config given."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    """sha256 of the parts of the JSON config that define the layers (spec, config, layer entries)."""
    core = {k: config.get(k) for k in ("spec", "config", "layers")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer_tensors(q: QuantLinear) -> dict[str, torch.Tensor]:
    return {n: b for n, b in q.named_buffers(recurse=False) if b is not None}


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write the QuantLinear layers of `model` to directory `path` (created); returns the path."""
    from safetensors.torch import save_file

    import lowbit

    from lowbit.wa.fuse import is_fused

    if is_fused(model):
        raise ValueError("the model's sibling projections are fused (lowbit.wa.fuse_projections): call "
                         "lowbit.wa.unfuse_projections(model) before saving, and fuse again after")
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("the model holds no QuantLinear layer: quantize it with lowbit.wa.quantize_model first")
    cfgs = {q.cfg for q in layers.values()}
    if len(cfgs) > 1:
        raise ValueError(f"the model mixes {len(cfgs)} quantization configs; save_quantized supports one per model")
    cfg = next(iter(cfgs))
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name, q in layers.items():
        lt = _layer_tensors(q)
        for tname, t in lt.items():
            tensors[f"{name}.{tname}"] = t.detach().cpu().contiguous()
        entries.append({
            "name": name, "in": q.in_features, "out": q.out_features, "padded_in": q.padded_in,
            "group": q.group, "block": q.block, "bias_dtype": str(q.bias.dtype) if q.bias is not None else None,
            "input_permuted": bool(q.input_permuted),
            "tensors": {tname: {"dtype": str(t.dtype), "shape": list(t.shape)} for tname, t in lt.items()},
        })
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": lowbit.__version__,
        "spec": cfg.spec, "config": cfg.to_dict(), "base_model": getattr(model, "lowbit_name", None),
        "layers": entries, "sha256": tensors_sha256(tensors),
    }
    config["config_sha256"] = config_sha256(config)
    save_file(tensors, str(path / TENSORS_FILE), metadata={"format": FORMAT, "sha256": config["sha256"]})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return path


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise QuantizedCheckpointError(f"{path} is not a lowbit quantized checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizedCheckpointError(f"{cfg_path} is unreadable or not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise QuantizedCheckpointError(f"{cfg_path} is not a {FORMAT} config")
    if config.get("format_version") == 1:
        raise QuantizedCheckpointError(
            f"{cfg_path} has format version 1 (plain-packed 4-bit weights); this lowbit stores the GEMM kernel's "
            f"tile-split layout (version {FORMAT_VERSION}): quantize the model again and save it"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise QuantizedCheckpointError(
            f"{cfg_path} has format version {config.get('format_version')}; this lowbit reads version {FORMAT_VERSION}"
        )
    for key in ("spec", "config", "layers", "sha256", "config_sha256"):
        if key not in config:
            raise QuantizedCheckpointError(f"{cfg_path} lacks the '{key}' entry")
    if config_sha256(config) != config["config_sha256"]:
        raise QuantizedCheckpointError(f"{cfg_path}: config checksum mismatch: the config was edited or corrupted after saving")
    return config


def load_quantized(path: str | Path, base_model_name_or_model="smollm2", expect_spec: str | None = None,
                   mode: str = "int") -> nn.Module:
    """Rebuild a quantized model from directory `path` on top of a base model (a name for
    :func:`lowbit.load_model`, or an unquantized model instance, modified in place).

    `expect_spec`: when given, the checkpoint must have been written with the same resolved config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = _read_config(path)
    try:
        cfg = WAConfig.from_dict(config["config"])
        if resolve_config(config["spec"]) != cfg:
            raise ValueError("the resolved config disagrees with the spec")
    except (TypeError, ValueError) as exc:
        raise QuantizedCheckpointError(f"{path / CONFIG_FILE}: invalid method config ({exc})") from None
    if expect_spec is not None and resolve_config(expect_spec) != cfg:
        raise QuantizedCheckpointError(
            f"{path} was written with '{cfg.spec}', which differs from the expected '{expect_spec}'"
        )
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except FileNotFoundError:
        raise QuantizedCheckpointError(f"{path} lacks {TENSORS_FILE}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise QuantizedCheckpointError(f"{path / TENSORS_FILE} is corrupted or unreadable: {exc}") from None

    expected = {f"{e['name']}.{t}" for e in config["layers"] for t in e["tensors"]}
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise QuantizedCheckpointError(
            f"{path}: tensors do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    digest = tensors_sha256(tensors)
    if digest != config["sha256"]:
        raise QuantizedCheckpointError(f"{path}: checksum mismatch (sha256 {digest[:12]}... != recorded {config['sha256'][:12]}...): the file is corrupted")

    if isinstance(base_model_name_or_model, nn.Module):
        model = base_model_name_or_model
    else:
        import lowbit

        model, _ = lowbit.load_model(base_model_name_or_model)
    device = next(model.parameters()).device
    report = WAReport(cfg.spec, cfg, calibrated=cfg.permute)
    for e in config["layers"]:
        name = e["name"]
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuantizedCheckpointError(f"{path}: layer '{name}' does not exist in the base model: written for a different model?") from None
        if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (e["in"], e["out"]):
            shape = (linear.in_features, linear.out_features) if isinstance(linear, nn.Linear) else type(linear).__name__
            raise QuantizedCheckpointError(
                f"{path}: layer '{name}' is {shape} in the base model but ({e['in']}, {e['out']}) in the checkpoint: "
                "written for a different model?"
            )
        bias_dtype = getattr(torch, e["bias_dtype"].removeprefix("torch.")) if e["bias_dtype"] else torch.float32
        try:
            q = QuantLinear(e["in"], e["out"], cfg, e["bias_dtype"] is not None, bias_dtype, mode)
        except ValueError as exc:
            raise QuantizedCheckpointError(f"{path}: layer '{name}': {exc}") from None
        want = {n: b for n, b in q.named_buffers(recurse=False) if b is not None}
        if set(want) != set(e["tensors"]):
            raise QuantizedCheckpointError(
                f"{path}: layer '{name}' holds tensors {sorted(e['tensors'])} but '{cfg.spec}' needs {sorted(want)}"
            )
        for tname, buf in want.items():
            t = tensors[f"{name}.{tname}"]
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise QuantizedCheckpointError(
                    f"{path}: tensor '{name}.{tname}' is {t.dtype} {tuple(t.shape)} but '{cfg.spec}' on a "
                    f"({e['in']}, {e['out']}) layer needs {buf.dtype} {tuple(buf.shape)}"
                )
            buf.copy_(t)
        q.input_permuted = e.get("input_permuted", False)
        if not isinstance(q.input_permuted, bool) or (q.input_permuted and q.perm is None):
            raise QuantizedCheckpointError(f"{path}: layer '{name}': input_permuted must be false or true with a permutation")
        q._cache = {}
        _set_module(model, name, q.to(device))
        report.layers.append({
            "name": name, "in": q.in_features, "out": q.out_features, "padded_in": q.padded_in, "group": q.group,
            "block": q.block if q.quantizes_activations else 0,
            "blocks": q.n_blocks if q.quantizes_activations else 0, "int8_blocks": q.n_int8_blocks,
        })
    try:
        restore_norms(model)
    except ValueError as exc:
        raise QuantizedCheckpointError(f"{path}: folded permutations do not fit the base model: {exc}") from None
    report.inputs = {e["name"]: "folded" if e.get("input_permuted") else "gather"
                     for e in config["layers"] if f"{e['name']}.perm" in tensors}
    report.nbytes = model_nbytes(model)
    report.nbytes_fp16 = fp16_nbytes(model)
    model.lowbit_wa = report
    return model
