"""The training loop shared by the classifier and the segmenter.

What it guarantees:
- the same code on CPU and CUDA; on CUDA: AMP (bf16 where supported, else fp16 + GradScaler),
  channels_last, cudnn.benchmark, pinned-memory prefetching loaders;
- ``ckpt_dir/last.pt`` written atomically after EVERY epoch with everything needed to continue
  (weights, optimizer, scheduler, scaler, RNG states, history, best score, early-stopping counter),
  so a job killed by a time limit resumes and loses at most the epoch in progress;
- SIGTERM (Slurm's warning before SIGKILL) aborts the running epoch at the next batch, keeps the
  last complete checkpoint and exits non-zero (143);
- the epoch order and every sample's augmentation come from ``(seed, epoch, position)``, so a run
  resumed after an interruption makes the same choices as an uninterrupted one, and CPU runs are
  deterministic from the seed;
- a checkpoint resumes only the training that wrote it: ``fit(run_key=...)`` (see :func:`run_key`)
  stores the settings and inputs it was given, and a rerun after they changed (new pseudo-masks,
  another encoder) starts from scratch instead of continuing, or returning, the old model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler
from tqdm import tqdm

from hemocam import distributed as hd
from hemocam.io import atomic_path

logger = logging.getLogger("hemocam")

SIGTERM_EXIT = 128 + signal.SIGTERM


class TrainingInterrupted(SystemExit):
    """Raised after SIGTERM once the last complete epoch is safely on disk (exit status 143)."""

    def __init__(self, message: str):
        super().__init__(SIGTERM_EXIT)
        self.message = message

    def __str__(self):
        return self.message


# ----------------------------------------------------------------------------- seeding / device
def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    """Seed python, numpy and torch. ``deterministic`` (default: on CPU only) also asks torch for
    deterministic kernels; on CUDA we prefer cudnn.benchmark's speed over bitwise repeatability."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic is None:
        deterministic = not torch.cuda.is_available()
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (e.g. "cpu", "cuda:1"), else CUDA when available, else CPU."""
    if device not in (None, "", "auto"):
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (independent of worker layout)."""
    ss = np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(position)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1


class EpochSampler(Sampler):
    """Sampler that yields ``(index, sample_seed)`` pairs, reshuffled per epoch from the seed.

    ``weights`` (one per item) turn it into sampling with replacement (oversampling), drawing
    ``num_samples`` items per epoch. Datasets used with it take ``(index, seed)`` and derive any
    randomness (augmentation, random crops) from ``seed``: reproducible and resume-invariant.

    :meth:`set_shard` (called by :func:`fit` under DDP) gives rank ``r`` of ``w`` the positions
    ``r, r + w, r + 2w, ...`` of the epoch's order, padded by wrapping around to a multiple of
    ``w``: disjoint, equally long shares (equal batch counts, so no rank waits forever), and a
    sample's seed stays that of its position in the whole epoch.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, weights=None, num_samples: int | None = None):
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.weights = None if weights is None else np.asarray(weights, dtype=float)
        if self.weights is not None:
            if len(self.weights) != self.n or (self.weights < 0).any() or self.weights.sum() <= 0:
                raise ValueError("weights must be n non-negative numbers with a positive sum")
        self.num_samples = int(num_samples) if num_samples is not None else self.n
        self.epoch = 0
        self.rank, self.world = 0, 1

    def set_shard(self, rank: int, world: int) -> None:
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.world = int(rank), int(world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed % 2**32, self.epoch, 0x5EED])
        if self.weights is not None:
            return rng.choice(self.n, size=self.num_samples, replace=True, p=self.weights / self.weights.sum())
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return order[: self.num_samples] if self.num_samples <= self.n else np.resize(order, self.num_samples)

    def __iter__(self):
        if self.world == 1:
            for pos, idx in enumerate(self.indices()):
                yield int(idx), sample_seed(self.seed, self.epoch, pos)
            return
        order = self.indices()
        for pos in range(self.rank, len(self) * self.world, self.world):
            yield int(order[pos % len(order)]), sample_seed(self.seed, self.epoch, pos)

    def __len__(self):
        return -(-self.num_samples // self.world)  # ceil: every rank gets as many


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy/random follow it so library
    # randomness inside datasets is reproducible too. One thread per worker: no oversubscription.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    torch.set_num_threads(1)


def make_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    device,
    collate_fn=None,
    sampler=None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader set up for ``device``: on CUDA pinned memory, persistent workers, prefetching.

    ``num_workers`` is capped to the CPUs this process may use (minus one for the main process
    when there are several). The shuffled order is re-seeded per epoch by :func:`fit` from
    (seed, epoch), and a ``sampler`` with ``set_epoch`` gets told the epoch, so the order does
    not depend on whether the run was resumed. Randomness inside persistent workers continues
    across epochs; datasets that must be resume-invariant take seeds from :class:`EpochSampler`.
    """
    device = torch.device(device)
    cpus = available_cpus()
    if hd.world_size() > 1:  # the ranks of a DDP job share the allocation's CPUs
        cpus = max(1, cpus // hd.world_size())
    workers = max(0, min(int(num_workers), cpus - 1 if cpus > 2 else cpus))
    cuda = device.type == "cuda"
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    kwargs = dict(
        batch_size=int(batch_size),
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=cuda,
        drop_last=drop_last,
        worker_init_fn=_worker_init,
        generator=gen,
    )
    order_gen = None
    if sampler is None and shuffle:
        # a generator of its own for the order: the loader's generator also seeds workers when an
        # iterator is created, which happens at a different epoch after a resume
        order_gen = torch.Generator()
        sampler = RandomSampler(dataset, generator=order_gen)
    if sampler is not None:
        kwargs["sampler"] = sampler
    if workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = 4 if cuda else 2
    loader = DataLoader(dataset, **kwargs)
    loader._hemocam_seed = int(seed)  # read by set_loader_epoch
    loader._hemocam_order_gen = order_gen
    set_loader_epoch(loader, 1)
    return loader


def set_loader_epoch(loader, epoch: int) -> None:
    """Make the order of ``epoch`` a function of (seed, epoch) only: identical after a resume."""
    if loader is None:
        return
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    gen = getattr(loader, "_hemocam_order_gen", None)
    if gen is not None:
        gen.manual_seed(loader._hemocam_seed * 1000003 + epoch)


# ----------------------------------------------------------------------------- AMP / optimizer
def amp_dtype(device: torch.device, amp) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (True/"auto", "bf16", "fp16", False) on ``device``."""
    if device.type != "cuda" or amp in (False, None, "", "false", "off", "none"):
        return None  # CPU autocast is slower than fp32 on most CPUs
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases and normalisation weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01):
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return fn


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


_WHOLE_FILE = 1 << 20  # files up to 1 MiB are hashed whole
_SAMPLES, _SAMPLE = 4, 1 << 14


def file_fingerprint(path) -> tuple[str, int, str]:
    """(name, size, digest of the content): the same bytes rewritten later keep it.

    Files up to 1 MiB are hashed whole; larger ones (training caches) by four 16 KiB blocks at
    1/8, 3/8, 5/8 and 7/8 of their length: a cache remade from other data differs on every slice,
    one remade with other settings differs in size or in its meta file, and 25,000 caches cost
    1.6 GB of reads instead of 140 GB.
    """
    st = os.stat(path)
    return _fingerprint(os.fspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _fingerprint(path: str, size: int, _mtime_ns: int) -> tuple[str, int, str]:
    # keyed on the stat too: the classifier's two stages key the same files once
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if size <= _WHOLE_FILE:
            h.update(fh.read())
        else:
            for k in range(_SAMPLES):
                fh.seek((2 * k + 1) * size // (2 * _SAMPLES))
                h.update(fh.read(_SAMPLE))
    return Path(path).name, int(size), h.hexdigest()


def run_key(settings: dict, files=(), ignore=("epochs", "patience", "num_workers"), content: bool = True) -> str:
    """Identity of a training run: its settings (a flat dict) and the files it reads.

    Files count by name, size and content (:func:`file_fingerprint`), not modification time: a
    job that rewrites identical outputs (a rerun after new job batching) keeps a finished
    training. ``content=False`` is the key of versions before 2026-11-29 (name, size, mtime),
    for callers that accept it as an earlier key of the same run. The top-level ``ignore`` keys
    are left out: ``epochs`` and ``patience`` so that raising the epoch budget continues a run;
    ``num_workers`` does not change what is computed.
    """
    if content:
        stats = [file_fingerprint(f) for f in files]
    else:
        stats = []
        for f in files:
            st = os.stat(f)
            stats.append((Path(f).name, st.st_size, st.st_mtime_ns))
    kept = {k: v for k, v in settings.items() if k not in ignore}
    blob = json.dumps([kept, sorted(stats)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_checkpoint(obj: dict, path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _cpu_state_dict(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _SigtermFlag:
    """Turn SIGTERM into a flag checked between batches (only possible in the main thread)."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.hit:
            logger.warning("SIGTERM received: aborting the current epoch, last complete checkpoint is kept")
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _emit(log_fn, msg: str) -> None:
    logger.info(msg)
    if log_fn is not None:
        log_fn(msg)


def _to_float(x):
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().cpu())
    return float(x)


# ----------------------------------------------------------------------------- the loop
def fit(
    model: torch.nn.Module,
    train_loader,
    val_loader,
    *,
    loss_fn: Callable,
    evaluate_fn: Callable | None,
    ckpt_dir,
    epochs: int,
    lr: float,
    weight_decay: float,
    patience: int,
    amp=True,
    seed: int = 0,
    device=None,
    higher_is_better: bool = True,
    log: Callable[[str], None] | None = None,
    grad_clip: float | None = 1.0,
    warmup_epochs: float = 1.0,
    progress: bool = True,
    find_unused_parameters: bool = False,
    run_key: str | tuple[str, ...] | None = None,
    keep_last: bool = False,
) -> dict:
    """Train ``model`` with early stopping on the validation score; resume from ``ckpt_dir/last.pt``.

    ``loss_fn(model, batch, device) -> loss`` and ``evaluate_fn(model, loader, device) ->
    (score, metrics_dict)`` both run under autocast when AMP is on (``evaluate_fn`` also under
    ``torch.no_grad`` with ``model.eval()``). ``evaluate_fn=None`` or ``val_loader=None``: no
    validation, the score is the negative training loss and the last epoch is kept. Returns ``{"history": [...],
    "best_epoch", "best_score", "stopped_early", "best_path", "last_path"}`` with the best weights
    loaded into ``model``. ``keep_last``: validate and record every epoch, but run the whole budget
    and keep the last epoch (a pre-training stage whose schedule, not a small validation set,
    decides when it is done). Epochs are numbered from 1. ``run_key`` (:func:`run_key`): a checkpoint
    written under another key is discarded and training starts from scratch. A tuple: this run's
    key, then keys that earlier versions computed for the same run (an upgrade that changes what
    the key holds keeps finished trainings); checkpoints are written under the first.

    Under torch.distributed (several ranks, see :mod:`hemocam.distributed`): the model is wrapped
    in DistributedDataParallel (``find_unused_parameters`` when some parameters may get no
    gradient), the training sampler must be an :class:`EpochSampler` and is sharded over the
    ranks (each takes ``batch_size`` per step: the effective batch is ``batch_size x world``),
    the training loss is averaged over all ranks, rank 0 alone validates (the score goes to every
    rank, so all take the same early-stopping decision) and writes checkpoints, logs and
    progress, SIGTERM on any rank stops every rank at the same batch, and dropout draws from
    (seed, epoch, rank). Every rank resumes from ``last.pt`` and ends with the best weights.
    """
    device = select_device(device)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    cuda = device.type == "cuda"
    dtype = amp_dtype(device, amp)
    validate = evaluate_fn is not None and val_loader is not None
    sign = 1.0 if (higher_is_better or not validate) else -1.0
    world, rank = hd.world_size(), hd.rank()
    ddp, main = world > 1, rank == 0
    if ddp:
        sampler = getattr(train_loader, "sampler", None)
        if not hasattr(sampler, "set_shard"):
            raise ValueError("distributed training needs an EpochSampler as the training loader's sampler")
        sampler.set_shard(rank, world)
        if len(train_loader) == 0:
            raise ValueError(f"distributed training: {len(sampler)} samples per rank make no full batch")

    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    steps_per_epoch = max(1, len(train_loader))
    total = steps_per_epoch * max(1, int(epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(round(warmup_epochs * steps_per_epoch)) if epochs > 1 else 0)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))

    history: list[dict] = []
    start_epoch, best_score, best_epoch, bad_epochs, done, stopped_early = 1, None, 0, 0, False, False
    ck = torch.load(last_path, map_location="cpu", weights_only=False) if last_path.exists() else None
    keys = (run_key,) if isinstance(run_key, str) or run_key is None else tuple(run_key)
    run_key = keys[0]
    if ck is not None and run_key is not None and ck.get("run_key") not in keys:
        if main:
            _emit(log, f"{last_path} was written by a training with other settings or inputs: starting from scratch")
        for p in (last_path, best_path):
            p.unlink(missing_ok=True)
        ck = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        history, best_score, best_epoch = ck["history"], ck["best_score"], ck["best_epoch"]
        bad_epochs, start_epoch = ck["bad_epochs"], ck["epoch"] + 1
        # early stopping is final; reaching the epoch budget is not if the budget was raised
        stopped_early = bool(ck["stopped_early"])
        done = stopped_early or ck["epoch"] >= epochs
        if main:
            _emit(log, f"resuming from {last_path} after epoch {ck['epoch']} (best epoch {best_epoch})")

    train_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # built after the resume: it broadcasts rank 0's weights, which all ranks loaded anyway
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else None
        train_model = DistributedDataParallel(model, device_ids=ids,
                                              find_unused_parameters=find_unused_parameters)
        if main:
            _emit(log, f"DDP: {world} ranks, {len(train_loader)} batches per rank per epoch "
                       f"(effective batch {getattr(train_loader, 'batch_size', 0) or 0} x {world})")

    with _SigtermFlag() as sigterm:
        epoch = start_epoch
        while not done and epoch <= epochs:
            t0 = time.time()
            set_loader_epoch(train_loader, epoch)
            if ddp:  # dropout differs between ranks, and a resumed run repeats it
                torch.manual_seed(sample_seed(seed, epoch, 2**31 + rank))
            model.train()
            total_loss, n_batches = 0.0, 0
            bar = tqdm(
                train_loader, desc=f"epoch {epoch}/{epochs}", file=sys.stderr, mininterval=30,
                leave=False, disable=not progress or not main, dynamic_ncols=False, ncols=100,
            )
            try:
                for batch in bar:
                    if ddp and hd.any_rank(sigterm.hit, device):
                        sigterm.hit = True  # every rank stops at the same batch
                    if sigterm.hit:
                        break
                    with autocast(device, dtype):
                        loss = loss_fn(train_model, batch, device)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"epoch {epoch}: non-finite training loss {float(loss)}")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    total_loss += float(loss.detach())
                    n_batches += 1
            except RuntimeError:
                if not sigterm.hit:  # workers die from the same SIGTERM: that is an interruption
                    raise
            finally:
                bar.close()
            if sigterm.hit:
                msg = (f"interrupted by SIGTERM during epoch {epoch}; a rerun resumes after epoch {epoch - 1} "
                       f"from {last_path}")
                logger.error(msg)
                raise TrainingInterrupted(msg)
            if ddp:
                total_loss, n_batches = hd.all_sum([total_loss, n_batches], device)
            train_loss = total_loss / max(1, n_batches)
            metrics: dict = {}
            if validate:
                if main:
                    model.eval()
                    with torch.no_grad(), autocast(device, dtype):
                        score, metrics = evaluate_fn(model, val_loader, device)
                    score = _to_float(score)
                if ddp:
                    score, metrics = hd.broadcast(
                        (score, {k: _to_float(v) for k, v in metrics.items()}) if main else None)
            else:
                score = -train_loss
            if ddp and hd.any_rank(sigterm.hit, device):
                sigterm.hit = True
            if sigterm.hit:
                msg = f"interrupted by SIGTERM while validating epoch {epoch}; a rerun repeats it"
                logger.error(msg)
                raise TrainingInterrupted(msg)
            # without validation the schedule decides: the last epoch is kept (the lowest training
            # loss would only pick the most fitted one)
            improved = math.isfinite(score) and (keep_last or not validate or best_score is None
                                                 or sign * score > sign * best_score)
            if improved:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                if main:
                    save_checkpoint({"model": _cpu_state_dict(model), "epoch": epoch, "score": score}, best_path)
            else:
                bad_epochs += 1
            row = {"epoch": epoch, "train_loss": train_loss, "val_score": score,
                   **{k: _to_float(v) for k, v in metrics.items()},
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 3),
                   "best": improved}
            history.append(row)
            stop = validate and patience is not None and bad_epochs >= int(patience)
            done = stop or epoch >= epochs
            stopped_early = stop and epoch < epochs
            if not main:
                epoch += 1
                continue
            save_checkpoint(
                {"model": _cpu_state_dict(model), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "rng": _rng_state(), "history": history, "best_score": best_score,
                 "best_epoch": best_epoch, "bad_epochs": bad_epochs, "stopped_early": stop, "run_key": run_key},
                last_path,
            )
            extra = " ".join(f"{k}={_to_float(v):.4g}" for k, v in metrics.items())
            _emit(log, f"epoch {epoch}/{epochs} train_loss={train_loss:.4f} val_score={score:.4f} "
                       f"{extra} {'*best*' if improved else f'(no gain {bad_epochs}/{patience})'} "
                       f"{row['seconds']:.1f}s")
            if stopped_early:
                _emit(log, f"early stopping after epoch {epoch}: best epoch {best_epoch} score {best_score:.4f}")
            epoch += 1

    if ddp:
        del train_model  # its hooks go with it: a later fit() may wrap the same model again
        hd.barrier()  # rank 0 has written best.pt before any rank reads it
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    model.to(device)
    return {"history": history, "best_epoch": best_epoch, "best_score": best_score,
            "stopped_early": stopped_early, "best_path": str(best_path), "last_path": str(last_path)}
