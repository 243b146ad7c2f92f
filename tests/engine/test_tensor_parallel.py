"""Tensor parallelism on the CPU (gloo, 2 processes): TP=2 generates what TP=1 generates, each rank's pool holds
half the bytes, and unsplittable models fail clearly."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.engine import PagedEngine
from lowbit.engine.parallel import TensorParallelEngine, check_same_weights, check_shardable, shard_llama

PROMPTS = [(5, 12), (140, 12), (250, 12)]


WA = "fmpq:w=4,a=4,int8_frac=0.25"  # folded permutations, INT8 blocks: row-parallel cuts on 128-channel blocks


def _model(wa=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    if wa:  # quantized whole on every rank (same seed, same calibration), then cut
        from lowbit.wa import quantize_model

        model.float()
        quantize_model(model, wa, calib=torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1)))
    return model


def _prompts():
    return [(torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist(), m) for n, m in PROMPTS]


def _worker(rank, world, port, kv, out, wa=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _model(wa)
        check_same_weights(model)
        model = shard_llama(model, rank, world)
        if wa:  # as lowbit serve does: each rank's sibling shards fused (TP 1 below keeps them separate)
            from lowbit.wa import fuse_projections

            assert fuse_projections(model) == 2 * len(model.model.layers)
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


@pytest.mark.parametrize("kv,wa", [("fp16", None), ("kivi2", None), ("kivi2", WA)])
def test_tp2_generates_what_tp1_generates(kv, wa):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, kv, out, wa)) for r in range(2)]
    for p in procs:
        p.start()
    got = out.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    one = PagedEngine(_model(wa), kv=kv, kv_budget_mb=16, max_batch=4, max_tokens=512)
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


def test_quantized_parts_add_up_to_the_whole_layer():
    """Each rank's cut of a quantized linear computes exactly its rows / its share of the sum (no requantizing)."""
    from lowbit.wa.linear import QuantLinear
    from lowbit.wa.shard import input_columns, output_rows

    model = _model(WA)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.n_int8_blocks and down.input_permuted  # folded, mixed precision
    x = torch.randn(5, down.in_features, generator=torch.Generator().manual_seed(3))
    whole = down(x) - down.bias if down.bias is not None else down(x)
    halves = input_columns(down, 0, 256)(x[:, :256]) + input_columns(down, 256, 512)(x[:, 256:])
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5)
    q = model.model.layers[1].self_attn.q_proj
    h = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.cat([output_rows(q, 0, 128)(h), output_rows(q, 128, 256)(h)], -1), q(h))


def test_cuts_that_would_not_be_exact_fail_clearly():
    from lowbit.wa.shard import input_columns

    down = _model(WA).model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="groups/blocks"):
        input_columns(down, 0, 192)  # not on a 128-channel block boundary
    with pytest.raises(ValueError, match="groups/blocks"):
        input_columns(_model("w8a8").model.layers[0].mlp.down_proj, 0, 256)  # per-token scales over the whole row
    with pytest.raises(ValueError, match=r"layer 0: .*groups/blocks"):
        shard_llama(_model("w4a8:block=256,group=256"), 0, 2)  # o_proj: 128 inputs per rank, half a block
