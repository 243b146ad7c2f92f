import torch
from lowbit.bench.paged import random_paged, _query
from lowbit.kernels.kivi_paged import paged_decode_attention
c = random_paged(8, 32768, 2); q = _query(8)
for _ in range(3): paged_decode_attention(q, c)
torch.cuda.synchronize()
