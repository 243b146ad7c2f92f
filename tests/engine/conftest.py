import pytest
import torch


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-layer Llama: 4 query heads, 2 KV heads, head dim 64 (the engine's PyTorch path takes any
    multiple of 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger, varied activations so quantization changes something
        for p in model.parameters():
            p.mul_(3.0)
    return model
