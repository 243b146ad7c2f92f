"""Fixtures for the server tests: a fake tokenizer for the tiny random Llama, and server factories."""

import contextlib
from types import SimpleNamespace

import pytest
import torch


class FakeTokenizer:
    """One character per token id, so generated ids can be read back from text; encodes a character as its
    code point mod 97, and has a minimal chat template ("role: content" lines)."""

    eos_token_id = None
    chat_template = "fake"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x100 + int(i)) for i in ids)

    def __call__(self, text):
        text.encode("utf-8")  # raises on lone surrogates, as the real tokenizers do
        return SimpleNamespace(input_ids=[ord(c) % 97 for c in text])

    def apply_chat_template(self, messages, add_generation_prompt=True, return_tensors="pt", return_dict=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
        return {"input_ids": torch.tensor([self(text).input_ids])}

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
    """``start_server(model, tok, kv=..., api_key=..., drain_timeout=..., backend="classic"|"paged", **engine_kwargs)``
    -> BackgroundServer (stopped at module end)."""
    from lowbit.serve.api import create_app
    from lowbit.serve.engine import Engine
    from lowbit.serve.paged import PagedServeEngine
    from lowbit.serve.server import BackgroundServer

    servers = []

    def start(model, tok, kv="fp16", api_key=None, drain_timeout=60.0, backend="classic", **kwargs):
        kwargs.setdefault("model_name", "smollm2")
        engine = (PagedServeEngine if backend == "paged" else Engine)(model, tok, kv=kv, **kwargs)
        srv = BackgroundServer(create_app(engine, api_key=api_key, drain_timeout=drain_timeout)).start()
        srv.engine, srv.backend = engine, backend
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        with contextlib.suppress(Exception):
            srv.stop(timeout=60)


@pytest.fixture
def model_hook(tiny_llama):
    """``model_hook(fn)``: call ``fn(input_ids, position_ids)`` before every forward of the tiny Llama (removed after
    the test); it may raise (a model fault) or sleep (a slow model). ``model_hook(fn, at="embed")`` calls
    ``fn(input_ids, None)`` before the token embedding instead, which both engines run once per forward (the paged
    engine's runner never calls the model's own forward)."""
    handles = []

    def install(fn, at="forward"):
        if at == "embed":
            handles.append(tiny_llama.model.embed_tokens.register_forward_pre_hook(lambda module, args: fn(args[0], None)))
            return
        handles.append(tiny_llama.register_forward_pre_hook(
            lambda module, args, kwargs: fn(kwargs.get("input_ids"), kwargs.get("position_ids")), with_kwargs=True))

    yield install
    for h in handles:
        h.remove()
