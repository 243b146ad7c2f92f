"""``lowbit serve --tensor-parallel N``: one process per GPU (or CPU rank, gloo), started by ``torchrun``.

Every rank loads the model (and quantizes it whole under ``--wa``; the ranks check they hold the same weights), cuts its shard (:func:`lowbit.engine.parallel.shard_llama`) and builds the same
:class:`~lowbit.serve.paged.PagedServeEngine` around a :class:`~lowbit.engine.parallel.TensorParallelEngine`.
Rank 0 runs the HTTP server and the scheduler; the others replay its step plans (:meth:`follow`) until it stops.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from lowbit.spec import SpecError

TORCHRUN_HINT = "torchrun --nproc-per-node {n} -m lowbit.cli serve --tensor-parallel {n} ..."


def join_group(world: int) -> tuple[int, int]:
    """Join torchrun's process group (NCCL with CUDA, else gloo); ``(rank, world)``."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world:
        raise SpecError(f"--tensor-parallel {world} runs one process per rank under torchrun (WORLD_SIZE={env_world} "
                        f"here): start it as `{TORCHRUN_HINT.format(n=world)}`")
    rank = int(os.environ["RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():  # an idle server's followers wait in a broadcast: no timeout
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=365))
    return rank, world


def tensor_parallel_engine(model, tokenizer, rank: int, world: int, **engine_kwargs):
    """Shard `model` for `rank` and build the paged serving engine whose steps run in lockstep across ranks."""
    from lowbit.engine.parallel import TensorParallelEngine, check_same_weights, shard_llama
    from lowbit.serve.paged import PagedServeEngine

    try:
        check_same_weights(model)
        shard_llama(model, rank, world)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    from lowbit.wa.fuse import fuse_projections

    fuse_projections(model)  # each rank's q/k/v and gate/up shards as one W4Ax GEMM each (no-op without --wa)
    return PagedServeEngine(model, tokenizer, wrap=lambda e: TensorParallelEngine(e, rank, world), **engine_kwargs)


def follow(engine) -> None:
    """Ranks > 0: replay rank 0's steps until it stops."""
    engine.paged.follow()


def stop_followers(engine) -> None:
    """Rank 0, after the server stopped: release the other ranks."""
    engine.paged.step(stop=True)
