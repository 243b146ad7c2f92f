import pytest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """A small random Llama with the bundled tokenizer, saved as a local HF directory (fast to run anywhere)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    tok = smollm2[1]
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
