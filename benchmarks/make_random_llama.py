"""Build a random-weight Llama (about 1.2B parameters, GQA 32/8, head dim 64) with the SmolLM2 tokenizer."""
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained("benchmarks/assets/smollm2-tokenizer")
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=8192,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
tok.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()) / 1e9, "B params")
