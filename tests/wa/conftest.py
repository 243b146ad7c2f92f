"""Shared fixtures for the weight/activation quantization tests: a tiny random Llama and its ids."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, hidden: int = 96, intermediate: int = 160, layers: int = 2):
    """A small random Llama (hidden 96 = 1.5 x 64, so block 64 needs padding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # plant a few outlier input channels, as real LLM activations have
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40, 77]] = 25.0
            layer.post_attention_layernorm.weight[[10, 50]] = 15.0
    return model


@pytest.fixture(autouse=True)
def single_thread():
    """These tests run many small ops: on a shared 2-core CPU, waking a second intra-op thread per op
    costs more than it gains (4x slower under load), so run them single-threaded and restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_tiny():
    """The tiny_llama factory (a fixture, so test modules need not import conftest by name)."""
    return tiny_llama


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture
def calib():
    return torch.randint(1, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ids():
    return torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(2))
