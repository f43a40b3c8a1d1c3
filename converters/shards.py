"""The shard loop both directions share: progress, sha256 beside the writer, background fsync, MindSpore shards."""
from __future__ import annotations

import os
from typing import Callable, List, Tuple

from ixc25_ms.weights.safetensors import SafetensorsFile, Span, read_span
from ixc25_ms.weights.sources import ms_numpy_dtype

from . import pipeline
from .fastio import Out, sha256_of
from .outdir import fsync_path
from .plan import Plan
from .units import ConversionError

MS_TAG_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3, "I8": 4}  # safetensors' Dtype enum, descending


def ms_order(outs: List[Out]) -> List[Out]:
    """The order mindspore.save_checkpoint(format='safetensors') writes (safetensors sorts by dtype, largest
    enum first, then by name), so our shards are byte-identical to MindSpore's."""
    return sorted((o for o in outs if o.data is not None), key=lambda o: (MS_TAG_ORDER[o.tag], o.name))


def save_ms_shard(outs: List[Out], path: str, fmt: str) -> None:
    """One MindSpore shard (tests patch this to simulate failures). safetensors: written here, byte for byte
    what mindspore.save_checkpoint(format='safetensors') writes, without importing MindSpore or copying the
    tensors through user space; ckpt: through mindspore.save_checkpoint."""
    if fmt == "safetensors":
        pipeline.write_stream(path, ms_order(outs), {"format": "ms"})
        return
    import mindspore as ms
    tensors = []
    for o in outs:
        if o.data is None:
            continue
        arr = o.data if not isinstance(o.data, Span) else read_span(o.data, o.tag, o.shape, o.name)
        tensors.append({"name": o.name, "data": ms.Tensor.from_numpy(arr.view(ms_numpy_dtype(o.tag)))})
    ms.save_checkpoint(tensors, path, format=fmt)


class Hasher:
    """sha256 of shard tensors on pipeline.HASH_THREADS threads, overlapping the writer (one shard in flight)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=pipeline.HASH_THREADS, thread_name_prefix="ixc25-sha256")

    def start(self, outs: List[Out], separate: List[Out], tick=None) -> Callable[[bool], List[str]]:
        """Hash the outs in `separate` (in that order) on the pool while the shard is written; the returned
        function waits and gives the digests in the order of `outs`, taking `out.sha256` (set by the writer)
        for the others; given True it cancels instead."""
        def one(o):
            d = sha256_of(o.hashed)
            if tick:
                tick()
            return d
        fut = {id(o): self.pool.submit(one, o) for o in separate}

        def wait(cancel: bool = False) -> List[str]:
            if cancel:
                for f in fut.values():
                    f.cancel()
                return []
            try:
                got = []
                for o in outs:
                    if id(o) in fut:
                        got.append(fut[id(o)].result())
                    else:
                        if o.sha256 is None:
                            raise ConversionError(f"internal error: no sha256 for '{o.name}'")
                        got.append(o.sha256)
                        if tick:
                            tick()
                return got
            except BaseException:
                for f in fut.values():
                    f.cancel()
                raise
        return wait

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class Syncer:
    """fsync finished shards in one background thread, overlapping the work on the next shard."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ixc25-fsync")
        self.futures = []

    def add(self, path: str) -> None:
        self.futures.append(self.pool.submit(fsync_path, path))

    def join(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


class Progress:
    """Overall bar in bytes plus one bar per shard (tqdm, on stderr); cleared without trace on failure."""

    def __init__(self, total: int, quiet: bool, desc: str):
        self.quiet = quiet
        self.bar = self.sub = None
        if not quiet:
            from tqdm import tqdm
            self._tqdm = tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, position=0)

    def shard(self, n_items: int, desc: str):
        self.end_shard()
        if not self.quiet:
            self.sub = self._tqdm(total=n_items, unit="tensor", desc=desc, leave=False, position=1)

    def tick(self, _i: int = 0):
        if self.sub is not None:
            self.sub.update(1)

    def end_shard(self, nbytes: int = 0):
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self, ok: bool):
        self.end_shard()
        if self.bar is not None:
            self.bar.leave = ok
            self.bar.close()


def run_shards(plan: Plan, tmp: str, quiet: bool, label: str, fname_of, write_shard) -> None:
    """Shared shard loop of both directions: progress, hashing threads, background fsync, the source closed
    at the end. `write_shard(si, shard, fname, path, hasher, prog)` builds and writes one shard."""
    n = len(plan.shards)
    prog = Progress(plan.total_bytes, quiet, label)
    syncer = Syncer()
    hasher = Hasher()
    ok = False
    try:
        for si, shard in enumerate(plan.shards):
            fname = fname_of(si, n)
            path = os.path.join(tmp, fname)
            prog.shard(len(shard), f"shard {si + 1}/{n}")
            write_shard(si, shard, fname, path, hasher, prog)
            syncer.add(path)
            prog.end_shard(sum(it.out_nbytes for it in shard))
        ok = True
    finally:
        try:
            hasher.close()
            syncer.join()
        finally:
            plan.source.close()
            prog.close(ok)


def hash_and_write(hasher, prog, outs, to_hash, write) -> list:
    """Write one shard while its tensors are hashed on the hashing thread; returns the digests."""
    wait = hasher.start(outs, to_hash, prog.tick)
    try:
        write()
    except BaseException:
        wait(True)
        raise
    return wait()


def verify_written(path: str, want: List[Tuple[str, str, Tuple[int, ...]]]) -> None:
    """The header of the written shard `path` says exactly the planned [(name, tag, shape)]."""
    st = SafetensorsFile(path)
    got = {k: (st.dtype_tag(k), st.shape(k)) for k in st.keys()}
    exp = {k: (t, tuple(s)) for k, t, s in want}
    if got != exp:
        bad = sorted(set(got.items()) ^ set(exp.items()))
        raise ConversionError(f"{path}: written shard disagrees with the plan at key '{bad[0][0]}'")
