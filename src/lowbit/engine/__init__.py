"""A GPU serving engine where compression turns into throughput: a paged low-bit KV pool preallocated once
(:mod:`lowbit.engine.store`), KIVI pages written on the device (:mod:`lowbit.engine.kivi_ops`), a lean
Llama-family runner whose decode step is captured in CUDA graphs (:mod:`lowbit.engine.runner`), and the
continuous-batching loop (:mod:`lowbit.engine.core`). Every GPU kernel has a PyTorch path that runs anywhere."""

from lowbit.engine.core import EngineRequest, PagedEngine, StepStats
from lowbit.engine.store import KVStore, PagedFp16Store, PagedKiviStore, PoolFullError, make_store

__all__ = ["PagedEngine", "EngineRequest", "StepStats", "KVStore", "PagedFp16Store", "PagedKiviStore", "PoolFullError",
           "make_store"]
