"""The slice classifier: data from the preprocess cache, training, slice probabilities.

- samples are whole scans (``classifier.window: 0``) or random runs of ``window`` neighbouring
  slices; the loader only reads the memory-mapped uint8 cache and pads scans to a batch;
- augmentation runs on the batch on the training device (torch ops, one affine warp per scan
  applied identically to all its slices: L-R flip, rotation, scale, shift; contrast/brightness
  jitter and noise), its parameters drawn from the sample's seed (see hemocam.train.EpochSampler)
  so a resumed run augments exactly like an uninterrupted one;
- loss: the RSNA weighted BCE (``any`` weight 2, subtypes 1) with ``pos_weight`` from the training
  label frequencies; optional oversampling of positive scans;
- validation: per-label AUC (rank formula, ties averaged) and the RSNA weighted log loss; early
  stopping on ``classifier.monitor``: ``auc_any`` (default; the teacher must rank slices, and with
  ``pos_weight`` the probabilities are deliberately not calibrated, so log loss picked epochs far
  too early in our runs) or ``logloss``.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hemocam import distributed as hd
from hemocam.batch import run_batch
from hemocam.io import InputError, read_tsv, write_tsv
from hemocam.labelset import LABELS
from hemocam.models.resnet_lstm import ResNetLSTM, ResNetLSTMEnsemble, load_bundle, members, save_bundle
from hemocam.preprocess import cache_paths, load_cache
from hemocam.settings import CLASSIFIER_EVALUATION_KEYS
from hemocam.stamps import MODEL_LIBRARIES, file_sig, file_stamps, stamps_folder
from hemocam.train import EpochSampler, amp_dtype, autocast, fit, make_loader, run_key, seed_everything, select_device

log = logging.getLogger("hemocam")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUG_DEFAULTS = {"flip": 0.5, "rotate_deg": 15.0, "scale": 0.1, "shift": 0.06, "contrast": 0.1,
                "brightness": 0.05, "noise": 0.02}
DEFAULTS = {"arch": "resnet34", "pretrained": "", "labels": list(LABELS), "lstm_hidden": 256, "lstm_layers": 2,
            "window": 0, "epochs": 30, "batch_size": 4, "lr": 3e-4, "weight_decay": 1e-4, "patience": 6,
            "num_workers": 8, "amp": True, "dropout": 0.3, "monitor": "auc_any", "pos_weight": "sqrt",
            "oversample_positive": 1.0, "tta": True, "aux_weight": 0.5,
            "slice_epochs": 9, "slice_batch_size": 32, "freeze_encoder": True, "encoder_stride": 32,
            "ensemble": 1, "augment": AUG_DEFAULTS}
# not part of a member's identity: raising ``ensemble`` keeps the members already trained
ENSEMBLE_KEYS = ("ensemble",)


def classifier_config(cfg: dict) -> dict:
    """``cfg["classifier"]`` with defaults filled in (and ``augment`` merged key by key)."""
    c = {**DEFAULTS, **(cfg.get("classifier") or {})}
    c["augment"] = {**AUG_DEFAULTS, **(c.get("augment") or {})}
    return c


def label_weights(labels) -> np.ndarray:
    """RSNA competition weights: ``any`` counts twice, each subtype once; normalised to sum 1."""
    w = np.array([2.0 if lab == "any" else 1.0 for lab in labels])
    return w / w.sum()


def input_norm(n_channels: int) -> dict:
    """Channel normalisation (ImageNet statistics; the mean statistic for channels beyond 3)."""
    mean = [IMAGENET_MEAN[i] if i < 3 else float(np.mean(IMAGENET_MEAN)) for i in range(n_channels)]
    std = [IMAGENET_STD[i] if i < 3 else float(np.mean(IMAGENET_STD)) for i in range(n_channels)]
    return {"mean": mean, "std": std}


def normalize(x: torch.Tensor, norm: dict) -> torch.Tensor:
    """uint8 (..., C, H, W) or float in [0, 1] -> normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    shape = (-1, 1, 1)
    mean = torch.tensor(norm["mean"], device=x.device, dtype=x.dtype).view(shape)
    std = torch.tensor(norm["std"], device=x.device, dtype=x.dtype).view(shape)
    return (x - mean) / std


def scan_input(cache, meta: dict, device=None) -> torch.Tensor:
    """A cache array (Z, C, S, S) uint8 -> the model input (1, Z, C, S, S) on ``device``.

    ``meta`` is the bundle meta (``input_norm``). Used by prediction and by the CAM stage.
    """
    x = torch.from_numpy(np.array(cache))[None]  # a copy: memmaps are read-only
    if device is not None:
        x = x.to(device, non_blocking=True)
    return normalize(x, meta["input_norm"])


# ----------------------------------------------------------------------------- metrics
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1..ends
    ranks = np.empty(len(x), float)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(y_true, score) -> float:
    """ROC AUC by the Mann-Whitney rank formula; NaN when one class is absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, float).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_losses(y_true, prob, eps: float = 1e-7) -> np.ndarray:
    """Per-label mean binary log loss, (N, L) -> (L,)."""
    p = np.clip(np.asarray(prob, float), eps, 1 - eps)
    y = np.asarray(y_true, float)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p)).mean(axis=0)


def weighted_log_loss(y_true, prob, labels) -> float:
    """The RSNA metric: per-slice weighted mean over labels of the binary log loss, averaged."""
    return float(np.dot(log_losses(y_true, prob), label_weights(labels)))


def slice_metrics(y_true: np.ndarray, prob: np.ndarray, labels) -> pd.DataFrame:
    """Rows per label (auc, logloss, n_pos, n) plus ``weighted`` (macro AUC, weighted log loss)."""
    ll = log_losses(y_true, prob)
    rows = [{"label": lab, "auc": auc(y_true[:, i], prob[:, i]), "logloss": float(ll[i]),
             "n_pos": int(y_true[:, i].sum()), "n": int(len(y_true))} for i, lab in enumerate(labels)]
    aucs = [r["auc"] for r in rows if not math.isnan(r["auc"])]
    rows.append({"label": "weighted", "auc": float(np.mean(aucs)) if aucs else float("nan"),
                 "logloss": weighted_log_loss(y_true, prob, labels),
                 "n_pos": int(y_true[:, 0].sum()) if len(labels) else 0, "n": int(len(y_true))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- data
def read_slice_labels(path, n_slices: int, labels) -> np.ndarray:
    """(n_slices, L) float32 from R/labels/{scan_id}.tsv, checked against the cache."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: slice labels missing")
    df = read_tsv(path)
    missing = [c for c in ("slice", *labels) if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    df = df.sort_values("slice")
    if len(df) != n_slices or not np.array_equal(df["slice"].to_numpy(), np.arange(n_slices)):
        raise InputError(f"{path}: labels for slices {len(df)} rows, scan has {n_slices} slices 0..{n_slices - 1}")
    y = df[list(labels)].to_numpy()
    if not np.isin(y, (0, 1)).all():
        raise InputError(f"{path}: labels must be 0/1")
    return y.astype(np.float32)


class ScanDataset(Dataset):
    """Scans (or runs of ``window`` slices) from R/cache; items are ``(index, seed)`` or ``index``.

    Returns dicts: ``x`` uint8 (T, C, S, S), ``y`` float32 (T, L) (zeros without labels),
    ``seed``, ``index`` (the scan's position), ``start`` (first slice of the run).
    """

    def __init__(self, results_dir, scan_ids, labels=LABELS, window: int = 0, train: bool = False,
                 with_labels: bool = True):
        self.results_dir = Path(results_dir)
        self.scan_ids = list(scan_ids)
        self.labels = list(labels)
        self.window = int(window or 0)
        self.train = bool(train)
        self.n_slices, self.y = [], []
        for sid in self.scan_ids:
            cache, meta_path = cache_paths(self.results_dir, sid)
            arr, _ = load_cache(cache, meta_path)  # validates; memmap, cheap
            self.n_slices.append(arr.shape[0])
            self.y.append(read_slice_labels(self.results_dir / "labels" / f"{sid}.tsv", arr.shape[0], self.labels)
                          if with_labels else np.zeros((arr.shape[0], len(self.labels)), np.float32))
        # training on windows: enough runs per scan to cover it about once per epoch
        self.items = []  # (scan, run): run r of a scan starts near r * window
        for i, n in enumerate(self.n_slices):
            reps = max(1, math.ceil(n / self.window)) if (self.train and self.window > 0) else 1
            self.items.extend((i, r) for r in range(reps))
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self):
        return len(self.items)

    def array(self, i: int) -> np.ndarray:
        if i not in self._arrays:  # opened lazily: each worker process maps the files itself
            self._arrays[i] = np.load(cache_paths(self.results_dir, self.scan_ids[i])[0], mmap_mode="r")
        return self._arrays[i]

    def positive_scans(self) -> np.ndarray:
        """Per item: does its scan contain any positive slice (for oversampling)."""
        return np.array([bool(self.y[i].any()) for i, _ in self.items])

    def __getitem__(self, item):
        idx, seed = item if isinstance(item, tuple) else (item, 0)
        i, r = self.items[idx]
        n = self.n_slices[i]
        start, stop = 0, n
        if self.train and 0 < self.window < n:
            # runs tile the scan once per epoch, each shifted by a random offset
            jitter = int(np.random.default_rng(seed).integers(0, self.window))
            start = min(r * self.window + jitter, n - self.window)
            stop = start + self.window
        x = torch.from_numpy(np.array(self.array(i)[start:stop]))  # a writable copy out of the memmap
        return {"x": x, "y": torch.from_numpy(self.y[i][start:stop]), "seed": int(seed), "index": i, "start": start}


def collate_scans(samples) -> dict:
    """Pad scans of different lengths to (B, T, C, S, S); ``lengths`` tells the real ones."""
    lengths = torch.tensor([s["x"].shape[0] for s in samples], dtype=torch.long)
    T = int(lengths.max())
    x = torch.zeros((len(samples), T, *samples[0]["x"].shape[1:]), dtype=torch.uint8)
    y = torch.zeros((len(samples), T, samples[0]["y"].shape[1]), dtype=torch.float32)
    for b, s in enumerate(samples):
        n = s["x"].shape[0]
        x[b, :n] = s["x"]
        y[b, :n] = s["y"]
    return {"x": x, "y": y, "lengths": lengths, "seeds": torch.tensor([s["seed"] for s in samples], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in samples]), "start": torch.tensor([s["start"] for s in samples])}


def augment(x: torch.Tensor, seeds, params: dict) -> torch.Tensor:
    """Augment a float batch (B, T, C, H, W) in [0, 1]; one draw per scan, shared by its slices."""
    B, T, C, H, W = x.shape
    theta = torch.zeros(B, 2, 3)
    gain = torch.ones(B)
    bias = torch.zeros(B)
    noise_seeds = []
    for b in range(B):
        g = torch.Generator().manual_seed(int(seeds[b]))
        u = torch.rand(7, generator=g)
        ang = math.radians(params["rotate_deg"]) * (2 * float(u[0]) - 1)
        s = 1.0 + params["scale"] * (2 * float(u[1]) - 1)
        flip = -1.0 if float(u[2]) < params["flip"] else 1.0
        tx, ty = (params["shift"] * 2 * (2 * float(u[k]) - 1) for k in (3, 4))  # grid units span 2
        cos, sin = math.cos(ang) / s, math.sin(ang) / s
        # output -> input sampling grid; flipping the x column mirrors left-right
        theta[b] = torch.tensor([[cos * flip, -sin, tx], [sin * flip, cos, ty]])
        gain[b] = 1.0 + params["contrast"] * (2 * float(u[5]) - 1)
        bias[b] = params["brightness"] * (2 * float(u[6]) - 1)
        noise_seeds.append(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    dev = x.device
    flat = x.reshape(B * T, C, H, W)
    grid = F.affine_grid(theta.to(dev).repeat_interleave(T, dim=0), list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid.to(flat.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(B, T, C, H, W) * gain.to(dev).view(B, 1, 1, 1, 1) + bias.to(dev).view(B, 1, 1, 1, 1)
    if params["noise"] > 0:
        # drawn on the device (a CPU draw + copy of the whole batch would dominate a GPU step)
        g = torch.Generator(device=dev).manual_seed(noise_seeds[0] ^ (B * 1_000_003))
        out = out + params["noise"] * torch.randn(out.shape, generator=g, device=dev, dtype=out.dtype)
    return out.clamp_(0.0, 1.0)


def batch_inputs(batch: dict, device, norm: dict, aug: dict | None = None) -> torch.Tensor:
    """uint8 batch -> normalised float on ``device`` (augmented when ``aug`` is given)."""
    x = batch["x"].to(device, non_blocking=True).float().div_(255.0)
    if aug is not None:
        x = augment(x, batch["seeds"].tolist(), aug)
    return normalize(x, norm)


def valid_mask(lengths, T: int, device) -> torch.Tensor:
    return torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None]


def weighted_bce(logits, y, lengths, weights: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """RSNA-weighted BCE over labels, mean over the real (unpadded) slices."""
    per = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight, reduction="none")
    per = (per * weights).sum(-1) / weights.sum()
    m = valid_mask(lengths, logits.shape[1], logits.device)
    return (per * m).sum() / m.sum().clamp_min(1)


def mean_probability(model, x, tta: bool, logits_of) -> torch.Tensor:
    """A classifier's probabilities for input ``x``: each member's views (``x`` and, with ``tta``,
    its L-R mirror: brains are near-symmetric) averaged in logit, the members in probability.
    ``logits_of(net, view)`` gives one member's float logits."""
    views = [x, x.flip(-1)] if tta else [x]
    nets = members(model)
    probs = 0
    for net in nets:
        probs = probs + torch.sigmoid(sum(logits_of(net, v) for v in views) / len(views))
    return probs / len(nets)


@torch.no_grad()
def predict_scans(model, loader, device, norm: dict, tta: bool = False, dtype=None):
    """Yield ``(index, start, probs (T, L) float32, y (T, L))`` for every scan of ``loader``."""
    model.eval()
    for batch in loader:
        x = batch_inputs(batch, device, norm)
        with autocast(device, dtype):
            probs = mean_probability(model, x, tta, lambda net, v: net(v, batch["lengths"]).float())
        probs = probs.cpu().numpy()
        for b, n in enumerate(batch["lengths"].tolist()):
            yield int(batch["index"][b]), int(batch["start"][b]), probs[b, :n], batch["y"][b, :n].numpy()


def evaluate(model, loader, device, labels, norm, monitor="logloss", tta=False, dtype=None):
    ys, ps = [], []
    for _, _, p, y in predict_scans(model, loader, device, norm, tta=tta, dtype=dtype):
        ps.append(p)
        ys.append(y)
    y, p = np.concatenate(ys), np.concatenate(ps)
    table = slice_metrics(y, p, labels)
    a = table.set_index("label")["auc"]
    metrics = {"val_logloss": float(table.iloc[-1]["logloss"]), "val_auc_any": float(a.get("any", np.nan)),
               "val_auc_mean": float(table.iloc[-1]["auc"])}
    if monitor == "auc_any" and math.isfinite(metrics["val_auc_any"]):
        # ties (AUC saturates on small validation sets) go to the better log loss
        score = metrics["val_auc_any"] - 1e-3 * metrics["val_logloss"]
    elif monitor == "auc_any":  # no positive (or no negative) validation slice: AUC undefined
        score = -metrics["val_logloss"]
    else:
        score = metrics["val_logloss"]
    return score, metrics, table


# ----------------------------------------------------------------------------- training
def _split_scans(scans_tsv, results_dir, labels) -> dict[str, list[str]]:
    df = read_tsv(scans_tsv, dtype={"scan_id": str, "split": str})
    df = df[(df["status"] == "ok")]
    out = {}
    for split in ("train", "val", "test"):
        ids = sorted(df.loc[df["split"].fillna("") == split, "scan_id"].astype(str))
        keep = []
        for sid in ids:
            cache, meta = cache_paths(results_dir, sid)
            lab = Path(results_dir) / "labels" / f"{sid}.tsv"
            if cache.exists() and meta.exists() and lab.exists():
                keep.append(sid)
            else:
                log.warning("classifier: %s (%s) skipped: %s", sid, split,
                            "no cache (rejected in preprocess?)" if not cache.exists() else "no slice labels")
        out[split] = keep
    return out


def pos_weights(ys: list[np.ndarray], mode) -> np.ndarray | None:
    if mode in (None, "", "none", False):
        return None
    y = np.concatenate(ys)
    pos = y.sum(0)
    neg = len(y) - pos
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    w = np.sqrt(ratio) if mode == "sqrt" else ratio
    return np.clip(w, 1.0, 10.0)


# settings only the scan stage reads: changing them must not retrain a finished slice stage
SCAN_STAGE_KEYS = ("window", "batch_size", "epochs", "patience", "freeze_encoder")


def stage_settings(c: dict, stage: str, seed: int, splits: dict) -> dict:
    """What identifies one training stage's run (for :func:`hemocam.train.run_key`).

    Settings that shape evaluation only (``tta``) are left out: changing them re-evaluates the
    finished model instead of training it again. The slice stage leaves out the scan stage's
    settings, and ``slice_epochs`` is its epoch budget (raising it continues the stage, like
    ``epochs`` for the scan stage). The scan stage keeps everything: it starts from the slice
    stage's weights. An ensemble's member is its ``seed``; the ensemble's size is left out.
    """
    s = {k: v for k, v in c.items() if k not in (*CLASSIFIER_EVALUATION_KEYS, *ENSEMBLE_KEYS)}
    s = {**s, "seed": seed, "stage": stage, "splits": splits}
    if stage == "slices":
        s = {k: v for k, v in s.items() if k not in (*SCAN_STAGE_KEYS, "slice_epochs")}
    return s


def train_classifier(cfg: dict, scans_tsv, results_dir, bundle_out, history_out, metrics_out, device=None) -> dict:
    """Train on split ``train``, early-stop on ``val``, evaluate the best epoch on ``test``.

    Writes the bundle, history.tsv (one row per epoch) and metrics.tsv (split, label, auc,
    logloss, n_pos, n; the ``weighted`` row has the RSNA weighted log loss). Checkpoints go to
    ``results_dir/classifier/checkpoints`` (a rerun resumes there). Returns a summary dict.
    """
    c = classifier_config(cfg)
    seed = int(cfg.get("seed", 0))
    labels = list(c["labels"])
    if labels[0] != "any" or not set(labels) <= set(LABELS):
        raise ValueError(f"classifier.labels must start with 'any' and be among {LABELS}, got {labels}")
    results_dir = Path(results_dir)
    splits = _split_scans(scans_tsv, results_dir, labels)
    if not splits["train"]:
        raise InputError(f"{scans_tsv}: no usable training scans (split 'train' with cache and labels)")
    log.info("classifier: %d train, %d val, %d test scans", *(len(splits[s]) for s in ("train", "val", "test")))
    seed_everything(seed)
    device = select_device(device)
    dtype = amp_dtype(device, c["amp"])

    metas = [load_cache(*cache_paths(results_dir, s))[1] for s in splits["train"] + splits["val"] + splits["test"]]
    ref = metas[0]
    for m, sid in zip(metas, splits["train"] + splits["val"] + splits["test"]):
        if m["size"] != ref["size"] or m["windows"] != ref["windows"]:
            raise InputError(f"{sid}: cache made with other windows/size than {splits['train'][0]}")
    n_channels = len(ref["windows"])
    norm = input_norm(n_channels)

    eval_bs = max(1, int(c["batch_size"]))

    def eval_loader(ids):
        if not ids:
            return None
        ds = ScanDataset(results_dir, ids, labels, window=0, train=False)
        return make_loader(ds, eval_bs, False, min(2, int(c["num_workers"])), seed, device, collate_fn=collate_scans)

    def train_loader(window, batch_size, seed):
        ds = ScanDataset(results_dir, splits["train"], labels, window=window, train=True)
        weights = None
        if float(c["oversample_positive"]) != 1.0:
            weights = np.where(ds.positive_scans(), float(c["oversample_positive"]), 1.0)
        sampler = EpochSampler(len(ds), shuffle=True, seed=seed, weights=weights)
        return make_loader(ds, batch_size, True, c["num_workers"], seed, device, collate_fn=collate_scans,
                           sampler=sampler)

    val_loader = eval_loader(splits["val"])
    if val_loader is None:
        log.warning("classifier: no validation scans: training for all epochs, keeping the last")

    n_members = int(c["ensemble"])
    if n_members < 1:
        raise ValueError(f"classifier.ensemble must be >= 1, got {n_members}")

    def new_model():
        return ResNetLSTM(c["arch"], in_channels=n_channels, n_labels=len(labels), lstm_hidden=c["lstm_hidden"],
                          lstm_layers=c["lstm_layers"], dropout=c["dropout"], pretrained=c["pretrained"] or None,
                          encoder_stride=int(c["encoder_stride"]))

    model = new_model()
    lw = torch.tensor(label_weights(labels), dtype=torch.float32, device=device)
    train_y = [read_slice_labels(results_dir / "labels" / f"{sid}.tsv", load_cache(*cache_paths(results_dir, sid))[0].shape[0], labels)
               for sid in splits["train"]]
    pw = pos_weights(train_y, c["pos_weight"])
    pw_t = None if pw is None else torch.tensor(pw, dtype=torch.float32, device=device)
    if pw is not None:
        log.info("classifier: pos_weight %s", dict(zip(labels, np.round(pw, 2).tolist())))
    aug = c["augment"] if c["augment"] else None

    aux_w = float(c["aux_weight"])

    def loss_fn(model, batch, device):
        x = batch_inputs(batch, device, norm, aug)
        y = batch["y"].to(device, non_blocking=True)
        logits, aux = model(x, batch["lengths"], return_aux=True)
        loss = weighted_bce(logits, y, batch["lengths"], lw, pw_t)
        if aux_w > 0:
            loss = loss + aux_w * weighted_bce(aux, y, batch["lengths"], lw, pw_t)
        return loss

    monitor = c["monitor"]
    if monitor not in ("logloss", "auc_any"):
        raise ValueError(f"classifier.monitor must be logloss or auc_any, got {monitor!r}")

    def evaluate_fn(model, loader, device):
        score, metrics, _ = evaluate(model, loader, device, labels, norm, monitor, tta=False, dtype=dtype)
        return score, metrics

    # stage "slices" (optional): the CNN learns from shuffled single slices (many small, diverse
    # batches: the RSNA winners' first stage); stage "scans": the whole model on scans/windows
    # (with freeze_encoder: the LSTM and heads on the first stage's CNN). The slice stage runs its
    # whole schedule and hands on its last epoch: on the 40-scan demo its validation AUC peaked
    # at epoch 1, an untrained CNN, because 23 of the 73 bleeding validation slices are one thin
    # subdural that no epoch learns while the others' ranks improve.
    stages = []
    if int(c["slice_epochs"]) > 0:
        stages.append(("slices", 1, int(c["slice_batch_size"]), int(c["slice_epochs"])))
    stages.append(("scans", int(c["window"]), int(c["batch_size"]), int(c["epochs"])))
    ckpt_root = results_dir / "classifier" / "checkpoints"
    inputs = [f for sid in splits["train"] + splits["val"]
              for f in (*cache_paths(results_dir, sid), results_dir / "labels" / f"{sid}.tsv")]
    histories, trained, member_records = [], [], []
    # member k trains like a single model with seed + k; member 0 is the single model itself
    # (same seed, checkpoints and key), so a run that raises ``ensemble`` keeps it
    for member in range(n_members):
        member_seed = seed + member
        if member:
            seed_everything(member_seed)
            model = new_model()
        member_root = ckpt_root / f"member{member}" if member else ckpt_root
        for name, window, batch_size, epochs in stages:
            ckpt_dir = member_root / name if len(stages) > 1 else member_root
            frozen = name == "scans" and len(stages) > 1 and bool(c["freeze_encoder"])
            log.info("classifier %sstage %s: window=%s batch=%d epochs=%d%s",
                     f"member {member + 1}/{n_members} (seed {member_seed}) " if n_members > 1 else "", name,
                     window or "scan", batch_size, epochs, ", encoder frozen" if frozen else "")
            model.freeze_encoder(frozen)
            result = fit(model, train_loader(window, batch_size, member_seed), val_loader, loss_fn=loss_fn,
                         evaluate_fn=evaluate_fn if val_loader else None, ckpt_dir=ckpt_dir, epochs=epochs,
                         lr=float(c["lr"]), weight_decay=float(c["weight_decay"]), patience=int(c["patience"]),
                         amp=c["amp"], seed=member_seed, device=device, higher_is_better=(monitor == "auc_any"),
                         find_unused_parameters=aux_w <= 0,  # DDP: the aux head is then unused
                         keep_last=name == "slices" and len(stages) > 1,
                         # before 2026-11-29 the key held tta and the files' mtimes
                         run_key=tuple(run_key({**stage_settings(c, name, member_seed, splits), **extra}, inputs,
                                               content=content)
                                       for extra, content in (({}, True),
                                                              ({k: c[k] for k in CLASSIFIER_EVALUATION_KEYS}, False))))
            model.freeze_encoder(False)
            h = pd.DataFrame(result["history"])
            h.insert(0, "stage", name if n_members == 1 else f"member {member + 1} {name}")
            histories.append(h)
        trained.append(model)
        member_records.append({"seed": member_seed, "best_epoch": int(result["best_epoch"]),
                               "best_score": result["best_score"]})
    first = member_records[0]  # an ensemble's bundle describes member 0 like a single model, its members in ``members``
    model = trained[0] if n_members == 1 else ResNetLSTMEnsemble(trained)
    history = pd.concat(histories, ignore_index=True)
    if not hd.is_main():  # DDP: rank 0 evaluates and writes the outputs
        return {"best_epoch": first["best_epoch"], "metrics": None, "history": history}
    write_tsv(history, history_out)

    eval_split = "test" if splits["test"] else ("val" if splits["val"] else "train")
    loader = eval_loader(splits[eval_split])
    _, _, table = evaluate(model, loader, device, labels, norm, monitor, tta=bool(c["tta"]), dtype=dtype)
    table.insert(0, "split", eval_split)
    write_tsv(table, metrics_out, float_format="%.6g")
    for r in table.itertuples():
        log.info("classifier %s %-16s auc=%.4f logloss=%.4f n_pos=%d n=%d", eval_split, r.label, r.auc, r.logloss,
                 r.n_pos, r.n)

    meta = {
        "labels": labels, "windows": ref["windows"], "channels": ref.get("channels"), "size": ref["size"],
        "skull_strip": ref.get("skull_strip"), "input_norm": norm, "tta": bool(c["tta"]),
        "config": {k: cfg[k] for k in ("seed", "preprocess", "classifier") if k in cfg},
        "seed": seed, "world_size": hd.world_size(), "epoch": first["best_epoch"],
        "best_epoch": first["best_epoch"],
        "best_score": first["best_score"], "monitor": monitor,
        "n_scans": {k: len(v) for k, v in splits.items()},
        "metrics": {"split": eval_split, **{r.label: {"auc": r.auc, "logloss": r.logloss} for r in table.itertuples()}},
        **({"members": member_records} if n_members > 1 else {}),
    }
    save_bundle(bundle_out, model, meta)
    return {"best_epoch": first["best_epoch"], "metrics": table, "history": history}


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_cache(model, cache, meta: dict, device, tta: bool = True, chunk: int = 64) -> np.ndarray:
    """Slice probabilities (Z, L) for one scan's cache (averaged as :func:`mean_probability`);
    the CNN runs in chunks of slices."""
    device = torch.device(device)
    dtype = amp_dtype(device, True)
    model.eval()
    x = scan_input(cache, meta, device)[0]  # (Z, C, S, S)

    def logits_of(net, v):
        feats = torch.cat([net.encode(v[i : i + chunk]) for i in range(0, v.shape[0], chunk)])
        return net.sequence(feats[None]).float()[0]

    with autocast(device, dtype):
        probs = mean_probability(model, x, tta, logits_of)
    return probs.cpu().numpy()


def classify_scan(scan_id, model, meta, results_dir, device, tta=True) -> dict:
    results_dir = Path(results_dir)
    cache, cmeta = load_cache(*cache_paths(results_dir, scan_id))
    if cmeta["size"] != meta["size"] or cmeta["windows"] != meta["windows"]:
        raise InputError(f"{cache_paths(results_dir, scan_id)[0]}: cache size/windows differ from the classifier's "
                         f"({cmeta['size']} {cmeta['windows']} vs {meta['size']} {meta['windows']})")
    probs = predict_cache(model, cache, meta, device, tta=tta)
    df = pd.DataFrame(probs, columns=meta["labels"])
    df.insert(0, "slice", np.arange(len(df)))
    write_tsv(df, results_dir / "classifier" / "slices" / f"{scan_id}.tsv", float_format="%.6f")
    return {"n_slices": int(len(df)), "p_any_max": round(float(df["any"].max()), 6)}


def predict_batch(bundle_path, scan_ids, results_dir, manifest_out, upstream=(), device=None, tta=None):
    """Slice probabilities for a batch of scans; the model is loaded once.

    Writes results_dir/classifier/slices/{scan_id}.tsv (slice, then one column per label, ``any``
    first) and the batch manifest. A scan without cache is rejected.
    """
    device = select_device(device)
    model, meta = load_bundle(bundle_path, device)
    tta = meta.get("tta", True) if tta is None else tta
    fn = functools.partial(classify_scan, model=model, meta=meta, results_dir=results_dir, device=device, tta=tta)
    R = Path(results_dir)
    stamps = file_stamps(stamps_folder(manifest_out), lambda sid: cache_paths(R, sid),
                         lambda sid: [R / "classifier" / "slices" / f"{sid}.tsv"],
                         {"bundle": file_sig(bundle_path), "tta": bool(tta), "device": device.type},
                         libraries=MODEL_LIBRARIES)
    return run_batch("classify", list(scan_ids), fn, manifest_out, upstream=upstream, stamps=stamps)
