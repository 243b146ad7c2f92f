"""Fixtures for the server tests: a fake tokenizer for the tiny random Llama, and server factories."""

import contextlib

import pytest
import torch


class FakeTokenizer:
    """One character per token id, so generated ids can be read back from text."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x100 + int(i)) for i in ids)

    def __len__(self):
        return 97


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_tok():
    return FakeTokenizer()


@pytest.fixture(scope="module")
def start_server():
    """``start_server(model, tok, kv=..., api_key=..., **engine_kwargs)`` -> BackgroundServer (stopped at module end)."""
    from lowbit.serve.api import create_app
    from lowbit.serve.engine import Engine
    from lowbit.serve.server import BackgroundServer

    servers = []

    def start(model, tok, kv="fp16", api_key=None, **kwargs):
        kwargs.setdefault("model_name", "smollm2")
        engine = Engine(model, tok, kv=kv, **kwargs)
        srv = BackgroundServer(create_app(engine, api_key=api_key)).start()
        srv.engine = engine
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        with contextlib.suppress(Exception):
            srv.stop(timeout=60)
