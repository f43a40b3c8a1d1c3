"""The atomic output directory: checks, free space, a temp dir beside it, publish by rename, stale-temp cleanup."""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable, List

from .plan import Plan
from .units import TOOL, ConversionError, human

PARTIAL_TAG = ".ixc25-partial-"
OLD_TAG = ".ixc25-old-"


def free_space_check(dst: str, need: int, what: str) -> None:
    probe = os.path.dirname(dst)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or "/").free
    if free < need:
        raise ConversionError(f"{dst}: not enough free disk space on {probe}: need {human(need)} ({what}), "
                              f"{human(free)} free")


def check_dst(src: str, dst: str, overwrite: bool) -> None:
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    src_dir = rs if os.path.isdir(rs) else os.path.dirname(rs)
    if rd == src_dir or rd.startswith(src_dir + os.sep) or src_dir.startswith(rd + os.sep):
        raise ConversionError(f"{dst}: destination must not be the source directory, inside it or around it")
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise ConversionError(f"{dst}: exists and is not a directory")
        if os.listdir(dst) and not overwrite:
            raise ConversionError(f"{dst}: directory is not empty; pass --overwrite to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dst: str) -> List[str]:
    """Remove leftovers of killed conversions into the same dst (their process is gone)."""
    parent, name = os.path.split(os.path.abspath(dst))
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        for tag in (PARTIAL_TAG, OLD_TAG):
            prefix = f".{name}{tag}"
            if entry.startswith(prefix) and entry[len(prefix):].isdigit():
                if not _pid_alive(int(entry[len(prefix):])):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                    removed.append(entry)
    return removed


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, dst: str, overwrite: bool) -> None:
    """Rename the finished temp dir onto dst (replacing it only with overwrite)."""
    parent, name = os.path.split(os.path.abspath(dst))
    if os.path.lexists(dst):
        if os.listdir(dst):
            if not overwrite:
                raise ConversionError(f"{dst}: directory is not empty; pass --overwrite to replace it")
            old = os.path.join(parent, f".{name}{OLD_TAG}{os.getpid()}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rmdir(dst)
            os.rename(tmp, dst)
    else:
        os.rename(tmp, dst)
    fsync_path(parent)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def copy_extra(plan: Plan, tmp: str) -> None:
    for name in plan.extra_files:
        shutil.copyfile(os.path.join(plan.src_dir, name), os.path.join(tmp, name))


def run_atomic(plan: Plan, dst: str, overwrite: bool, quiet: bool,
               write: Callable[[str, List[str]], dict]) -> dict:
    """Checks, temp dir next to dst, `write(tmp, warnings)`, publish by rename; on any failure the temp dir is
    removed. Returns write's summary with the warnings."""
    dst = os.path.abspath(dst)
    check_dst(plan.src, dst, overwrite)
    weights = plan.total_bytes
    extra = sum(os.path.getsize(os.path.join(plan.src_dir, f)) for f in plan.extra_files)
    overhead = 4096 * (len(plan.shards) + 4) + 600 * len(plan.items) + extra
    free_space_check(dst, weights + overhead, f"{human(weights)} of weights + {human(overhead)} of other files")
    clean_stale(dst)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}{PARTIAL_TAG}{os.getpid()}")
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        warnings: List[str] = []
        summary = write(tmp, warnings)
        for fn in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fn), 0o444)
        fsync_path(tmp)
        publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["warnings"] = warnings
    if warnings and not quiet:
        for w in warnings:
            print(f"{TOOL}: warning: {w}", file=sys.stderr)
    return summary
