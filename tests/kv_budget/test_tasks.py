"""Long-context task generators: deterministic, the answer really is in the prompt, lengths as asked."""

import re

import torch

import pytest

from lowbit.eval.tasks import TASKS, extract_answer, make_sample, plot_quality_vs_budget, run_task
from lowbit.generation import build_inputs
from lowbit.spec import SpecError


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def test_extract_answer():
    assert extract_answer("The pass key is 12345.") == "12345"
    assert extract_answer("123456 then 54321") == "54321"
    assert extract_answer("no digits") is None
    assert extract_answer("1234") is None


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length,depth", [(256, 0.0), (1024, 0.5), (2048, 1.0)])
def test_samples_deterministic_and_answer_in_prompt(tok, task, length, depth):
    a = make_sample(tok, task, length, depth, seed=3)
    b = make_sample(tok, task, length, depth, seed=3)
    c = make_sample(tok, task, length, depth, seed=4)
    assert a == b
    assert a.prompt != c.prompt
    assert re.fullmatch(r"\d{5}", a.answer)
    if task == "passkey":
        assert f"The pass key is {a.answer}." in a.prompt
    else:
        key = a.extra["key"]
        assert f'The value of the key "{key}" is {a.answer}.' in a.prompt
        assert f'the key "{key}"?' in a.prompt
        assert len(a.extra["pairs"]) == 4
    n = build_inputs(tok, a.prompt).shape[1]
    assert abs(n - length) <= max(16, length // 50), n
    # the needle sits at the asked depth of the filler
    start, end = a.prompt.index("\n\n") + 2, a.prompt.rindex("\n\n")
    where = (a.prompt.index(a.answer) - start) / (end - start)
    if task == "passkey":
        assert abs(where - depth) < 0.1


def test_invalid_task_arguments(tok):
    with pytest.raises(ValueError, match="unknown task"):
        make_sample(tok, "needle", 512)
    with pytest.raises(ValueError, match="depth"):
        make_sample(tok, "passkey", 512, depth=1.5)
    with pytest.raises(ValueError, match="length"):
        make_sample(tok, "passkey", 100_000)
    with pytest.raises(SpecError):
        run_task(None, tok, "passkey", 512, 1, "h2o:budget=2")


def test_plot(tmp_path):
    rows = [
        {"method": "fp16", "budget": 1.0, "kl_mean": 0.0, "accuracy": 0.8},
        {"method": "h2o", "budget": 0.5, "kl_mean": 0.1, "accuracy": 0.5},
        {"method": "h2o", "budget": 0.35, "kl_mean": 0.2, "accuracy": 0.3},
        {"method": "kvmerger", "budget": 0.5, "kl_mean": 0.05},
    ]
    path = plot_quality_vs_budget(rows, tmp_path / "q.png")
    assert path.stat().st_size > 1000


def test_prompt_splits_into_context_and_question(tok):
    from lowbit.eval.tasks.needle import prompt_ids

    for task in TASKS:
        s = make_sample(tok, task, 256, 0.5, seed=1)
        ids, n_context = prompt_ids(tok, s)
        assert torch.equal(ids, build_inputs(tok, s.prompt))
        assert tok.decode(ids[0, n_context:]).startswith(s.question)
        assert s.answer in tok.decode(ids[0, :n_context])


@pytest.mark.model
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_run_task_protocols(smollm2, compress):
    model, tok = smollm2
    r = run_task(model, tok, "passkey", 160, 1, "h2o:budget=0.5", compress=compress)
    assert r.compress == compress and r.n == 1 and r.score_seconds > 0 and r.compress_seconds > 0
    fp = run_task(model, tok, "passkey", 160, 1, "fp16", compress=compress)
    assert r.kv_bytes < 0.75 * fp.kv_bytes and r.kv_bytes_fp16 == pytest.approx(fp.kv_bytes_fp16, rel=0.1)
    with pytest.raises(ValueError, match="protocols"):
        run_task(model, tok, "passkey", 160, 1, "fp16", compress="question")


@pytest.mark.model
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_kvpress_peer_runs_a_press(smollm2, compress):
    """One kvpress press on lowbit's prompts; at budget 1.0 it is exactly the uncompressed model's greedy answer."""
    pytest.importorskip("kvpress", reason="kvpress not installed (optional extra)")
    from lowbit.eval.tasks.peers import run_press_task

    model, tok = smollm2
    fp = run_task(model, tok, "passkey", 160, 2, "fp16", compress=compress)
    same = run_press_task(model, tok, "passkey", 160, 2, "tova", 1.0, compress)
    assert same.outputs == fp.outputs and same.correct == fp.correct
    half = run_press_task(model, tok, "passkey", 160, 1, "tova", 0.5, compress)
    assert half.kv == "kvpress:tova:budget=0.5" and half.compress == compress
    assert half.kv_bytes < 0.75 * half.kv_bytes_fp16


def test_press_names_are_checked():
    from lowbit.eval.tasks.peers import make_press

    with pytest.raises(ValueError, match="unknown kvpress press"):
        make_press("h2o", 0.5)
    with pytest.raises(ValueError, match="budget"):
        make_press("tova", 0.0)


def test_grid_method_specs():
    from lowbit.eval.tasks.grid import method_spec

    assert method_spec("fp16", 0.5) == "fp16"
    assert method_spec("h2o", 0.5) == "h2o:budget=0.5"
    assert method_spec("h2o:heads=shared", 0.25) == "h2o:heads=shared,budget=0.25"
    assert method_spec("kvmerger+kivi:bits=4", 0.5) == "kvmerger:budget=0.5+kivi:bits=4"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--peers", "vllm"], "only peer library is kvpress"),
        (["--peers", "kvpress"], "add --budgets"),
        (["--peers", "kvpress", "--budgets", "0.5", "--task", "passkey", "--presses", "h2o"], "--presses h2o"),
        (["--compress", "question", "--budgets", "0.5"], "allowed protocols"),
    ],
)
def test_compare_peer_options_fail_early(args, needle):
    from typer.testing import CliRunner

    from lowbit.cli import app

    res = CliRunner().invoke(app, ["compare", "--model", "no-such-model", *args])
    assert res.exit_code == 2 and needle in res.output, res.output


def test_compare_with_kvpress_peers(tmp_path, tiny_dir):
    """compare --peers kvpress: press rows in the same budget table, JSON and plot, context protocol."""
    pytest.importorskip("kvpress", reason="kvpress not installed (optional extra)")
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app

    res = CliRunner().invoke(app, ["compare", "--model", str(tiny_dir), "--kv", "fp16", "--lut", "", "--wa", "", "--wa-kv", "",
                                   "--budgets", "0.5", "--budget-methods", "h2o", "--task", "passkey", "--task-length", "160",
                                   "--task-samples", "1", "--compress", "context", "--peers", "kvpress", "--presses", "tova",
                                   "--prefill", "64", "--tokens", "8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "compare.json").read_text())["meta"]["budget_section"]
    assert [(r["method"], r["budget"]) for r in rows] == [("fp16", 1.0), ("h2o", 0.5), ("kvpress:tova", 0.5)]
    assert rows[-1]["compress"] == "context" and 0.0 <= rows[-1]["accuracy"] <= 1.0
    assert (tmp_path / "compare-budget.png").exists()
