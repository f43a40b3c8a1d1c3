"""`ixc25-finetune`: the official finetune.py command line, running on MindSpore (one process or under msrun)."""
from __future__ import annotations

import os
import sys

from ..weights import CheckpointError
from ..config import ConfigError
from ..processing import ImageError
from .args import parse_args
from .data import DataError
from .lora import AdapterError

ERRORS = (DataError, CheckpointError, ConfigError, ImageError, AdapterError, ValueError, OSError)


def check_output_dir(args) -> None:
    """--output_dir must be empty (or absent) unless --overwrite_output_dir or --resume_from_checkpoint."""
    d = args.output_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise DataError(f"--output_dir {d}: exists and is not a directory")
    if os.path.isdir(d) and os.listdir(d) and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise DataError(f"--output_dir {d}: not empty; pass --overwrite_output_dir True to write into it, or "
                        f"--resume_from_checkpoint to continue a run")
    os.makedirs(d, exist_ok=True)


def main(argv=None) -> int:
    """One process, or one worker of an msrun job (rank and world from MindSpore's communication: the same
    flags on every worker; rank 0 alone logs and writes)."""
    from .distributed import Comm, launched_workers
    from .trainer import Trainer, TrainingError
    comm = Comm() if launched_workers() > 1 else None
    rank, world = (comm.rank, comm.world) if comm else (0, 1)
    tag = f"ixc25-finetune (rank {rank} of {world})" if comm else "ixc25-finetune"
    log = print if rank == 0 else (lambda *a, **k: None)
    args = parse_args(argv, log=log)
    try:
        check_output_dir(args)
        trainer = Trainer(args, log=log, rank=rank, world=world, comm=comm)
        state = trainer.train()
    except TrainingError as e:
        print(f"{tag}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ERRORS as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        print(f"{tag}: error: {where}{' '.join(msg.split())}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if comm is None:
            raise
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        print(f"{tag}: error: a collective call failed, another worker of the job has stopped "
              f"({first.strip()[:200]}); resume with --resume_from_checkpoint", file=sys.stderr)
        return 3
    if rank != 0:
        return 0
    if not args.quiet:
        last = [h for h in state["log_history"] if "loss" in h]
        tail = f", last logged loss {last[-1]['loss']:.4f}" if last else ""
        print(f"ixc25-finetune: {state['global_step']} steps{tail}; wrote {os.path.abspath(args.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
