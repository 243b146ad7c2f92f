"""Long-context task generators: deterministic, the answer really is in the prompt, lengths as asked."""

import re

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
