"""The lm-evaluation-harness adapter (optional extra ``lowbit[eval]``): model_args parsing, scoring through the
cache, and lm-eval running lowbit's three offline tasks end to end."""

import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'lowbit[eval]'")

from lowbit.eval.harness import TASKS_DIR, LowbitLM, regroup_model_args  # noqa: E402


def test_model_args_split_on_commas_are_rejoined():
    # what lm-eval makes of model=smollm2,kv=kivi:bits=2,wa=fmpq:w=4,a=4
    items = [("model", "smollm2"), ("kv", "kivi:bits=2"), ("wa", "fmpq:w=4"), ("a", 4), ("chunk", 8), ("batch_size", 1)]
    assert regroup_model_args(items) == {"model": "smollm2", "kv": "kivi:bits=2", "wa": "fmpq:w=4,a=4", "chunk": 8, "batch_size": 1}
    assert regroup_model_args([("kv", "kivi:bits=2"), ("group", 32), ("residual", 32), ("sinks", 0)])["kv"] == "kivi:bits=2,group=32,residual=32,sinks=0"
    with pytest.raises(ValueError, match="unknown lowbit model_args key 'bits'"):
        regroup_model_args([("bits", 2)])


def test_bad_spec_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="kivi"):
        LowbitLM(model=str(tiny_dir), kv="kivi:bits=3")


@pytest.fixture(scope="module")
def text_ids(smollm2):
    from lowbit.eval import load_tokens

    return load_tokens(smollm2[1], n_tokens=200)[0].tolist()


def test_chunked_scoring_through_the_cache(tiny_dir, text_ids):
    lm = LowbitLM(model=str(tiny_dir), chunk=7)
    ctx, cont = text_ids[:50], text_ids[50:200]
    with torch.no_grad():  # one full forward, no cache
        logits = lm.model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].float()
    direct = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
    got, greedy = lm.score(ctx, cont)
    assert got == pytest.approx(direct, abs=1e-3) and greedy is False
    lm2 = LowbitLM(model=str(tiny_dir), chunk=7, kv="kivi:bits=2,group=32,residual=32")
    assert abs(lm2.score(ctx, cont)[0] - direct) > 1e-3  # later chunks read the 2-bit states


@pytest.mark.model
def test_lm_eval_runs_the_offline_tasks(tiny_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="lowbit", model_args=f"model={tiny_dir},kv=kivi:bits=2,group=32,residual=32,chunk=16",
        tasks=["lowbit_wikitext", "lowbit_cloze_mc", "lowbit_cloze_gen"], limit=2, log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)), metadata={"lowbit_max_words": 80},
    )
    res = out["results"]
    ppl = res["lowbit_wikitext"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 100  # a random model: far worse than any trained one
    assert 0.0 <= res["lowbit_cloze_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["lowbit_cloze_gen"]["exact_match,first_word"] <= 1.0
    mc = out["samples"]["lowbit_cloze_mc"]
    assert len(mc) == 2 and all(len(s["resps"]) == 4 for s in mc)  # four choices scored per question
    gen = out["samples"]["lowbit_cloze_gen"]
    assert len(gen) == 2 and all(isinstance(s["resps"][0][0], str) for s in gen)
