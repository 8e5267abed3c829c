"""The U-Net segmenter: trained on pseudo-masks (or ground truth, for the upper bound), applied to
every scan.

Data: one sample = one slice of the cache with ``context`` neighbours on each side (edge slices
repeat the end slice), target = the pseudo-mask (or GT mask) resampled into the cache frame with
:func:`hemocam.preprocess.from_original_grid` (nearest). Sampling per epoch draws a
``pos_fraction`` share of slices whose target is non-empty (lesion slices are a minority), the
rest from empty slices. With pseudo-mask targets, slices whose *label* says hemorrhage but whose
pseudo-mask is empty are left out: they are not negatives, only places the CAM missed.

Augmentation (train only, from the per-sample seed, so resumed runs repeat it): left-right flip,
small rotation/scale/shift (one affine warp for image and target), brightness/contrast jitter and
a little noise. Loss: BCE + soft Dice over the batch. Validation score (early stopping and the
kept epoch): mean per-scan 3-D Dice, in the cache frame, over the validation scans whose target
is non-empty, against the same kind of target (pseudo-masks for the weak model: no ground truth
is read unless ``target == "groundtruth"``); the all-scan mean and the share of negative scans
with any false positive are logged beside it. Training runs through :func:`hemocam.train.fit`.
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

from hemocam import distributed as hd
from hemocam.batch import run_batch
from hemocam.io import InputError, atomic_path, load_nifti, read_tsv, save_nifti, write_tsv
from hemocam.metrics import remove_small_components
from hemocam.models.unet import UNet, UNetEnsemble, in_channels_for
from hemocam.preprocess import cache_paths, from_original_grid, load_cache, to_original_grid
from hemocam.pseudomask import positive_slices, slice_gate_path
from hemocam.settings import SEGMENTER_OUTPUT_KEYS, SELF_TRAINING_TARGET, check_renamed, segmenter_training
from hemocam.stamps import MODEL_LIBRARIES, file_sig, file_stamps, stamps_folder
from hemocam.train import amp_dtype, autocast, fit, make_loader, run_key, seed_everything, select_device, EpochSampler

log = logging.getLogger("hemocam")

BUNDLE_FORMAT = 1
TARGETS = {"pseudomask": "pseudomask", "groundtruth": "masks"}

DEFAULTS = {
    "encoder": "resnet18",
    "base_channels": 16,  # plain encoder width
    "weights": "",  # local ImageNet weights for a resnet encoder
    "context_slices": 1,
    "epochs": 40,
    "batch_size": 16,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "patience": 8,
    "num_workers": 8,
    "amp": True,
    "pos_fraction": 0.5,  # share of lesion slices in each epoch's draw
    "samples_per_epoch": 0,  # 0: as many draws as training slices
    "augment": True,
    "crop": 0,  # train on crop x crop windows (lesion-centred for lesion slices); 0: whole slices
    "crop_lesion_p": 0.5,  # share of lesion-slice crops centred on a lesion pixel (others: anywhere)
    "rotate_deg": 10.0,
    "scale": 0.1,
    "shift": 0.06,  # fraction of S
    "intensity": 0.1,  # brightness/contrast jitter (fraction)
    "noise": 0.02,
    "dice_weight": 1.0,  # loss = BCE + dice_weight * soft Dice
    "threshold": 0.5,  # probability -> mask
    "min_component_ml": 0.35,  # smaller 3-D components dropped from the binary output
    # output voxels must be hyperdense: pseudo-masks hold only pseudomask.hu_min..hu_max voxels, but
    # the network smooths their edges into brain tissue; a margin below hu_min keeps partial volume
    "hu_min": 40,
    "hu_max": 120,
    "tta_flip": True,  # average with the left-right flipped prediction at inference
    "infer_batch": 32,
}


def seg_cfg(cfg_seg: dict | None) -> dict:
    check_renamed({"segmenter": cfg_seg})
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (cfg_seg or {}).items() if v is not None})
    return out


# ----------------------------------------------------------------------------- inputs
def context_stack(cache: np.ndarray, z: int, k: int) -> np.ndarray:
    """(C*(2k+1), S, S) uint8: slices z-k..z+k (clamped at the ends), channels grouped by slice."""
    Z = cache.shape[0]
    idx = np.clip(np.arange(z - k, z + k + 1), 0, Z - 1)
    return np.asarray(cache[idx]).reshape(-1, *cache.shape[2:])


def all_stacks(cache: np.ndarray, k: int) -> np.ndarray:
    """(Z, C*(2k+1), S, S) for every slice of a scan, without Python loops over slices."""
    c = np.asarray(cache)
    Z = c.shape[0]
    idx = np.clip(np.arange(Z)[:, None] + np.arange(-k, k + 1)[None, :], 0, Z - 1)
    return c[idx].reshape(Z, -1, *c.shape[2:])


def to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 windowed channels -> float in [0, 1] (the bundle records this scaling)."""
    return x_uint8.float().div_(255.0)


def check_target(target: str) -> str:
    if target not in TARGETS and not SELF_TRAINING_TARGET.fullmatch(str(target)):
        raise ValueError(f"target must be one of {sorted(TARGETS)} or pseudomask_r<round>, got {target!r}")
    return target


def target_path(scan_id: str, results_dir, target: str) -> Path:
    return Path(results_dir) / TARGETS.get(check_target(target), target) / f"{scan_id}.nii.gz"


def load_target(scan_id: str, results_dir, target: str, meta: dict) -> np.ndarray:
    """(Z, S, S) uint8 0/1 target in the cache frame."""
    path = target_path(scan_id, results_dir, target)
    if not path.exists():
        raise InputError(f"{path}: missing {target} mask")
    arr, _ = load_nifti(path)
    return (from_original_grid((arr > 0).astype(np.uint8), meta, order=0) > 0).astype(np.uint8)


class SliceDataset(torch.utils.data.Dataset):
    """Slices of several scans. Items are ``(scan_index, z)``; returns ``(x, y, scan_index, z)``.

    Indexing with ``(i, seed)`` (as :class:`hemocam.train.EpochSampler` yields) augments with
    that seed when ``augment`` is set; a plain ``i`` never augments.
    """

    def __init__(self, cache_files, targets, items, context: int, augment: dict | None = None, crop: int = 0,
                 crop_lesion_p: float = 0.5):
        # caches are opened lazily (memory-mapped) in each worker: nothing big is pickled
        self.cache_files, self.context, self.augment = [str(c) for c in cache_files], int(context), augment
        self._caches = None
        self.crop, self.crop_lesion_p = int(crop or 0), float(crop_lesion_p)
        # targets kept sparse (only non-empty slices): memory stays small for big cohorts
        self.targets = [{int(z): np.packbits(t[z]) for z in np.flatnonzero(t.reshape(len(t), -1).any(1))} for t in targets]
        self.shapes = [t.shape[1:] for t in targets]
        self.items = [(int(s), int(z)) for s, z in items]

    def __len__(self):
        return len(self.items)

    def positive(self) -> np.ndarray:
        return np.array([z in self.targets[s] for s, z in self.items], bool)

    def __getstate__(self):
        return {**self.__dict__, "_caches": None}

    def cache(self, s):
        if self._caches is None:
            self._caches = [None] * len(self.cache_files)
        if self._caches[s] is None:
            self._caches[s] = np.load(self.cache_files[s], mmap_mode="r")
        return self._caches[s]

    def _target(self, s, z):
        shape = self.shapes[s]
        packed = self.targets[s].get(z)
        if packed is None:
            return np.zeros(shape, np.uint8)
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        s, z = self.items[i]
        x = to_input(torch.from_numpy(context_stack(self.cache(s), z, self.context)))
        y = torch.from_numpy(self._target(s, z)).float()[None]
        if seed is not None:
            rng = np.random.default_rng(seed)
            if self.augment:
                x, y = augment_pair(x, y, rng, self.augment)
            if 0 < self.crop < x.shape[-1]:
                x, y = crop_pair(x, y, self.crop, rng, self.crop_lesion_p)
        return x, y, s, z


def crop_pair(x: torch.Tensor, y: torch.Tensor, size: int, rng: np.random.Generator, p_lesion: float = 0.5):
    """A size x size window: around a random lesion pixel (with probability ``p_lesion`` when the
    target has one), else anywhere. Training on crops costs (size/S)^2 of a full slice; the
    network is fully convolutional, so inference still runs on whole slices."""
    H, W = x.shape[-2:]
    fg = torch.nonzero(y[0] > 0)
    if len(fg) and rng.random() < p_lesion:
        cy, cx = fg[int(rng.integers(len(fg)))].tolist()
        r0 = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, H - size))
        c0 = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, W - size))
    else:
        r0, c0 = int(rng.integers(0, H - size + 1)), int(rng.integers(0, W - size + 1))
    return x[..., r0 : r0 + size, c0 : c0 + size], y[..., r0 : r0 + size, c0 : c0 + size]


def augment_pair(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, cfg: dict):
    """Flip, affine warp (rotation/scale/shift), intensity jitter, noise; target warped alike."""
    if rng.random() < 0.5:  # left-right: the head is roughly symmetric, bleeds are not lateralised
        x, y = x.flip(-1), y.flip(-1)
    ang = math.radians(rng.uniform(-1, 1) * float(cfg["rotate_deg"]))
    sc = 1.0 + rng.uniform(-1, 1) * float(cfg["scale"])
    tx, ty = (rng.uniform(-1, 1, 2) * 2 * float(cfg["shift"])).tolist()  # grid units span 2
    theta = torch.tensor([[math.cos(ang) / sc, -math.sin(ang) / sc, tx],
                          [math.sin(ang) / sc, math.cos(ang) / sc, ty]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 1, *x.shape[-2:]), align_corners=False)
    x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    y = (F.grid_sample(y[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] > 0.5).float()
    a = float(cfg["intensity"])
    x = x * (1.0 + rng.uniform(-a, a)) + rng.uniform(-a, a) * 0.5
    if float(cfg["noise"]) > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = x + torch.randn(x.shape, generator=g) * float(cfg["noise"])
    return x.clamp_(0.0, 1.0), y


# ----------------------------------------------------------------------------- loss / validation
def dice_bce_loss(logits, y, dice_weight: float = 1.0):
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, y)
    p = torch.sigmoid(logits)
    # soft Dice over the whole batch: empty slices contribute to the denominator only
    dice = 1.0 - (2.0 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    return bce + dice_weight * dice


def _loss_fn(dice_weight):
    def loss_fn(model, batch, device):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return dice_bce_loss(model(x), y, dice_weight)

    return loss_fn


def _evaluate_fn(n_scans, threshold):
    def evaluate_fn(model, loader, device):
        inter = np.zeros(n_scans)
        psum = np.zeros(n_scans)
        tsum = np.zeros(n_scans)
        seen = np.zeros(n_scans, bool)
        loss_sum, n = 0.0, 0
        for x, y, s, _z in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            loss_sum += float(dice_bce_loss(logits, y)) * len(x)
            n += len(x)
            p = (torch.sigmoid(logits) >= threshold).float()
            s = s.numpy()
            np.add.at(inter, s, (p * y).sum((1, 2, 3)).cpu().numpy())
            np.add.at(psum, s, p.sum((1, 2, 3)).cpu().numpy())
            np.add.at(tsum, s, y.sum((1, 2, 3)).cpu().numpy())
            seen[s] = True
        denom = psum + tsum
        dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)[seen]
        pos = (tsum > 0)[seen]
        metrics = {"val_loss": loss_sum / max(1, n), "val_dice_all": float(dice.mean()) if len(dice) else float("nan"),
                   "val_dice_pos": float(dice[pos].mean()) if pos.any() else float("nan"),
                   "val_fp_neg_scans": float((psum[seen][~pos] > 0).mean()) if (~pos).any() else float("nan")}
        # select on the headline metric (mean Dice over lesion scans); the all-scan mean lets one
        # false-positive speck on a negative scan outweigh lesion quality
        score = metrics["val_dice_pos"] if pos.any() else metrics["val_dice_all"]
        return score, metrics

    return evaluate_fn


# ----------------------------------------------------------------------------- training
def _labelled_positive(results_dir, scan_id, Z) -> np.ndarray | None:
    path = Path(results_dir) / "labels" / f"{scan_id}.tsv"
    if not path.exists():
        return None
    df = read_tsv(path)
    pos = np.zeros(Z, bool)
    s = df["slice"].to_numpy(int)
    ok = (s >= 0) & (s < Z)
    pos[s[ok]] = df["any"].to_numpy(float)[ok] >= 0.5
    return pos


def _load_split(scan_ids, results_dir, target, context, drop_unlabelled_misses: bool):
    caches, targets, items, used = [], [], [], []
    windows = size = n_ch = None
    for sid in scan_ids:
        try:
            cache, meta = load_cache(*cache_paths(results_dir, sid))
            if size is not None and (meta["size"], cache.shape[1]) != (size, n_ch):
                raise InputError(f"{cache_paths(results_dir, sid)[0]}: cache size/channels differ from the other scans")
            t = load_target(sid, results_dir, target, meta)
        except InputError as exc:
            log.warning("segmenter: skipping %s (%s)", sid, exc)
            continue
        windows, size, n_ch = meta.get("windows"), meta["size"], cache.shape[1]
        si = len(caches)
        caches.append(cache_paths(results_dir, sid)[0])
        targets.append(t)
        used.append(sid)
        Z = cache.shape[0]
        keep = np.ones(Z, bool)
        if drop_unlabelled_misses:
            lab = _labelled_positive(results_dir, sid, Z)
            if lab is not None:
                # labelled bleed, empty pseudo-mask: the CAM missed it; it is no negative
                keep &= ~(lab & ~t.reshape(Z, -1).any(1))
        items += [(si, z) for z in np.flatnonzero(keep)]
    return caches, targets, items, used, windows, size, n_ch


def _training_inputs(results_dir, target, scan_ids) -> list[Path]:
    """The files a training run reads: caches, targets and (where present) slice labels."""
    R = Path(results_dir)
    files = []
    for sid in scan_ids:
        files += [*cache_paths(R, sid), target_path(sid, R, target)]
        if (R / "labels" / f"{sid}.tsv").exists():
            files.append(R / "labels" / f"{sid}.tsv")
    return files


def _versions():
    import platform

    import torchvision

    import hemocam

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "hemocam": hemocam.__version__,
            "python": platform.python_version()}


def train_segmenter(cfg: dict, scans_tsv, results_dir, target: str, bundle_out, history_out, device=None,
                    members: int = 1) -> dict:
    """Train the U-Net on ``target`` masks ("pseudomask" | "groundtruth" | "pseudomask_r{k}") of
    the train split, validate on the val split, write the bundle and history. ``cfg``: the config
    (``seed``, ``segmenter``; ``preprocess`` optional). Checkpoints go to ``<bundle dir>/checkpoints``
    so a killed job resumes.

    ``members`` > 1: an ensemble (:class:`hemocam.models.unet.UNetEnsemble`, bundle kind
    ``unet_ensemble``). Member k trains like a single model with seed ``seed + k`` (checkpoints in
    ``checkpoints/member{k}``); member 0 is the single model itself, so raising ``members`` keeps it.
    """
    check_target(target)
    members = int(members)
    if members < 1:
        raise ValueError(f"a segmenter needs at least 1 member, got {members}")
    sc = seg_cfg(cfg.get("segmenter"))
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    dev = select_device(device)
    scans = read_tsv(scans_tsv, dtype={"scan_id": str})
    scans = scans[scans["status"] == "ok"]
    split = scans.set_index("scan_id")["split"].fillna("")
    k = int(sc["context_slices"])
    drop = target != "groundtruth"
    tr = _load_split([s for s, v in split.items() if v == "train"], results_dir, target, k, drop)
    va = _load_split([s for s, v in split.items() if v == "val"], results_dir, target, k, drop)
    if not tr[2]:
        raise InputError(f"{scans_tsv}: no training scan with a {target} mask")
    aug = {key: sc[key] for key in ("rotate_deg", "scale", "shift", "intensity", "noise")} if sc["augment"] else None
    train_ds = SliceDataset(tr[0], tr[1], tr[2], k, aug, crop=int(sc["crop"]), crop_lesion_p=float(sc["crop_lesion_p"]))
    pos = train_ds.positive()
    if not pos.any():
        # the run goes on (the evaluation and report show the outcome against ground truth), but
        # a model trained on empty targets marks nothing and scores 1.0 on empty validation ones
        hint = (" (are the classifier's CAMs on the bleeds? is pseudomask.cam_threshold too high?)"
                if target != "groundtruth" else "")
        log.warning("segmenter: no training slice has a non-empty %s mask (%d training scans): the model learns "
                    "to mark nothing, and its validation score says nothing%s", target, len(tr[0]), hint)
    frac = float(sc["pos_fraction"])
    if pos.any() and (~pos).any() and 0 < frac < 1:
        weights = np.where(pos, frac / pos.sum(), (1 - frac) / (~pos).sum())
    else:
        weights = np.ones(len(pos))
    n_draw = int(sc["samples_per_epoch"]) or len(train_ds)
    bs = int(sc["batch_size"])
    val_loader, evaluate_fn = None, None
    if va[2]:
        val_ds = SliceDataset(va[0], va[1], va[2], k, None)
        val_loader = make_loader(val_ds, bs * 2, False, int(sc["num_workers"]), seed, dev)
        evaluate_fn = _evaluate_fn(len(va[0]), float(sc["threshold"]))
    n_ch = tr[6]
    bundle_out = Path(bundle_out)
    inputs = _training_inputs(results_dir, target, tr[3] + va[3])
    ckpt_dir = bundle_out.parent / "checkpoints"
    trained, records, histories = [], [], []
    for member in range(members):
        member_seed = seed + member
        seed_everything(member_seed)
        sampler = EpochSampler(len(train_ds), seed=member_seed, weights=weights, num_samples=n_draw)
        train_loader = make_loader(train_ds, bs, False, int(sc["num_workers"]), member_seed, dev, sampler=sampler,
                                   drop_last=n_draw > bs)
        model = UNet(in_channels_for(n_ch, k), encoder=sc["encoder"], base=int(sc["base_channels"]), weights=sc["weights"])
        log.info("segmenter (%s targets)%s: %d train slices (%d with lesion) from %d scans, %d val slices from %d scans, "
                 "%s encoder, %d input channels, device %s", target,
                 f" member {member + 1}/{members} (seed {member_seed})" if members > 1 else "", len(train_ds),
                 int(pos.sum()), len(tr[0]), len(va[2]), len(va[0]), sc["encoder"], model.in_channels, dev)
        result = fit(
            model, train_loader, val_loader, loss_fn=_loss_fn(float(sc["dice_weight"])), evaluate_fn=evaluate_fn,
            ckpt_dir=ckpt_dir / f"member{member}" if member else ckpt_dir, epochs=int(sc["epochs"]),
            lr=float(sc["lr"]), weight_decay=float(sc["weight_decay"]), patience=int(sc.get("patience") or sc["epochs"]),
            amp=sc["amp"], seed=member_seed, device=dev, higher_is_better=True,
            # before 2026-11-29 the key held the output settings and the files' mtimes
            run_key=tuple(run_key({**settings, "seed": member_seed, "target": target, "train": tr[3], "val": va[3]},
                                  inputs, content=content)
                          for settings, content in ((segmenter_training(sc), True), (sc, False))),
        )
        trained.append(model)
        records.append({"seed": member_seed, "best_epoch": int(result["best_epoch"]), "best_score": result["best_score"]})
        h = pd.DataFrame(result["history"])
        if members > 1:
            h.insert(0, "stage", f"member {member + 1}")
        histories.append(h)
        if member == 0:
            first = result
    if not hd.is_main():  # DDP: rank 0 writes the outputs
        return first
    weights_of = [{kk: v.detach().cpu() for kk, v in m.state_dict().items()} for m in trained]
    bundle = {
        "format": BUNDLE_FORMAT, "kind": "unet" if members == 1 else "unet_ensemble",
        "model": {"in_channels": trained[0].in_channels, "encoder": sc["encoder"], "base": int(sc["base_channels"])},
        **({"state_dict": weights_of[0]} if members == 1 else {"state_dicts": weights_of, "members": records}),
        "arch": f"unet-{sc['encoder']}", "windows": tr[4], "size": int(tr[5]), "context": k,
        # the output settings (HU gate, small components, flip, inference batch) are not part of
        # the model: the segment rule applies the config's, so changing them retrains nothing
        "input_scale": 1.0 / 255.0, "target": target, "config": segmenter_training(sc),
        "threshold": float(sc["threshold"]), "versions": _versions(), "seed": seed, "world_size": hd.world_size(),
        # an ensemble's bundle describes member 0 like a single model, its members in ``members``
        "epoch": records[0]["best_epoch"], "best_score": records[0]["best_score"],
        "train_scans": len(tr[0]), "val_scans": len(va[0]),
    }
    with atomic_path(bundle_out) as tmp:
        torch.save(bundle, tmp)
    write_tsv(pd.concat(histories, ignore_index=True), history_out)
    return {**first, "members": records}


# ----------------------------------------------------------------------------- inference
def load_segmenter(path, device=None):
    path = Path(path)
    try:
        b = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: unreadable segmenter bundle ({type(exc).__name__}: {exc})") from exc
    kind = b.get("kind")
    if kind not in ("unet", "unet_ensemble"):
        raise InputError(f"{path}: not a U-Net segmenter bundle (kind={kind!r})")
    nets = []
    for state in [b["state_dict"]] if kind == "unet" else b["state_dicts"]:
        net = UNet(**b["model"])
        net.load_state_dict(state)
        nets.append(net)
    model = nets[0] if len(nets) == 1 else UNetEnsemble(nets)
    dev = select_device(device)
    model.to(dev).eval()
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model, {k: v for k, v in b.items() if k not in ("state_dict", "state_dicts")}, dev


@torch.no_grad()
def predict_scan_probs(model, meta_b: dict, cache: np.ndarray, device, batch: int = 32, tta_flip: bool = True) -> np.ndarray:
    """(Z, S, S) float32 lesion probabilities in the cache frame; ``tta_flip``: averaged with the
    left-right mirrored view."""
    stacks = all_stacks(cache, int(meta_b["context"]))
    dtype = amp_dtype(device, meta_b.get("config", {}).get("amp", True))
    out = []
    for s in range(0, len(stacks), batch):
        x = to_input(torch.from_numpy(stacks[s : s + batch]).to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            p = torch.sigmoid(model(x).float())
            if tta_flip:
                p = 0.5 * (p + torch.sigmoid(model(x.flip(-1)).float()).flip(-1))
        out.append(p[:, 0].float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def output_config(output: dict | None) -> dict:
    """The output settings (:data:`hemocam.settings.SEGMENTER_OUTPUT_KEYS`), defaults filled in."""
    check_renamed({"segmenter": output})
    return {k: (output or {}).get(k, DEFAULTS[k]) for k in SEGMENTER_OUTPUT_KEYS}


def predict_mask(scan_id, results_dir, model, meta_b, device, output: dict | None = None):
    """``(probabilities, mask, cache meta)`` of one scan on its NIfTI grid: the model's
    probabilities, thresholded inside the brain mask and the HU gate, small components dropped."""
    o = output_config(output)
    R = Path(results_dir)
    cache, meta = load_cache(*cache_paths(R, scan_id))
    if meta["size"] != meta_b["size"] or (meta_b.get("windows") and meta.get("windows") != meta_b["windows"]):
        raise InputError(f"{cache_paths(R, scan_id)[1]}: cache (size {meta['size']}, windows {meta.get('windows')}) "
                         f"does not match the segmenter (size {meta_b['size']}, windows {meta_b.get('windows')})")
    if cache.shape[1] * (2 * int(meta_b["context"]) + 1) != meta_b["model"]["in_channels"]:
        raise InputError(f"{cache_paths(R, scan_id)[0]}: {cache.shape[1]} channels do not fit the segmenter")
    probs = predict_scan_probs(model, meta_b, cache, device, int(o["infer_batch"]), bool(o["tta_flip"]))
    prob_xyz = np.clip(to_original_grid(probs, meta, order=1), 0.0, 1.0).astype(np.float32)
    brain, _ = load_nifti(R / "brainmask" / f"{scan_id}.nii.gz")
    if brain.shape != prob_xyz.shape:
        raise InputError(f"{R / 'brainmask' / f'{scan_id}.nii.gz'}: shape {brain.shape} differs from the scan {prob_xyz.shape}")
    mask = (prob_xyz >= float(meta_b["threshold"])) & (brain > 0)
    hu, _ = load_nifti(R / "nifti" / f"{scan_id}.nii.gz")
    if hu.shape != mask.shape:
        raise InputError(f"{R / 'nifti' / f'{scan_id}.nii.gz'}: shape {hu.shape} differs from the scan {mask.shape}")
    mask &= (hu >= float(o["hu_min"])) & (hu <= float(o["hu_max"]))
    return prob_xyz, remove_small_components(mask, float(o["min_component_ml"]), meta["spacing"]), meta


def _ml(mask, meta) -> float:
    return round(float(mask.sum()) * float(np.prod(meta["spacing"])) / 1000.0, 3)


def segment_scan(scan_id, results_dir, out_dir, model, meta_b, device, output: dict | None = None) -> dict:
    """Probability map and mask of one scan; ``output``: the segmenter's output settings."""
    prob_xyz, mask, meta = predict_mask(scan_id, results_dir, model, meta_b, device, output)
    out = Path(out_dir)
    affine = np.asarray(meta["affine"], float)
    save_nifti(prob_xyz, affine, out / f"{scan_id}_prob.nii.gz", dtype=np.float32)
    save_nifti(mask.astype(np.uint8), affine, out / f"{scan_id}.nii.gz", dtype=np.uint8)
    return {"lesion_ml": _ml(mask, meta)}


def segment_batch(bundle_path, scan_ids, results_dir, out_dir, manifest_out, upstream=(), device=None, output=None):
    """Segment a batch of scans with the model loaded once; writes out_dir/{id}.nii.gz (uint8)
    and out_dir/{id}_prob.nii.gz (float32) on the NIfTI grid. ``output``: the output settings
    (the ``segmenter`` keys of :data:`hemocam.settings.SEGMENTER_OUTPUT_KEYS`; defaults else)."""
    model, meta_b, dev = load_segmenter(bundle_path, device)
    fn = functools.partial(segment_scan, results_dir=results_dir, out_dir=out_dir, model=model, meta_b=meta_b, device=dev,
                           output=output)
    out = Path(out_dir)
    stamps = _stamps(bundle_path, results_dir, manifest_out, dev, {"output": output_config(output)},
                     lambda sid: [out / f"{sid}.nii.gz", out / f"{sid}_prob.nii.gz"])
    return run_batch("segment", list(scan_ids), fn, manifest_out, upstream=upstream, stamps=stamps)


def _stamps(bundle_path, results_dir, manifest_out, dev, settings: dict, outputs_of, gate=None):
    """What a segmenter's per-scan output depends on (:mod:`hemocam.stamps`): the bundle, the
    scan's cache, CT and brain mask (and slice gate), the output settings and the device."""
    R = Path(results_dir)

    def inputs_of(sid):
        return [*cache_paths(R, sid), R / "nifti" / f"{sid}.nii.gz", R / "brainmask" / f"{sid}.nii.gz",
                *([gate(sid)] if gate else [])]

    return file_stamps(stamps_folder(manifest_out), inputs_of, outputs_of,
                       {"bundle": file_sig(bundle_path), "device": dev.type, **settings}, libraries=MODEL_LIBRARIES)


# ----------------------------------------------------------------------------- self-training
def self_training_scan(scan_id, results_dir, out_dir, model, meta_b, device, output: dict | None = None,
                       labelled: bool = True, prob_threshold: float = 0.5) -> dict:
    """The next round's pseudo-mask of one scan: this round's segmenter mask on the slices the
    pseudo-masks' slice gate opens (slice labels, or classifier probabilities when unlabelled)."""
    _, mask, meta = predict_mask(scan_id, results_dir, model, meta_b, device, output)
    gate = np.zeros(mask.shape[2], bool)
    gate[positive_slices(scan_id, results_dir, mask.shape[2], labelled, prob_threshold)] = True
    mask &= gate[None, None, :]
    save_nifti(mask.astype(np.uint8), np.asarray(meta["affine"], float), Path(out_dir) / f"{scan_id}.nii.gz",
               dtype=np.uint8)
    return {"positive_slices": int(gate.sum()), "pseudomask_voxels": int(mask.sum()), "lesion_ml": _ml(mask, meta)}


def self_training_batch(bundle_path, scan_ids, results_dir, out_dir, manifest_out, labelled: bool,
                        prob_threshold: float = 0.5, upstream=(), device=None, output=None):
    """Write ``out_dir/{id}.nii.gz`` (uint8), the next self-training round's targets, for a batch
    of scans with the model loaded once (see :func:`self_training_scan`)."""
    model, meta_b, dev = load_segmenter(bundle_path, device)
    fn = functools.partial(self_training_scan, results_dir=results_dir, out_dir=out_dir, model=model, meta_b=meta_b,
                           device=dev, output=output, labelled=labelled, prob_threshold=prob_threshold)
    out = Path(out_dir)
    stamps = _stamps(bundle_path, results_dir, manifest_out, dev,
                     {"output": output_config(output), "labelled": bool(labelled), "prob_threshold": float(prob_threshold)},
                     lambda sid: [out / f"{sid}.nii.gz"], gate=lambda sid: slice_gate_path(sid, results_dir, labelled))
    return run_batch("self_training", list(scan_ids), fn, manifest_out, upstream=upstream, stamps=stamps)
