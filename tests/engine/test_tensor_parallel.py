"""Tensor parallelism on the CPU (gloo, 2 processes): TP=2 generates what TP=1 generates, each rank's pool holds
half the bytes, and unsplittable models fail clearly."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.engine import PagedEngine
from lowbit.engine.parallel import TensorParallelEngine, check_shardable, shard_llama

PROMPTS = [(5, 12), (140, 12), (250, 12)]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def _prompts():
    return [(torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist(), m) for n, m in PROMPTS]


def _worker(rank, world, port, kv, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = shard_llama(_model(), rank, world)
        engine = TensorParallelEngine(PagedEngine(model, kv=kv, kv_budget_mb=16, max_batch=4, max_tokens=512), rank, world)
        if rank == 0:
            reqs = [engine.add(p, m) for p, m in _prompts()]
            doomed = engine.add([7, 8, 9], 30)
            peak = 0
            engine.step()
            engine.cancel(doomed)  # a cancel replays on the other rank in order
            while not engine.idle:
                engine.step()
                peak = max(peak, engine.store.used_blocks * engine.store.block_bytes())
            engine.step(stop=True)
            out.put((kv, [r.output for r in reqs], peak))
        else:
            engine.follow()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kv", ["fp16", "kivi2"])
def test_tp2_generates_what_tp1_generates(kv):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, kv, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = out.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    one = PagedEngine(_model(), kv=kv, kv_budget_mb=16, max_batch=4, max_tokens=512)
    reqs = [one.add(p, m) for p, m in _prompts()]
    doomed = one.add([7, 8, 9], 30)
    peak = 0
    one.step()
    one.cancel(doomed)
    while not one.idle:
        one.step()
        peak = max(peak, one.store.used_blocks * one.store.block_bytes())
    assert got[1] == [r.output for r in reqs]
    assert got[2] * 2 == peak  # each rank's pages hold half the bytes (half the KV heads)


def test_unsplittable_models_fail_clearly():
    cfg = _model().config
    check_shardable(cfg, 2)
    cfg.num_key_value_heads = 3
    with pytest.raises(ValueError, match="3 KV heads"):
        check_shardable(cfg, 2)
