"""lm-evaluation-harness adapter: the model ``lowbit`` scores and generates through lowbit's caches and linears.

``lowbit lm-eval --model lowbit --model_args model=smollm2,kv=kivi:bits=2,wa=fmpq:w=4,a=4 --tasks lowbit_wikitext``
(the ``lm_eval`` CLI with this model registered and lowbit's offline tasks on the include path), or from Python::

    import lm_eval, lowbit.eval.harness  # registers "lowbit"
    lm_eval.simple_evaluate(model="lowbit", model_args="kv=kivi:bits=2", tasks=["lowbit_cloze_mc"], task_manager=...)

How a request meets the cache: the context goes through the model in one forward into a fresh ``kv`` cache (a
budget method compresses it, KIVI quantizes what leaves its residual window); the continuation then follows in
chunks of ``chunk`` tokens through that cache (``chunk=1``: token by token, exactly as generation reads it), so every
chunk after the first attends to the stored -- quantized, merged or evicted -- states. ``loglikelihood_rolling``
scores a text from a single prefix token the same way, in windows of ``max_length`` tokens. ``generate_until`` is
greedy ``generate`` over the cache. ``wa`` quantizes the linear layers (FMPQ calibrated on the bundled text, the
fake-quant path: the integer path's values at float speed); ``lut`` swaps activations for integer LUTs.

lm-eval splits ``--model_args`` on commas, so ``wa=fmpq:w=4,a=4`` arrives as ``wa=fmpq:w=4`` and ``a=4``: a key that
is not one of :data:`OPTIONS` continues the ``kv``/``wa``/``lut`` spec before it.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lowbit[eval]'") from exc

from lowbit.kv.hf import cache_kwargs
from lowbit.kv.registry import make_cache
from lowbit.spec import SpecError

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
SPECS = ("kv", "wa", "lut")
OPTIONS = {
    "model": "bundled name, local HF dir, .gguf file or hub id (default smollm2); 'pretrained' is accepted too",
    "kv": "KV method spec (default fp16)",
    "wa": "weight/activation spec (default none)",
    "lut": "activation LUT spec (default none)",
    "chunk": "continuation tokens per forward through the cache (default 32; 1 = token by token)",
    "max_length": "longest context + continuation in tokens (default 2048)",
    "max_gen_toks": "default generation length for generate_until (default 128)",
    "batch_size": "accepted for lm-eval's CLI; requests run one at a time",
    "max_batch_size": "accepted for lm-eval's CLI; ignored",
    "device": "accepted for lm-eval's CLI; the model goes where load_model puts it",
    "pretrained": "alias of model",
}


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def regroup_model_args(items) -> dict:
    """Ordered ``(key, value)`` pairs as lm-eval parsed them -> lowbit's options, split specs rejoined."""
    out: dict = {}
    last = None
    for key, value in items:
        if key in OPTIONS:
            out["model" if key == "pretrained" else key] = value
            last = key if key in SPECS else None
        elif last is not None:
            out[last] = f"{_text(out[last])},{key}={_text(value)}"
        else:
            raise ValueError(f"unknown lowbit model_args key '{key}': allowed are {', '.join(OPTIONS)}")
    return out


@register_model("lowbit")
class LowbitLM(TemplateLM):
    """An lm-eval ``LM`` over a lowbit-loaded model with a ``kv`` cache per request and optional ``wa``/``lut``."""

    def __init__(self, **kwargs):
        super().__init__()
        opts = regroup_model_args(kwargs.items())
        self.kv = _text(opts.get("kv", "fp16"))
        self.chunk = int(opts.get("chunk", 32))
        self.max_length = int(opts.get("max_length", 2048))
        self.max_gen_toks = int(opts.get("max_gen_toks", 128))
        if self.chunk < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"chunk ({self.chunk}) and max_gen_toks ({self.max_gen_toks}) must be >= 1, max_length ({self.max_length}) >= 2")
        wa = opts.get("wa")
        lut = opts.get("lut")
        from lowbit.eval.variants import Variant

        try:
            Variant(kv=self.kv, lut=None if lut is None else _text(lut), wa=None if wa is None else _text(wa)).validate()
        except SpecError as exc:
            raise ValueError(f"lowbit model_args: {exc}") from exc
        from lowbit.models import load_model

        self.model, self.tokenizer = load_model(_text(opts.get("model", "smollm2")))
        self.model.eval()
        if wa is not None:
            from lowbit.eval.data import calibration_tokens
            from lowbit.wa import quantize_model

            quantize_model(self.model, _text(wa), calib=calibration_tokens(self.tokenizer), mode="fake")
        if lut is not None:
            from lowbit.lut import apply_spec

            apply_spec(self.model, _text(lut))
        self.max_length = min(self.max_length, getattr(self.model.config, "max_position_embeddings", self.max_length))

    # -- what TemplateLM needs -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else 0

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "lowbit").replace("/", "__")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum log-probability of `continuation` after `context`, and whether it is the greedy one."""
        if not continuation:
            raise ValueError("empty continuation")
        context = list(context) or [self.eot_token_id]
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:  # the continuation alone fills the window: score its last max_length tokens from their prefix
            context, continuation = (context + continuation)[-self.max_length - 1 : -self.max_length], continuation[-self.max_length :]
        else:
            context = context[-keep:]
        cache = make_cache(self.kv, self.model.config, self.model)
        dev = self.device
        ctx = torch.tensor([context], device=dev)
        logits = [self.model(ctx, **cache_kwargs(self.model, cache, use_cache=True)).logits[0, -1:]]
        feed = continuation[:-1]
        for s in range(0, len(feed), self.chunk):
            step = torch.tensor([feed[s : s + self.chunk]], device=dev)
            logits.append(self.model(step, **cache_kwargs(self.model, cache, use_cache=True)).logits[0])
        logprobs = torch.log_softmax(torch.cat(logits).float(), -1)
        target = torch.tensor(continuation, device=dev)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in requests:
            result = self.score(context, continuation)
            out.append(result)
            if key is not None and getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            total = sum(self.score(*make_disjoint_window(w))[0] for w in windows)
            out.append(total)
            if getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :] or [self.eot_token_id]
            x = torch.tensor([ids], device=self.device)
            cache = make_cache(self.kv, self.model.config, self.model)
            gen = self.model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                pad_token_id=self.eot_token_id, **cache_kwargs(self.model, cache),
            )
            text = self.tok_decode(gen[0, x.shape[1] :].tolist())
            cut = min((text.find(u) for u in until if u and u in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            out.append(text)
            if getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out

