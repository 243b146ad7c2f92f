import torch
from transformers import DynamicCache

from lowbit.generation import build_inputs, generate_text
from lowbit.kv import make_cache


def test_kivi8_greedy_matches_fp16_for_32_tokens(smollm2):
    model, tok = smollm2
    ids = build_inputs(tok, "Write a short story about a lighthouse keeper.")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    out = model.generate(ids, past_key_values=make_cache("kivi:bits=8,group=32,residual=32", model.config), **kw)
    n = ids.shape[1]
    assert ref.shape[1] - n >= 32
    assert torch.equal(out[:, : n + 32], ref[:, : n + 32])


def test_batched_left_padding(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    kw = dict(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **kw)
    out = model.generate(past_key_values=make_cache("kivi:bits=8,group=32,residual=32", model.config), **kw)
    assert torch.equal(out, ref)
    # each row equals its own unpadded generation
    single = tok(prompts[0], return_tensors="pt")
    alone = model.generate(**single, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                           past_key_values=make_cache("kivi:bits=8,group=32,residual=32", model.config))
    assert tok.decode(alone[0, single.input_ids.shape[1]:]) == tok.decode(out[0, enc.input_ids.shape[1]:])


def test_generate_text_stream_and_plain_agree(smollm2):
    model, tok = smollm2
    plain = generate_text(model, tok, "Name three colours.", kv="kivi:bits=2", max_new_tokens=16)
    streamed = "".join(generate_text(model, tok, "Name three colours.", kv="kivi:bits=2", max_new_tokens=16, stream=True))
    assert plain.strip() and plain == streamed
