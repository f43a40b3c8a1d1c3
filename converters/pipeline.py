"""The buffer pipeline: a shard streamed through page-aligned buffers, hashed by threads, written with O_DIRECT."""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ixc25_ms.weights.safetensors import Span, header_bytes

from .fastio import TRACE, Out, check_size, copy_stream, pread_into, pwrite_all

DIRECT_CHUNK = 16 << 20  # bytes per output buffer / write (64 MB x 4 writers: no better, more memory)
DIRECT_BUFFERS = 16      # buffers in flight (being filled, hashed, written): 256 MB
DIRECT_WRITERS = 8       # concurrent O_DIRECT writes (one synchronous write at a time is ~3x slower)
USE_DIRECT = os.environ.get("IXC25_CONVERT_DIRECT", "1") != "0"  # "0": buffered writes (page cache)
HASH_THREADS = max(1, min(2, os.cpu_count() or 1))
USE_KERNEL_COPY = os.environ.get("IXC25_CONVERT_COPY", "1") != "0"  # "0": always the buffer pipeline


def write_stream(path: str, outs: List[Out], metadata: dict, hash_inline: bool = True) -> int:
    """Write a safetensors file of `outs` in the given order (dropped ones skipped); no fsync. Returns the size.

    When every tensor is a Span (its bytes pass through unchanged: the default conversion), the kernel copies
    them (`fastio.copy_stream`, unless IXC25_CONVERT_COPY=0). Otherwise the byte stream (header, then every
    tensor) goes through DIRECT_BUFFERS page-aligned buffers of DIRECT_CHUNK bytes: the calling thread fills a
    buffer (pread from the source file for a Span, a memory copy for an array), hash threads feed the same
    buffer to the sha256 of each tensor it holds (with hash_inline, for every out whose `hashed` is its
    `data`: the digest lands in `out.sha256` and is the hash of the very bytes handed to the disk;
    HASH_THREADS threads, tensors dealt round-robin), and DIRECT_WRITERS threads pwrite it with O_DIRECT (no
    copy into the page cache, several writes in flight; plain buffered writes where the filesystem refuses
    O_DIRECT).
    The last block is padded to 4096 bytes and the file truncated to its size."""
    kept = [o for o in outs if o.data is not None]
    head, off = header_bytes(((o.name, o.tag, o.shape, o.data.nbytes) for o in kept), metadata)
    segs: List[Tuple[object, Optional[Out]]] = [(memoryview(head), None)]
    segs += [(o.data if isinstance(o.data, Span) else
              memoryview(np.ascontiguousarray(o.data).reshape(-1).view(np.uint8)), o) for o in kept]
    total = len(head) + off
    if USE_KERNEL_COPY and all(isinstance(d, Span) for d, _ in segs[1:]):
        hash_outs = [o for _, o in segs[1:] if hash_inline and o.hashed is o.data]
        if copy_stream(path, head, [o for _, o in segs[1:]], hash_outs, total):
            return check_size(path, total)
    hashers = {id(o): hashlib.sha256() for _, o in segs
               if o is not None and hash_inline and o.hashed is o.data}

    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = USE_DIRECT and hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)
    except OSError as e:
        if not direct or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        direct = False
        fd = os.open(path, flags, 0o644)
    nbuf = max(1, min(DIRECT_BUFFERS, -(-total // DIRECT_CHUNK)))
    bufs = [mmap.mmap(-1, DIRECT_CHUNK) for _ in range(nbuf)]
    free: "queue.Queue[int]" = queue.Queue()
    for i in range(nbuf):
        free.put(i)
    hqs: List[queue.Queue] = [queue.Queue() for _ in range(HASH_THREADS)]
    wq: queue.Queue = queue.Queue()
    owner = {id(o): k % HASH_THREADS for k, (_, o) in enumerate(segs)}  # a tensor's pieces stay in order
    pending = [0] * nbuf
    lock = threading.Lock()
    errors: List[BaseException] = []
    busy = {"wait_free": 0.0, "fill": 0.0, "hash": 0.0, "write": 0.0}  # seconds, for IXC25_CONVERT_TRACE

    def release(i: int) -> None:
        with lock:
            pending[i] -= 1
            last = pending[i] == 0
        if last:
            free.put(i)

    def hash_loop(hq: queue.Queue) -> None:
        while True:
            job = hq.get()
            if job is None:
                return
            i, pieces = job
            try:
                if not errors:
                    t0 = time.perf_counter()
                    mv = memoryview(bufs[i])
                    for h, a, b in pieces:
                        h.update(mv[a:b])
                    busy["hash"] += time.perf_counter() - t0
            except BaseException as e:  # surfaced by the caller
                errors.append(e)
            finally:
                release(i)

    def write_loop() -> None:
        while True:
            job = wq.get()
            if job is None:
                return
            i, at, n = job
            try:
                if not errors:
                    t0 = time.perf_counter()
                    pwrite_all(fd, memoryview(bufs[i])[:n], at, path)
                    busy["write"] += time.perf_counter() - t0
            except BaseException as e:  # surfaced by the caller
                errors.append(e)
            finally:
                release(i)

    threads = [threading.Thread(target=hash_loop, args=(hq,), name="ixc25-sha256", daemon=True) for hq in hqs]
    threads += [threading.Thread(target=write_loop, name="ixc25-write", daemon=True)
                for _ in range(DIRECT_WRITERS)]
    for t in threads:
        t.start()
    fds: Dict[str, int] = {}
    try:
        seg_i, seg_pos, at = 0, 0, 0
        t_start = time.perf_counter()
        while at < total:
            t0 = time.perf_counter()
            i = free.get()
            t1 = time.perf_counter()
            busy["wait_free"] += t1 - t0
            if errors:
                break
            buf = memoryview(bufs[i])
            n, a, pieces = min(DIRECT_CHUNK, total - at), 0, [[] for _ in hqs]
            while a < n:
                data, o = segs[seg_i]
                take = min(n - a, data.nbytes - seg_pos)
                if isinstance(data, Span):
                    pread_into(buf[a:a + take], data, seg_pos, fds)
                elif take:
                    buf[a:a + take] = data[seg_pos:seg_pos + take]
                if take and o is not None and id(o) in hashers:
                    pieces[owner[id(o)]].append((hashers[id(o)], a, a + take))
                a += take
                seg_pos += take
                if seg_pos == data.nbytes:
                    seg_i, seg_pos = seg_i + 1, 0
            busy["fill"] += time.perf_counter() - t1
            wn = -(-n // 4096) * 4096 if direct else n
            if wn > n:
                buf[n:wn] = bytes(wn - n)
            pending[i] = 1 + len(hqs)
            for hq, pc in zip(hqs, pieces):
                hq.put((i, pc))
            wq.put((i, at, wn))
            at += n
    except BaseException as e:
        errors.append(e)
    finally:
        for hq in hqs:
            hq.put(None)
        for _ in range(DIRECT_WRITERS):
            wq.put(None)
        for t in threads:
            t.join()
        for f in fds.values():
            os.close(f)
        try:
            if not errors:
                os.ftruncate(fd, total)
        finally:
            os.close(fd)
    if errors:
        raise errors[0]
    if TRACE:
        print(f"[trace] {os.path.basename(path)}: {total / 1e6:.0f} MB in {time.perf_counter() - t_start:.2f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in busy.items())
              + f" (hash/write summed over {HASH_THREADS}/{DIRECT_WRITERS} threads)", file=sys.stderr)
    for _, o in segs:
        if o is not None and id(o) in hashers:
            o.sha256 = hashers[id(o)].hexdigest()
    return check_size(path, total)
