"""Multi-GPU training inside one allocation: PyTorch DDP started through ``torchrun``.

The training rules (``train_classifier``, ``train_segmenter``) call :func:`train`. With one GPU
(the rules' default ``resources: gpu=1``) it trains in-process, exactly as before. When the job
is given more (``--set-resources train_classifier:gpu=4``, or ``gpu: 4`` under the rule in the
Slurm profile's ``set-resources``), it starts

    python -m torch.distributed.run --standalone --nproc_per_node=N -m hemocam.distributed WHAT ARGS

as a child process: one process per GPU (rank r on ``cuda:r``, NCCL), each running the same
training function; :func:`hemocam.train.fit` then wraps the model in DistributedDataParallel,
gives each rank a disjoint, equal share of every epoch, and lets rank 0 alone validate, write
checkpoints, logs and outputs. Each rank takes ``batch_size`` samples per step, so the effective
batch is ``batch_size x N``. The ranks' log lines go to the rule's log, prefixed ``[rank r/N]``.

SIGTERM (Slurm's warning before SIGKILL) sent to the rule's process is passed on to the ranks;
they stop together at the next batch, keep the last complete checkpoint and the job exits 143,
as in a single-process run. ``HEMOCAM_DDP_CPU=1`` makes the N processes CPU processes talking
over gloo instead (the tests use it: CI has no GPU).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("hemocam")

CPU_ENV = "HEMOCAM_DDP_CPU"  # "1": N gloo processes on the CPU instead of N GPUs
BACKEND_ENV = "HEMOCAM_DDP_BACKEND"  # set by the launcher for its ranks
TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 validates alone while the others wait
SHUTDOWN_S = 60  # torchrun's wait for the ranks after SIGTERM before it SIGKILLs them


# ----------------------------------------------------------------------------- rank helpers
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True in a single process and on rank 0: the one process that writes outputs."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; for small things like scores)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any of them."""
    if world_size() <= 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values, device) -> list[float]:
    """Element-wise sum of a list of floats over the ranks."""
    if world_size() <= 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ----------------------------------------------------------------------------- the launcher
def plan(gpus, cuda_devices: int, cpu: bool = False) -> tuple[int, str]:
    """``(processes, backend)`` for a job given ``gpus`` GPUs; ``(1, "")`` trains in-process.

    ``cpu`` (``HEMOCAM_DDP_CPU``): ``gpus`` gloo processes on the CPU. Asked for more GPUs
    than are visible, it uses the visible ones (one: in-process) and says so.
    """
    want = int(gpus or 0)
    if want <= 1:
        return 1, ""
    if cpu:
        return want, "gloo"
    if cuda_devices >= want:
        return want, "nccl"
    logger.warning("the job was given %d GPUs but %d are visible: training on %s", want, cuda_devices,
                   f"{cuda_devices} GPUs" if cuda_devices > 1 else "one device, in-process")
    return (cuda_devices, "nccl") if cuda_devices > 1 else (1, "")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _task(what: str):
    if what == "classifier":
        from hemocam.classifier import train_classifier

        return train_classifier
    if what == "segmenter":
        from hemocam.segmenter import train_segmenter

        return train_segmenter
    raise ValueError(f"unknown training task {what!r} (classifier | segmenter)")


def train(what: str, kwargs: dict, gpus=1, threads: int = 1):
    """Run training task ``what`` ("classifier" | "segmenter") with ``kwargs``: in-process for
    one GPU (or none), else on ``gpus`` DDP processes through torchrun (see the module doc)."""
    n, backend = plan(gpus, torch.cuda.device_count() if torch.cuda.is_available() else 0, _env_flag(CPU_ENV))
    if n <= 1:
        return _task(what)(**kwargs)
    return launch(what, kwargs, n, backend, threads)


def _stream(f):
    try:
        f.flush()
        return f.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def launch(what: str, kwargs: dict, nproc: int, backend: str, threads: int = 1) -> None:
    """Start ``nproc`` ranks of task ``what`` through torchrun and wait for them.

    Their output goes to this process's stdout/stderr (the rule's log). SIGTERM is passed on to
    the ranks themselves (torchrun's own handler would not wait for them if it got a second
    SIGTERM: under Slurm it already receives one); the job then exits 143. A failed rank fails
    the job.
    """
    from hemocam.train import TrainingInterrupted

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--shutdown_timeout={SHUTDOWN_S}", "-m", "hemocam.distributed", what,
           json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()})]
    per_rank = max(1, int(threads) // nproc)
    env = dict(os.environ, **{BACKEND_ENV: backend, "PYTHONUNBUFFERED": "1"},
               **{v: str(per_rank) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    logger.info("DDP: %d %s processes (%d threads each) for %s training via torchrun", nproc,
                "GPU/nccl" if backend == "nccl" else "CPU/gloo", per_rank, what)
    proc = subprocess.Popen(cmd, stdout=_stream(sys.stdout), stderr=_stream(sys.stderr), env=env)
    got: list[int] = []

    def forward(signum, frame):
        if not got:
            logger.warning("SIGTERM received: passing it on to the training processes")
        got.append(signum)
        for pid in _children(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
    except BaseException:  # KeyboardInterrupt: stop the ranks, do not leave them running
        forward(signal.SIGTERM, None)
        try:
            proc.wait(timeout=SHUTDOWN_S + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if got:
        msg = (f"{what} training interrupted by SIGTERM (torchrun exit status {rc}); a rerun resumes from "
               "the last complete checkpoint")
        logger.error(msg)
        raise TrainingInterrupted(msg)
    if rc != 0:
        raise RuntimeError(f"distributed {what} training failed: torchrun exit status {rc} (see the ranks' "
                           "messages above)")


# ----------------------------------------------------------------------------- one rank
def main(argv=None) -> None:
    """Entry point of each rank (started by torchrun): ``WHAT JSON_KWARGS``."""
    what, payload = (sys.argv[1:] if argv is None else argv)[:2]
    kwargs = json.loads(payload)
    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s [rank {r}/{w}] %(message)s")
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        device = f"cuda:{local_rank()}"
    else:
        device = "cpu"
    dist.init_process_group(backend, timeout=TIMEOUT)
    logger.info("%s training: rank %d of %d on %s (%s, %d threads)", what, r, w, device, backend,
                torch.get_num_threads())
    if r != 0:  # rank 0 tells the story; the others only report problems
        logger.setLevel(logging.WARNING)
    try:
        _task(what)(**kwargs, device=device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
