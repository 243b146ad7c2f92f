"""A resumable grid of retrieval runs (lowbit budget methods and kvpress presses), one JSON line per run.

``python -m lowbit.eval.tasks.grid --out runs.jsonl --tasks passkey --lengths 512 --compress prompt,context
--budgets 0.5,0.25 --methods fp16,h2o,kvmerger --presses tova,observed --samples 10``

A method is ``name`` or ``name:options`` (``h2o:heads=shared``), or ``kvpress:<press>``; the budget is added to
its options. Methods run in the order given (``--methods``, then ``--presses``). A run already
in the output file (same task, length, protocol, spec) is skipped, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def method_spec(method: str, budget: float) -> str:
    """``h2o:heads=shared`` at 0.5 -> ``h2o:heads=shared,budget=0.5`` (fp16 has no budget)."""
    if method == "fp16":
        return "fp16"
    head, plus, store = method.partition("+")
    name, colon, opts = head.partition(":")
    spec = f"{name}:{opts + ',' if opts else ''}budget={budget}"
    return spec + (f"+{store}" if plus else "")


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["length"], r["compress"], r["kv"]) for r in rows}


def run_grid(model, tok, out: Path, tasks, lengths, protocols, budgets, methods, presses, samples: int, log=print) -> None:
    """Run every (task, length, protocol, method or press, budget) not yet in `out`, appending one line each."""
    from lowbit.eval.tasks.needle import run_task
    from lowbit.eval.tasks.peers import run_press_task

    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    for length in lengths:
        for task in tasks:
            for compress in protocols:
                jobs = []
                for method in list(methods) + [f"kvpress:{p}" for p in presses]:
                    for b in ([1.0] if method == "fp16" else budgets):
                        press = method.split(":")[1] if method.startswith("kvpress:") else None
                        kv = f"{method}:budget={b}" if press else method_spec(method, b)
                        jobs.append((method, b, kv, press))
                for method, b, kv, press in jobs:
                    if (task, length, compress, kv) in done:
                        continue
                    if press is None:
                        r = run_task(model, tok, task, length, samples, kv, compress=compress)
                    else:
                        r = run_press_task(model, tok, task, length, samples, press, b, compress)
                    row = {"method": method, "budget": b, **r.to_dict()}
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.add((task, length, compress, kv))
                    log(f"{task} {length} {compress} {kv}: {r.correct}/{r.n}  {r.seconds:.0f}s  "
                        f"score {r.score_seconds:.2f}s compress {r.compress_seconds:.2f}s per sample")


def compression_cost(model, lengths, budgets, log=print) -> list[dict]:
    """CPU time (``time.process_time``, run with 1 thread) of one compression of all layers of `model`'s KV shape
    per policy, and of scoring a whole prefill per scorer, beside the model's own prefill of the same length."""
    import time

    import torch

    from lowbit.kv import KVShape
    from lowbit.kv.budget import BudgetLayer
    from lowbit.kv.eviction import make_h2o_policy, make_snapkv_policy, tova_policy
    from lowbit.kv.merging import make_kvmerger_policy

    shape, text = KVShape.from_config(model.config), model.config.get_text_config(decoder=True)
    L, H, D, Hq = shape.layers, shape.kv_heads, shape.head_dim, text.num_attention_heads
    policies = {"h2o": make_h2o_policy(), "snapkv": make_snapkv_policy(7), "tova": tova_policy,
                "kvmerger": make_kvmerger_policy(0.0, 0.5), "kvmerger protect=0": make_kvmerger_policy(0.0, 0.0)}
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(n)  # keys with runs of similar neighbours, as real keys have
        k = torch.randn(1, H, 1, D, generator=g) * 2 + torch.randn(1, H, n, D, generator=g).mul(0.06).cumsum(2)
        k = k + 0.3 * torch.randn(1, H, n, D, generator=g)
        v, s, pos = torch.randn(1, H, n, D, generator=g), torch.rand(1, H, n, generator=g), torch.arange(n).expand(1, H, n)
        for b in budgets:
            row = {"n": n, "budget": b}
            for name, policy in policies.items():
                t0 = time.process_time()
                for _ in range(L):
                    policy(k, v, s, pos, int(b * n) - 36)
                row[name] = time.process_time() - t0
            rows.append(row)
            log(" | ".join(f"{key} {val * 1000:.0f} ms" if isinstance(val, float) and key != "budget" else f"{key}={val}" for key, val in row.items()))
        q = torch.randn(1, Hq, n, D, generator=g)
        row = {"n": n}
        for name, nq in (("score all", n), ("score window", 32), ("score last", 1)):
            t0 = time.process_time()
            for _ in range(L):
                BudgetLayer.attention_mass(q[..., n - nq :, :], k)
            row[name] = time.process_time() - t0
        t0 = time.process_time()
        with torch.no_grad():
            model(torch.randint(100, 1000, (1, n)))
        row["model prefill"] = time.process_time() - t0
        rows.append(row)
        log(" | ".join(f"{key} {val * 1000:.0f} ms" if isinstance(val, float) else f"{key}={val}" for key, val in row.items()))
    return rows


def merge_diagnostics(model, tok, samples: int = 3, length: int = 512, log=print) -> dict:
    """Why merging loses the answer (passkey, prompt protocol): how similar adjacent keys are, the adaptive
    thresholds KVMerger needs at budgets 0.5 / 0.25, and the share of (layer, head, digit) slots that keep the key's
    digits unmerged after compression, for H2O and KVMerger with and without its safeguard."""
    import torch

    from lowbit.eval.tasks.needle import make_sample, prompt_ids
    from lowbit.kv import make_cache
    from lowbit.kv.hf import cache_kwargs
    from lowbit.kv.merging import adjacent_similarity, find_sets, protected_mask

    specs = [f"{m}:budget={b}{o}" for b in (0.5, 0.25) for m, o in (("h2o", ""), ("kvmerger", ",protect=0.5"), ("kvmerger", ",protect=0"))]
    kept = {s: [0, 0] for s in specs}
    sims, pct, taus = [], [], {0.5: [], 0.25: []}
    for seed in range(samples):
        smp = make_sample(tok, "passkey", length, 0.5, seed)
        ids, _ = prompt_ids(tok, smp)
        pieces = [tok.decode([t]) for t in ids[0]]
        starts = [i for i in range(len(pieces) - 4) if "".join(pieces[i : i + 5]) == smp.answer]
        digits = sorted({i + j for i in starts for j in range(5)})
        ref = make_cache("h2o:budget=1.0", model.config, model)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, ref, use_cache=True))
        for layer in ref.layers:
            sim = adjacent_similarity(layer.keys[0].float())  # [H, n]
            sims.append(sim[:, 5:-32].flatten())  # the middle a budget cache compresses
            pct.append((sim[:, None, 1:] < sim[:, digits][..., None]).float().mean(-1).flatten())
            k, sc = layer.keys[0, :, 4:-32].float(), layer.scores[0, :, 4:-32]
            for b in taus:
                m = int(b * ids.shape[1]) - 36
                taus[b].append(find_sets(k, m, protected_mask(sc, m, 0.5))[1])
        for spec in specs:
            cache = make_cache(spec, model.config, model)
            with torch.no_grad():
                model(ids, **cache_kwargs(model, cache, use_cache=True))
            for layer, full in zip(cache.layers, ref.layers):
                for h in range(layer.positions.shape[1]):
                    for d in digits:
                        hit = (layer.positions[0, h] == d).nonzero()
                        same = len(hit) and torch.allclose(layer.keys[0, h, hit.item()].float(), full.keys[0, h, d].float(), atol=1e-2)
                        kept[spec][0] += bool(same)
                        kept[spec][1] += 1
    x = torch.cat(sims)
    out = {"adjacent_similarity_quantiles": torch.quantile(x, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist(),
           "share_above_0.9": float((x > 0.9).float().mean()), "digit_similarity_percentile": float(torch.cat(pct).median()),
           "tau": {b: [float(torch.quantile(torch.cat(t), q)) for q in (0.1, 0.5, 0.9)] for b, t in taus.items()},
           "digits_unmerged": {s: a / n for s, (a, n) in kept.items()}}
    log(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("lowbit-report/grid.jsonl"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="passkey,kv-retrieval")
    ap.add_argument("--lengths", default="512")
    ap.add_argument("--compress", default="prompt,context")
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--methods", default="fp16,streaming,h2o,snapkv,tova,kvmerger")
    ap.add_argument("--presses", default="", help="kvpress presses, e.g. tova,observed,snapkv")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cost", action="store_true", help="measure compression and scoring CPU time instead")
    ap.add_argument("--diagnose", action="store_true", help="measure why merging loses the answer instead (passkey)")
    a = ap.parse_args(argv)
    import torch

    from lowbit import load_model

    torch.set_num_threads(a.threads)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    # methods may carry options with commas inside: split on ';' when given, else on ','
    methods = [x.strip() for x in a.methods.split(";")] if ";" in a.methods else split(a.methods)
    model, tok = load_model(a.model)
    if a.diagnose:
        merge_diagnostics(model, tok, a.samples)
        return
    if a.cost:
        compression_cost(model, [int(x) for x in split(a.lengths)], [float(x) for x in split(a.budgets)])
        return
    run_grid(model, tok, a.out, split(a.tasks), [int(x) for x in split(a.lengths)], split(a.compress),
             [float(x) for x in split(a.budgets)], methods, split(a.presses), a.samples, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
