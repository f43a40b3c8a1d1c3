"""Fast file I/O: the kernel copy (copy_file_range + early writeback), pread/pwrite loops, sha256 of ranges."""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ixc25_ms.weights import CheckpointError
from ixc25_ms.weights.safetensors import Span

from .units import ConversionError

IO_CHUNK = 8 << 20      # bytes per pread while hashing a file range apart from the writer
COPY_CHUNK = 64 << 20    # bytes per copy_file_range call; the disk write of each is started right after it
# sha256 threads beside the kernel copy: they read the source ranges apart; on 2 cores a second one took CPU
# from the copy and was slower (notes/conversion.md)
COPY_HASH_THREADS = max(1, min(2, (os.cpu_count() or 1) - 1))
TRACE = bool(os.environ.get("IXC25_CONVERT_TRACE"))  # per-shard timings of the write pipeline on stderr


@dataclass
class Out:
    """One tensor of an output shard: `data` (a Span copied in the kernel, an array written from memory, or
    None for a dropped tensor, hashed only) and `hashed` (what its sha256 is taken of)."""
    name: Optional[str]
    tag: Optional[str]
    shape: Tuple[int, ...]
    data: object
    hashed: object
    sha256: Optional[str] = None


_tls = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = memoryview(bytearray(IO_CHUNK))
    return buf


def _truncated(span: Span, got: int) -> CheckpointError:
    return CheckpointError(f"{span.path}: truncated file: byte range [{span.offset}, {span.offset + span.nbytes}) "
                           f"ends early at byte {span.offset + got} (file changed during conversion?)")


def sha256_of(obj) -> str:
    """sha256 of an array's bytes, or of a file range read in IO_CHUNK steps (hashlib and preadv release the
    GIL, so several of these run in parallel with the writer)."""
    if not isinstance(obj, Span):
        return hashlib.sha256(memoryview(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))).hexdigest()
    h = hashlib.sha256()
    buf = _buffer()
    fd = os.open(obj.path, os.O_RDONLY)
    try:
        done = 0
        while done < obj.nbytes:
            n = os.preadv(fd, [buf[:min(IO_CHUNK, obj.nbytes - done)]], obj.offset + done)
            if n <= 0:
                raise _truncated(obj, done)
            h.update(buf[:n])
            done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def check_size(path: str, total: int) -> int:
    """The size of the written file `path`, checked to be `total`."""
    size = os.path.getsize(path)
    if size != total:
        raise ConversionError(f"{path}: wrote {size} bytes, expected {total}")
    return size


def pwrite_all(fd: int, data, at: int, path: str) -> None:
    """All of `data` at offset `at` of fd (the file `path`), short writes continued."""
    done = 0
    while done < len(data):
        k = os.pwrite(fd, data[done:], at + done)
        if k <= 0:
            raise OSError(errno.EIO, "short write", path)
        done += k


def pread_into(dst: memoryview, span: Span, pos: int, fds: Dict[str, int]) -> None:
    """Fill `dst` from the span's bytes at `pos` on (`fds` holds the open source files); a file that ends
    early is reported as truncated."""
    fd = fds.get(span.path)
    if fd is None:
        fd = fds[span.path] = os.open(span.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
    done = 0
    while done < len(dst):
        k = os.preadv(fd, [dst[done:]], span.offset + pos + done)
        if k <= 0:
            raise _truncated(span, pos + done)
        done += k


def _runs(spans: List[Span]) -> List[Span]:
    """Consecutive spans that continue each other in the same file merged into one (one kernel copy each)."""
    out: List[Span] = []
    for sp in spans:
        if not sp.nbytes:
            continue
        if out and out[-1].path == sp.path and out[-1].offset + out[-1].nbytes == sp.offset:
            out[-1] = Span(sp.path, out[-1].offset, out[-1].nbytes + sp.nbytes)
        else:
            out.append(Span(sp.path, sp.offset, sp.nbytes))
    return out


_SYNC_FILE_RANGE = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start, without waiting for it, the disk write of [offset, offset + nbytes) of fd: sync_file_range(
    SYNC_FILE_RANGE_WRITE) through ctypes (Python's os lacks it), else posix_fadvise(DONTNEED), which starts
    it too. Without this the kernel leaves the disk idle until 10 % of memory is dirty."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        try:
            import ctypes
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            f.restype = ctypes.c_int
            _SYNC_FILE_RANGE = f
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
    if _SYNC_FILE_RANGE and _SYNC_FILE_RANGE(fd, offset, nbytes, 2) == 0:  # 2: SYNC_FILE_RANGE_WRITE
        return
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY)


def _copy_range(span: Span, fds: Dict[str, int], fd: int, at: int, path: str,
                on_first: Optional[Callable[[], None]]) -> bool:
    """Copy the span to fd (the file `path`) at `at` in the kernel (copy_file_range, COPY_CHUNK at a time, the
    disk write of each chunk started at once); `fds` holds the open source files. With `on_first` (called
    after the first chunk is copied): False if the kernel refuses that first call (the caller falls back)."""
    src_fd = fds.get(span.path)
    if src_fd is None:
        src_fd = fds[span.path] = os.open(span.path, os.O_RDONLY)
    done = 0
    while done < span.nbytes:
        try:
            k = os.copy_file_range(src_fd, fd, min(COPY_CHUNK, span.nbytes - done), span.offset + done, at + done)
        except OSError as e:
            if on_first is not None and e.errno in _NO_KERNEL_COPY:
                return False
            raise
        if on_first is not None:
            on_first()
            on_first = None
        if k == 0:  # end of file, or a filesystem that copies nothing: the rest through user space (a file that
            buf = _buffer()  # ends early is reported as truncated by pread_into)
            while done < span.nbytes:
                n = min(len(buf), span.nbytes - done)
                pread_into(buf[:n], span, done, fds)
                pwrite_all(fd, buf[:n], at + done, path)
                done += n
            return True
        _start_writeback(fd, at + done, k)
        done += k
    return True


def copy_stream(path: str, head: bytes, outs: List[Out], hash_outs: List[Out], total: int) -> bool:
    """write_stream's path when every tensor passes through unchanged (the default conversion): the header
    from memory, then the tensors as runs of source bytes copied by the kernel (copy_file_range, page cache to
    page cache, as `cp` does, with each chunk's disk write started at once), while COPY_HASH_THREADS threads
    take the sha256 of each tensor's source range. False, with nothing kept, where the kernel refuses such
    copies (another filesystem): the caller then streams through its buffers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fds: Dict[str, int] = {}
    errors: List[BaseException] = []
    jobs: "queue.Queue[Out]" = queue.Queue()
    busy = {"copy": 0.0, "hash": 0.0}
    threads: List[threading.Thread] = []

    def hash_loop() -> None:
        while not errors:
            try:
                o = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                t0 = time.perf_counter()
                o.sha256 = sha256_of(o.data)
                busy["hash"] += time.perf_counter() - t0
            except BaseException as e:  # surfaced by the caller
                errors.append(e)

    def start_hashing() -> None:  # the kernel copies: hash beside it
        for o in hash_outs:
            jobs.put(o)
        threads.extend(threading.Thread(target=hash_loop, name="ixc25-sha256", daemon=True)
                       for _ in range(COPY_HASH_THREADS))
        for t in threads:
            t.start()

    t_start = time.perf_counter()
    try:
        pwrite_all(fd, head, 0, path)
        at = len(head)
        for run in _runs([o.data for o in outs]):
            if not _copy_range(run, fds, fd, at, path, None if threads else start_hashing):
                return False
            at += run.nbytes
            if errors:
                break
        busy["copy"] = time.perf_counter() - t_start
        if not threads:  # nothing was copied (empty tensors only)
            for o in hash_outs:
                o.sha256 = sha256_of(o.data)
    except BaseException as e:
        errors.append(e)
    finally:
        for t in threads:
            t.join()
        for f in fds.values():
            os.close(f)
        os.close(fd)
    if errors:
        raise errors[0]
    if TRACE:
        print(f"[trace] {os.path.basename(path)}: {total / 1e6:.0f} MB in {time.perf_counter() - t_start:.2f} s "
              f"(kernel copy); copy {busy['copy']:.2f} s, hash {busy['hash']:.2f} s summed over "
              f"{COPY_HASH_THREADS} thread(s)", file=sys.stderr)
    return True
