"""`compare` reuses the reference run for its plain fp16 row: same figures as running it again."""

import pytest
import torch

from lowbit.eval import evaluate_kv, reference_run


def test_fp16_row_from_the_reference_equals_a_rerun(tiny_llama):
    ids = torch.randint(0, 97, (1, 48))
    ref = reference_run(tiny_llama, ids, 32, 16)
    rerun = evaluate_kv(tiny_llama, ids, "fp16", 32, 16, reference=ref)
    reused = evaluate_kv(tiny_llama, ids, "fp16", 32, 16, reference=ref, reuse_reference=True)
    assert reused.ppl == pytest.approx(rerun.ppl, rel=1e-5) and reused.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert (reused.kv_bytes, reused.kv_bytes_fp16) == (rerun.kv_bytes, rerun.kv_bytes_fp16) and reused.kv_bytes > 0
    with pytest.raises(ValueError, match="reuse_reference"):
        evaluate_kv(tiny_llama, ids, "kivi:bits=2", 32, 16, reference=ref, reuse_reference=True)
