"""Data parallelism under MindSpore's launcher (msrun): ranks, gradient all-reduce, optimizer-state sharding."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

BUCKET_BYTES = 64 << 20  # gradients are all-reduced in flat buckets of about this size (fewer collective calls)


def launched_workers() -> int:
    """Workers of the msrun job this process belongs to (MS_WORKER_NUM; msrun also runs the script as the
    scheduler, MS_ROLE=MS_SCHED, whose communication init serves the job), 1 outside msrun."""
    if os.environ.get("MS_ROLE") not in ("MS_WORKER", "MS_SCHED"):
        return 1
    return max(1, int(os.environ.get("MS_WORKER_NUM", "1")))


def zero_stage(deepspeed_config: Optional[str], explicit: int) -> int:
    """--zero_stage, else the stage of a --deepspeed JSON (its zero_optimization.stage), else 0."""
    if explicit:
        return explicit
    if not deepspeed_config or not os.path.isfile(deepspeed_config):
        return 0
    try:
        with open(deepspeed_config, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


class Comm:
    """The collective calls of one data-parallel worker (MindSpore communication ops; CPU backend: AllReduce,
    Broadcast and AllGather exist in 2.10, ReduceScatter does not)."""

    def __init__(self):
        from mindspore.communication import get_group_size, get_rank, init
        init()  # in msrun's scheduler process this serves the job and does not return
        self.rank, self.world = get_rank(), get_group_size()
        self._sum = ops.AllReduce(ops.ReduceOp.SUM)
        self._bcast = {}

    def all_sum(self, grads) -> List[Tensor]:
        """Each gradient summed over the workers, in flat buckets (one collective per bucket)."""
        out: List[Optional[Tensor]] = [None] * len(grads)
        bucket, size = [], 0
        for i, g in enumerate(grads):
            bucket.append(i)
            size += int(np.prod(g.shape)) * 4
            if size >= BUCKET_BYTES or i == len(grads) - 1:
                flat = ops.cat([grads[j].astype(ms.float32).reshape(-1) for j in bucket])
                flat = self._sum(flat)
                at = 0
                for j in bucket:
                    n = int(np.prod(grads[j].shape))
                    out[j] = flat[at:at + n].reshape(grads[j].shape)
                    at += n
                bucket, size = [], 0
        return out

    def reduce(self, grads, loss_sum: float, tokens: int, has_image: bool):
        """-> (summed gradients, mean logged loss, total tokens, whether any worker saw an image)."""
        s = self._sum(Tensor(np.array([loss_sum, tokens, float(has_image)], np.float32))).asnumpy()
        return self.all_sum(grads), float(s[0]) / self.world, int(round(s[1])), bool(s[2] > 0)

    def broadcast(self, params, root: int) -> None:
        """Parameters owned by `root` (sharded optimizer) copied to every worker, in place, as one flat buffer
        (the CPU Broadcast kernel takes one tensor)."""
        if not params:
            return
        if root not in self._bcast:
            self._bcast[root] = ops.Broadcast(root)
        sizes = [int(np.prod(p.shape)) for p in params]
        if self.rank == root:
            flat = ops.cat([p.astype(ms.float32).reshape(-1) for p in params])
        else:
            flat = ops.zeros((sum(sizes),), ms.float32)
        flat = self._bcast[root]((flat,))[0]
        if self.rank != root:
            at = 0
            for p, n in zip(params, sizes):
                p.set_data(flat[at:at + n].reshape(p.shape).astype(p.dtype))
                at += n

    def agree(self, flag: bool) -> bool:
        """True when every worker's flag is True (used to stop together)."""
        return float(self._sum(Tensor(np.array([float(not flag)], np.float32))).asnumpy()[0]) == 0.0


def shard_owners(sizes: Sequence[int], world: int) -> List[int]:
    """Owner rank of each parameter: greedy by size (largest first onto the least loaded rank)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=lambda r: load[r])
        owners[i] = r
        load[r] += sizes[i]
    return owners
