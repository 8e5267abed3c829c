"""Grad-CAM / Grad-CAM++ through the ResNet-LSTM, one map per slice.

Plain CAM (classifier weights x last feature maps) does not apply here: an LSTM sits between the
pooled slice features and each slice's logit, so the logit of slice t depends non-linearly on
every slice's features. Grad-CAM only needs d logit_t / d A_t, the gradient of slice t's logit
with respect to the activations of the chosen ResNet layer *on slice t*, which is well defined
through the LSTM.

How (one scan at a time, B=1, T slices). The part of the network before the hooked layer always
runs without autograd (we differentiate with respect to its output), so it costs what inference
costs. Then, by ``grad_mode``:

- ``sequence`` (default for the ResNet-LSTM, i.e. any model with a per-slice ``encode`` and a
  ``sequence`` head, the layer inside ``model.encoder``): the encoder treats slices
  independently, so d logit_t / d A_t = (d logit_t / d f_t)(d f_t / d A_t), f = pooled slice
  features. The first factors for all t come from ONE pass of the sequence head over T copies of
  the scan's features (copy b reads out slice b's logit; the gradient of the sum w.r.t. the
  copies has them on its diagonal), the second from ONE vector-Jacobian product through the
  encoder tail. On GPU the head runs on cuDNN (train mode with dropout 0 = eval outputs, since
  cuDNN's RNN backward refuses eval mode).
- ``batched`` (any model returning (1, T, L)): T reverse passes from ``logit[t, label]`` to the
  hooked activations ``A`` (T, K, h, w), keeping row t of each (the diagonal block), run as
  batched backward calls (``torch.autograd.grad(..., is_grads_batched=True)``, vmap over one-hot
  grad_outputs, ``grad_chunk`` rows at a time);
- ``loop``: the same T reverse passes in a Python loop (the reference the tests compare against).

Measured (benchmarks/bench_cam.py, CPU, resnet18, 96 px, 28 slices): batched 3x faster than the
loop; on an H200 the batched/loop modes reach only ~2 % of the inference rate (the native LSTM
backward is a long chain of tiny kernels), hence the sequence path.
- Grad-CAM: weights = spatial mean of the gradient; map = ReLU(sum_k w_k A_k).
  Grad-CAM++ (``method: gradcampp``): weights = sum_ij alpha_ij ReLU(g_ij) with the usual
  closed form alpha_ij = g_ij^2 / (2 g_ij^2 + g_ij^3 sum_ab A_ab) (exponential-score
  approximation, eq. 19 of Chattopadhyay et al.).

Normalisation: maps are upsampled to S x S and divided by their maximum **over the whole scan**,
not per slice: a slice whose logit barely responds keeps a low map instead of being stretched to
1, so thresholds mean the same thing on every slice and negative slices stay low.

oneDNN's LSTM backward is very slow on CPU, so RNN modules run with the native kernels there
(the convolutions keep oneDNN); the batched/loop modes also avoid cuDNN's RNN on GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hemocam.batch import run_batch
from hemocam.classifier import scan_input
from hemocam.io import InputError, save_nifti
from hemocam.labelset import SUBTYPES
from hemocam.models.resnet_lstm import load_bundle, members
from hemocam.preprocess import cache_paths, load_cache, to_original_grid
from hemocam.stamps import MODEL_LIBRARIES, file_sig, file_stamps, stamps_folder
from hemocam.train import amp_dtype, autocast, select_device

log = logging.getLogger("hemocam")

METHODS = ("gradcam", "gradcampp")
GRAD_MODES = ("sequence", "batched", "loop")


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The module named ``name`` (``layer4`` or a dotted path); a bare name is searched anywhere."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    hits = [m for n, m in modules.items() if n.split(".")[-1] == name or n.endswith("." + name)]
    if len(hits) != 1:
        raise ValueError(f"CAM layer {name!r}: {len(hits)} modules match (have e.g. {list(modules)[:8]})")
    return hits[0]


@contextlib.contextmanager
def _rnn_without_fused_kernels(model: nn.Module):
    """Run RNN modules with the native implementation instead of cuDNN / oneDNN.

    cuDNN's RNN backward refuses eval mode; oneDNN's RNN backward on CPU is pathologically slow
    (measured ~0.4 s per layer and call for a tiny LSTM, vs milliseconds natively), and CAM
    runs one backward per slice.
    """
    handles = []
    state = {}

    def pre(_m, _inp):
        state["prev"] = (torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled)
        torch.backends.cudnn.enabled = False
        torch.backends.mkldnn.enabled = False

    def post(_m, _inp, _out):
        torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled = state.pop("prev", (True, True))

    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _grad_from_here_hook(store):
    def hook(_m, _inp, out):
        # switch autograd on from here: everything before the layer stays graph-free
        # (the enclosing torch.no_grad() restores the mode on exit; the graph survives)
        torch.set_grad_enabled(True)
        a = out.detach().requires_grad_(True)
        store.append(a)
        return a

    return hook


@contextlib.contextmanager
def _rnn_backward_ready(model: nn.Module, device: torch.device):
    """RNNs whose backward is fast: cuDNN in train mode with dropout 0 on CUDA (identical outputs
    to eval mode: an LSTM has no other train-time behaviour), native kernels on CPU."""
    if device.type != "cuda":
        with _rnn_without_fused_kernels(model):
            yield
        return
    saved = [(m, m.training, m.dropout) for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        for m, _, _ in saved:
            m.dropout = 0.0
            m.train()
        yield
    finally:
        for m, training, dropout in saved:
            m.dropout = dropout
            m.train(training)


def _forward_with_activations(model, x, layer):
    """Forward ``x`` recording the layer output; autograd only from that layer onwards."""
    store = []
    handle = layer.register_forward_hook(_grad_from_here_hook(store))
    try:
        with torch.no_grad(), _rnn_without_fused_kernels(model):
            logits = model(x)
            logits = logits.float()
            # torch.no_grad restores the grad mode on exit; the graph built inside survives
    finally:
        handle.remove()
    if not store:
        raise RuntimeError("CAM layer was not called during the forward pass")
    return logits, store


def _diag_grads(y, acts, grad_mode, chunk):
    """Per-slice gradients d y[t] / d A[t] for t in range(T); ``acts`` are the hooked outputs."""
    T = y.shape[0]
    A = acts[0] if len(acts) == 1 else None
    if A is None or A.shape[0] != T:
        # the model ran the layer several times (sliding windows) or batched differently:
        # Grad-CAM per slice is then not defined by a single activation row
        raise RuntimeError(f"CAM needs one layer call with {T} rows, got {[tuple(a.shape) for a in acts]}")
    if grad_mode == "batched":
        out = torch.empty_like(A)
        for s in range(0, T, chunk):
            idx = torch.arange(s, min(s + chunk, T), device=y.device)
            go = torch.zeros(len(idx), T, device=y.device, dtype=y.dtype)
            go[torch.arange(len(idx)), idx] = 1.0
            g = torch.autograd.grad(y, A, grad_outputs=go, is_grads_batched=True, retain_graph=True)[0]
            out[idx] = g[torch.arange(len(idx)), idx]
        return A, out
    out = torch.empty_like(A)
    for t in range(T):
        out[t] = torch.autograd.grad(y[t], A, retain_graph=True)[0][t]
    return A, out


def _uses_sequence_path(model: nn.Module, layer: nn.Module) -> bool:
    """A model made of a per-slice ``encode`` and a sequence ``sequence`` head (ResNetLSTM),
    with the CAM layer inside the per-slice encoder."""
    enc = getattr(model, "encoder", None)
    return (callable(getattr(model, "encode", None)) and callable(getattr(model, "sequence", None))
            and isinstance(enc, nn.Module) and any(m is layer for m in enc.modules()))


def _sequence_path_grads(model, x, layer, label_indices, chunk):
    """Per-slice gradients for an encode/sequence model, ``chunk`` slices per head pass.

    The encoder treats slices independently (eval mode), so d logit_t / d A_t =
    (d logit_t / d f_t) · (d f_t / d A_t) with f the pooled slice features. The first factor for
    ``chunk`` slices at once: run the (cheap) sequence head on ``chunk`` copies of the scan's
    features, copy b reading out slice t_b's logit, and differentiate the sum with respect to
    the copies; copy b's row t_b is d logit_{t_b} / d f_{t_b}. One vector-Jacobian product
    through the encoder tail then gives every d logit_t / d A_t. Cost: one inference forward,
    ceil(T / chunk) head passes with batch ``chunk`` (cuDNN on GPU), one backward through the
    layers after ``layer``. Memory grows as chunk x T, not T x T: a 600-slice thin-slice scan
    would otherwise hold 600 copies of its sequence for the backward pass.
    """
    store = []
    handle = layer.register_forward_hook(_grad_from_here_hook(store))
    try:
        with torch.no_grad():
            feats = model.encode(x[0])
    finally:
        handle.remove()
    if len(store) != 1 or store[0].shape[0] != x.shape[1]:
        raise RuntimeError(f"CAM needs one layer call with {x.shape[1]} rows, got {[tuple(a.shape) for a in store]}")
    A = store[0]
    T = x.shape[1]
    f0 = feats.detach()
    g_f = {li: torch.empty_like(f0) for li in label_indices}
    logits = None
    with _rnn_backward_ready(model, x.device):
        for s in range(0, T, max(1, int(chunk))):
            rows = torch.arange(s, min(s + max(1, int(chunk)), T), device=x.device)
            copy = torch.arange(len(rows), device=x.device)
            rep = f0[None].repeat(len(rows), 1, 1).requires_grad_(True)  # (copies, T slices, F)
            out = model.sequence(rep).float()  # (copies, T, L)
            if logits is None:
                logits = out[0].detach()
            for j, li in enumerate(label_indices):
                g = torch.autograd.grad(out[copy, rows, li].sum(), rep, retain_graph=j + 1 < len(label_indices))[0]
                g_f[li][rows] = g[copy, rows]
    grads = {li: torch.autograd.grad(feats, A, grad_outputs=g_f[li].to(feats.dtype), retain_graph=True)[0]
             for li in label_indices}
    return logits, A, grads


def _weights_and_maps(A, G, method):
    """(T,K,h,w) activations and gradients -> (T,h,w) non-negative maps."""
    if method == "gradcam":
        w = G.mean(dim=(2, 3), keepdim=True)
    elif method == "gradcampp":
        g2, g3 = G.pow(2), G.pow(3)
        # Chattopadhyay et al. eq. 19: the activations' spatial sum scales each position's g^3
        denom = 2 * g2 + A.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
        w = (alpha * F.relu(G)).sum(dim=(2, 3), keepdim=True)
    else:
        raise ValueError(f"cam.method {method!r} not in {METHODS}")
    return F.relu((w * A).sum(dim=1))


def slice_cams(
    model: nn.Module,
    x: torch.Tensor,
    layer: str | nn.Module = "layer4",
    label_indices=(0,),
    method: str = "gradcam",
    out_size: int | None = None,
    grad_mode: str = "auto",
    chunk: int = 32,
):
    """Grad-CAM of every slice of one scan.

    ``x``: (1, T, C, H, W) for a model returning logits (1, T, L). Returns ``(maps, probs)``:
    ``maps[label_index]`` a float32 array (T, out_size, out_size) in [0, 1], normalised by the
    scan maximum (all zero when the map is zero everywhere); ``probs`` (T, L) sigmoid outputs.
    """
    if x.dim() != 5 or x.shape[0] != 1:
        raise ValueError(f"slice_cams takes one scan (1, T, C, H, W), got {tuple(x.shape)}")
    if method not in METHODS:
        raise ValueError(f"cam.method {method!r} not in {METHODS}")
    mod = find_layer(model, layer) if isinstance(layer, str) else layer
    if grad_mode == "auto":
        grad_mode = "sequence" if _uses_sequence_path(model, mod) else "batched"
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"cam.grad_mode {grad_mode!r} not in auto|{'|'.join(GRAD_MODES)}")
    if grad_mode == "sequence" and not _uses_sequence_path(model, mod):
        raise ValueError("cam.grad_mode sequence needs a model with encode/sequence and the layer in its encoder")
    was_training = model.training
    model.eval()
    try:
        if grad_mode == "sequence":
            logits, A_seq, seq_grads = _sequence_path_grads(model, x, mod, label_indices, chunk)
        else:
            logits, acts = _forward_with_activations(model, x, mod)
            logits = logits[0]
        maps = {}
        for li in label_indices:
            if grad_mode == "sequence":
                A, G = A_seq, seq_grads[li]
            else:
                A, G = _diag_grads(logits[:, li], acts, grad_mode, chunk)
            with torch.no_grad():
                m = _weights_and_maps(A.float(), G.float(), method)
                if out_size is not None:
                    m = F.interpolate(m[:, None], size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0]
                m = m.clamp_min(0)
                peak = m.max()
                m = m / peak if peak > 0 else torch.zeros_like(m)
            maps[li] = m.cpu().numpy().astype(np.float32)
        probs = torch.sigmoid(logits.detach()).cpu().numpy()
    finally:
        model.train(was_training)
    return maps, probs


def ensemble_cams(model, x, layer, label_indices, method, out_size, grad_mode, chunk, amp=True, use="first"):
    """:func:`slice_cams` of a classifier. For an ensemble, ``use`` picks whose: ``first``, member 0
    (the model a single-model run trains); ``mean``, every member's map normalised by its scan
    maximum, then their mean normalised again, with the members' mean probabilities."""
    if use not in MEMBER_USES:
        raise ValueError(f"cam.members {use!r} not in {MEMBER_USES}")
    nets = members(model)[: 1 if use == "first" else None]
    runs = []
    for net in nets:
        with autocast(x.device, amp_dtype(x.device, amp)):
            runs.append(slice_cams(net, x, layer, label_indices, method, out_size=out_size, grad_mode=grad_mode,
                                   chunk=chunk))
    if len(runs) == 1:
        return runs[0]
    maps = {}
    for li in label_indices:
        m = np.mean([r[0][li] for r in runs], axis=0)
        peak = m.max()
        maps[li] = (m / peak if peak > 0 else np.zeros_like(m)).astype(np.float32)
    return maps, np.mean([r[1] for r in runs], axis=0)


# ----------------------------------------------------------------------------- the stage
# an ensemble's CAM: member 0's by default. On the 40-scan demo the mean of three members' maps,
# at the pseudo-masks' cam_threshold (chosen with one model's maps), gave pseudo-masks 0.02 Dice worse
MEMBER_USES = ("first", "mean")
DEFAULTS = {"method": "gradcam", "layer": "layer4", "label": "any", "per_subtype": False, "grad_mode": "auto",
            "grad_chunk": 32, "amp": True, "members": "first"}


def cam_config(cfg_cam: dict | None) -> dict:
    c = {**DEFAULTS, **{k: v for k, v in (cfg_cam or {}).items() if v is not None}}
    if c["method"] not in METHODS:
        raise ValueError(f"cam.method {c['method']!r} not in {METHODS}")
    if c["members"] not in MEMBER_USES:
        raise ValueError(f"cam.members {c['members']!r} not in {MEMBER_USES}")
    return c


def cam_path(results_dir, scan_id: str, subtype: str | None = None) -> Path:
    name = f"{scan_id}.nii.gz" if subtype is None else f"{scan_id}_{subtype}.nii.gz"
    return Path(results_dir) / "cam" / name


def cam_scan(scan_id: str, model, meta_b: dict, results_dir, cfg_cam: dict, device) -> dict:
    """Write R/cam/{scan_id}.nii.gz (float32 in [0,1], NIfTI grid) and, with ``per_subtype``,
    R/cam/{scan_id}_{subtype}.nii.gz; return manifest columns."""

    c = cam_config(cfg_cam)
    labels = list(meta_b["labels"])
    if c["label"] not in labels:
        raise ValueError(f"cam.label {c['label']!r} is not one of the classifier's labels {labels}")
    cache, cmeta = load_cache(*cache_paths(results_dir, scan_id))
    if cmeta["size"] != meta_b["size"] or cmeta["windows"] != meta_b["windows"]:
        raise InputError(f"{cache_paths(results_dir, scan_id)[0]}: cache size/windows differ from the classifier's")
    wanted = {None: labels.index(c["label"])}
    if c["per_subtype"]:
        wanted.update({s: labels.index(s) for s in SUBTYPES if s in labels})
    x = scan_input(cache, meta_b, device)
    maps, probs = ensemble_cams(model, x, c["layer"], sorted(set(wanted.values())), c["method"],
                                out_size=int(cmeta["size"]), grad_mode=c["grad_mode"], chunk=int(c["grad_chunk"]),
                                amp=c["amp"], use=c["members"])
    affine = np.asarray(cmeta["affine"], float)
    for subtype, li in wanted.items():
        vol = np.clip(to_original_grid(maps[li], cmeta, order=1), 0.0, 1.0).astype(np.float32)
        save_nifti(vol, affine, cam_path(results_dir, scan_id, subtype), dtype=np.float32)
    main = maps[wanted[None]]
    per_slice = main.reshape(len(main), -1).max(1)
    return {"cam_peak_slice": int(per_slice.argmax()) if per_slice.max() > 0 else -1,
            "p_max": round(float(probs[:, wanted[None]].max()), 6)}


def cam_batch(bundle_path, scan_ids, results_dir, cfg_cam: dict | None, manifest_out, upstream=(), device=None):
    """Grad-CAM for a batch of scans with the classifier loaded once (see :func:`cam_scan`)."""

    dev = select_device(device)
    model, meta_b = load_bundle(bundle_path, dev)
    c = cam_config(cfg_cam)
    find_layer(members(model)[0], c["layer"])  # a wrong layer name fails the job once, not every scan
    t0 = time.time()
    fn = functools.partial(cam_scan, model=model, meta_b=meta_b, results_dir=results_dir, cfg_cam=c, device=dev)
    subtypes = [None] + ([s for s in SUBTYPES if s in meta_b["labels"]] if c["per_subtype"] else [])
    stamps = file_stamps(stamps_folder(manifest_out), lambda sid: cache_paths(results_dir, sid),
                         lambda sid: [cam_path(results_dir, sid, s) for s in subtypes],
                         {"bundle": file_sig(bundle_path), "cam": c, "device": dev.type}, libraries=MODEL_LIBRARIES)
    df = run_batch("cam", list(scan_ids), fn, manifest_out, upstream=upstream, stamps=stamps)
    log.info("cam: %d scans in %.1fs on %s", len(scan_ids), time.time() - t0, dev)
    return df
