"""`lowbit serve --tensor-parallel`: the paged serving engine over 2 gloo ranks answers what one rank answers, and
the flag fails clearly outside torchrun."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.spec import SpecError

PROMPTS = [[5, 6, 7], list(range(1, 150)), list(range(30, 290))]


class Tok:
    """One token per id (decode gives one character each); no EOS."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x100 + int(i)) for i in ids)

    def __call__(self, text):
        return SimpleNamespace(input_ids=[ord(c) % 97 for c in text])

    def __len__(self):
        return 512


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def _texts(engine):
    from lowbit.serve.sampling import SamplingParams

    return [engine.generate(p, SamplingParams(max_tokens=10, temperature=0.0)).text for p in PROMPTS]


def _rank(rank, port, kv, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    from lowbit.serve.tp import follow, join_group, stop_followers, tensor_parallel_engine

    r, world = join_group(2)
    try:
        srv = tensor_parallel_engine(_model(), Tok(), r, world, kv=kv, kv_budget_mb=16, max_batch=4, graphs=False)
        if r:
            follow(srv)
        else:
            srv.start()
            try:
                out.put(_texts(srv))
            finally:
                srv.shutdown(timeout=5)
                stop_followers(srv)
    finally:
        dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kv", ["fp16", "kivi:bits=2"])
def test_two_ranks_serve_what_one_serves(kv):
    from lowbit.serve.paged import PagedServeEngine

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=_rank, args=(r, port, kv, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = out.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    one = PagedServeEngine(_model(), Tok(), kv=kv, kv_budget_mb=16, max_batch=4, graphs=False).start()
    try:
        assert got == _texts(one)
    finally:
        one.shutdown(timeout=5)


def test_tensor_parallel_needs_torchrun(monkeypatch):
    from lowbit.serve.tp import join_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SpecError, match="torchrun --nproc-per-node 2"):
        join_group(2)


def test_cli_flag_outside_torchrun_fails_before_loading(monkeypatch):
    from typer.testing import CliRunner

    from lowbit.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = CliRunner().invoke(app, ["serve", "--tensor-parallel", "2", "--model", "/nonexistent"])
    assert res.exit_code != 0 and "torchrun" in res.output
    res = CliRunner().invoke(app, ["serve", "--tensor-parallel", "2", "--engine", "classic"])
    assert res.exit_code != 0 and "paged engine" in res.output
