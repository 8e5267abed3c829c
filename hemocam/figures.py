"""Figures for people: per-scan overlays, training curves, evaluation plots, cohort, provenance.

Everything is drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas (never pyplot),
so jobs need no display, keep no global figure state and can draw thousands of scans in one
process. Every file is written atomically.

Per-scan figures show axial slices in the radiological convention (patient right on the image
left, anterior at the top), oriented from the NIfTI affine, CT in the brain window (W 80 / L 40),
with the CAM as a heat map and outlines of the pseudo-mask, the prediction and the ground truth.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from nibabel.orientations import io_orientation

from hemocam.batch import read_manifests, run_batch
from hemocam.io import atomic_path, load_nifti, read_tsv

log = logging.getLogger("hemocam")

BRAIN_WINDOW = (40.0, 80.0)  # centre, width (HU)
CAM_MIN = 0.05  # CAM values below this are left transparent
OVERLAYS = {  # key: (results sub-folder, legend label, colour, line style)
    "pseudomask": ("pseudomask", "pseudo-mask", "#00e5ff", "--"),
    "prediction": ("segmentation", "prediction", "#ff3030", "-"),
    "truth": ("masks", "ground truth", "#39ff14", "-"),
}
DPI = 100


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_png) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor=fig.get_facecolor())


# ---------------------------------------------------------------- per-scan overlays

def display_plan(affine) -> tuple[bool, bool, bool, float]:
    """How to show array[:, :, k] radiologically: (transpose, flip rows, flip cols, aspect).

    After the plan, rows run posterior->anterior reversed (anterior on top) and columns run from
    the patient's right to left. ``aspect`` is row spacing / column spacing for ``imshow``.
    """
    ornt = io_orientation(np.asarray(affine, float))
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    ax0, ax1 = int(ornt[0, 0]), int(ornt[1, 0])
    if {ax0, ax1} != {0, 1}:  # not an axial grid: show it as stored
        return True, False, False, float(spacing[0] / spacing[1])
    x_axis = 0 if ax0 == 0 else 1  # array axis along world x (R)
    y_axis = 1 - x_axis
    # image rows follow world y, columns world x: transpose when array axis 0 is x
    transpose = x_axis == 0
    # +y is anterior: anterior on top means rows run from +y down, i.e. reverse when the
    # array index grows towards +y; +x is the patient's right, shown on the left likewise
    flip_rows = ornt[y_axis, 1] > 0
    flip_cols = ornt[x_axis, 1] > 0
    return transpose, bool(flip_rows), bool(flip_cols), float(spacing[y_axis] / spacing[x_axis])


def _orient(slice2d: np.ndarray, plan) -> np.ndarray:
    transpose, flip_rows, flip_cols, _ = plan
    img = slice2d.T if transpose else slice2d
    if flip_rows:
        img = img[::-1]
    if flip_cols:
        img = img[:, ::-1]
    return img


def choose_slices(prediction=None, truth=None, cam=None, n: int = 4, n_slices: int | None = None):
    """(slice indices, basis): the ``n`` slices with the largest bleed, by the first source present.

    Order of preference: prediction, ground truth, CAM (summed per slice); with none of them
    positive, ``n`` evenly spaced slices through the middle of the scan.
    """
    for basis, vol in (("prediction", prediction), ("ground truth", truth), ("CAM", cam)):
        if vol is None:
            continue
        score = (np.asarray(vol) > 0).sum(axis=(0, 1)) if basis != "CAM" else np.asarray(vol, float).sum(axis=(0, 1))
        if score.max() > 0:
            top = np.argsort(-score, kind="stable")[: min(n, int((score > 0).sum()))]
            return sorted(int(k) for k in top), basis
    if n_slices is None:
        for vol in (prediction, truth, cam):
            if vol is not None:
                n_slices = np.asarray(vol).shape[2]
    n_slices = n_slices or 1
    picks = np.unique(np.linspace(n_slices * 0.3, n_slices * 0.7, min(n, n_slices)).round().astype(int))
    return [int(min(max(k, 0), n_slices - 1)) for k in picks], "none (middle slices)"


def _load_optional(path, shape, dtype=None):
    if not Path(path).exists():
        return None
    arr, _ = load_nifti(path, dtype=dtype)
    if arr.shape != shape:
        log.warning("figures: %s has shape %s, CT %s: not drawn", path, arr.shape, shape)
        return None
    return arr


def scan_figure(scan_id: str, results_dir, out_png, n_slices: int = 4) -> dict:
    """Draw ``n_slices`` slices of one scan with every overlay that exists; return manifest columns."""
    R = Path(results_dir)
    ct, affine = load_nifti(R / "nifti" / f"{scan_id}.nii.gz", dtype=np.float32)
    shape = ct.shape
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000
    masks = {key: _load_optional(R / folder / f"{scan_id}.nii.gz", shape) for key, (folder, *_rest) in OVERLAYS.items()}
    masks = {k: (v > 0 if v is not None else None) for k, v in masks.items()}
    cam = _load_optional(R / "cam" / f"{scan_id}.nii.gz", shape, dtype=np.float32)
    picks, basis = choose_slices(masks["prediction"], masks["truth"], cam, n=n_slices, n_slices=shape[2])

    plan = display_plan(affine)
    centre, width = BRAIN_WINDOW
    panel = 3.0
    fig = _new_figure(panel * len(picks), panel + 0.9)
    fig.patch.set_facecolor("black")
    for i, k in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), i + 1)
        ax.imshow(_orient(ct[:, :, k], plan), cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2,
                  aspect=plan[3], interpolation="nearest")
        if cam is not None:
            heat = _orient(cam[:, :, k], plan)
            ax.imshow(np.ma.masked_less(heat, CAM_MIN), cmap="jet", vmin=0, vmax=1, alpha=0.4,
                      aspect=plan[3], interpolation="bilinear")
        for key, (_folder, _label, colour, style) in OVERLAYS.items():
            m = masks[key]
            if m is not None and m[:, :, k].any():
                ax.contour(_orient(m[:, :, k], plan).astype(np.float32), levels=[0.5], colors=[colour],
                           linewidths=1.2, linestyles=style)
        ax.set_title(f"slice {k}", color="white", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", color="yellow", fontsize=8, transform=ax.transAxes, va="center")
    handles, labels = [], []
    if cam is not None:  # the heat map's own colours, low to high (a single swatch read as "CAM = that colour")
        jet = matplotlib.colormaps["jet"]
        handles.append(tuple(Patch(facecolor=jet(v), alpha=0.6) for v in (0.1, 0.35, 0.65, 0.9)))
        labels.append("CAM, low to high")
    for key, (_folder, label, colour, style) in OVERLAYS.items():
        if masks[key] is not None:
            handles.append(Line2D([], [], color=colour, linestyle=style))
            labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
                   labelcolor="white", handler_map={tuple: HandlerTuple(ndivide=None, pad=0)})
    pred_ml = float(masks["prediction"].sum()) * voxel_ml if masks["prediction"] is not None else float("nan")
    gt_ml = float(masks["truth"].sum()) * voxel_ml if masks["truth"] is not None else float("nan")
    title = f"{scan_id}   slices by {basis}"
    if np.isfinite(pred_ml):
        title += f"   predicted {pred_ml:.1f} mL"
    if np.isfinite(gt_ml):
        title += f"   true {gt_ml:.1f} mL"
    fig.suptitle(title, color="white", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.12, wspace=0.03)
    save_figure(fig, out_png)
    return {"slices": ",".join(map(str, picks)), "basis": basis,
            "pred_ml": round(pred_ml, 3), "gt_ml": round(gt_ml, 3)}


def _scan_job(scan_id, results_dir, out_dir, n_slices):
    out_png = Path(out_dir) / f"{scan_id}.png"
    return {**scan_figure(scan_id, results_dir, out_png, n_slices), "figure": str(out_png)}


def figures_batch(scan_ids, results_dir, out_dir, manifest_out, upstream=(), n_slices: int = 4) -> pd.DataFrame:
    """One PNG per scan of the batch into ``out_dir``; manifest with slices, basis and volumes."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # exists even if every scan was rejected
    fn = partial(_scan_job, results_dir=str(results_dir), out_dir=str(out_dir), n_slices=n_slices)
    return run_batch("figures", list(scan_ids), fn, manifest_out, upstream=upstream)


def gallery(manifests, out_dir, max_scans: int = 60) -> pd.DataFrame:
    """Copy the per-scan PNGs meant for the report into ``out_dir``: all when at most ``max_scans``.

    Larger cohorts: the half with the largest bleed (max of predicted and true volume) first,
    the rest evenly spread over the remaining scans, so negatives and misses are seen too.
    Returns the chosen manifest rows.
    """
    df = read_manifests(manifests)
    df = df[df["status"] == "ok"].copy()
    sizes = [pd.to_numeric(df[c], errors="coerce") for c in ("pred_ml", "gt_ml") if c in df]
    df["size_ml"] = pd.concat(sizes, axis=1).max(axis=1).fillna(0) if sizes else 0.0
    df = df.sort_values(["size_ml", "scan_id"], ascending=[False, True], kind="stable")
    if len(df) > max_scans:
        head = df.iloc[: max_scans // 2]
        rest = df.iloc[max_scans // 2:]
        idx = np.unique(np.linspace(0, len(rest) - 1, max_scans - len(head)).round().astype(int))
        df = pd.concat([head, rest.iloc[idx]])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for src, sid in zip(df["figure"], df["scan_id"]):
        with atomic_path(out / f"{sid}.png") as tmp:
            shutil.copyfile(src, tmp)
    log.info("gallery: %d of the cohort's scan figures", len(df))
    return df


# ---------------------------------------------------------------- training curves

def epoch_axis(hist: pd.DataFrame) -> tuple[pd.Series, list[tuple[float, str]]]:
    """x positions of a history's rows, and (x, name) where each stage starts when there are several.

    Epochs restart at 1 in every stage (the classifier's slices, then scans): the stages are then
    laid one after the other.
    """
    hist = hist.reset_index(drop=True)
    x = pd.to_numeric(hist["epoch"], errors="coerce") if "epoch" in hist else pd.Series(np.arange(1, len(hist) + 1))
    stages = hist["stage"].astype(str) if "stage" in hist else None
    if stages is None or stages.nunique() < 2:
        return x, []
    x = pd.Series(np.arange(1, len(hist) + 1, dtype=float))
    return x, [(x[i] - 0.5, stages[i]) for i in range(len(hist)) if i == 0 or stages[i] != stages[i - 1]]


def kept_epochs(hist: pd.DataFrame, x: pd.Series) -> list[tuple[float, int]]:
    """(x position, epoch) of each kept epoch: the last ``best`` row of the run or, for an
    ensemble (stages named ``member k ...``), of each member. An earlier stage's best is not kept
    (the classifier's slice stage hands on its last epoch), so only the last best counts."""
    hist = hist.reset_index(drop=True)
    if "best" not in hist:
        return []
    flags = hist["best"].astype(str).str.lower().isin(["true", "1"])
    member = (hist["stage"].astype(str).str.extract(r"^(member \d+)")[0].fillna("") if "stage" in hist
              else pd.Series("", index=hist.index))
    epochs = pd.to_numeric(hist["epoch"], errors="coerce") if "epoch" in hist else x
    last = [rows[-1] for rows in hist.index[flags].groupby(member[flags]).values()]
    return sorted((float(x[i]), int(epochs[i])) for i in last)


def training_figure(history_tsv, out_png, title: str) -> None:
    """Every numeric column of a training history against the epoch, one panel each."""
    hist = read_tsv(history_tsv)
    x, starts = epoch_axis(hist)
    kept = kept_epochs(hist, x)
    label = (f"kept epoch{'s' if len(kept) > 1 else ''} " + " / ".join(str(e) for _, e in kept)) if kept else ""
    cols = [c for c in hist.columns if c not in ("epoch", "best") and hist[c].dtype != bool
            and pd.to_numeric(hist[c], errors="coerce").notna().any()]
    n = max(1, len(cols))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig = _new_figure(4.0 * ncols, 2.8 * nrows + 0.6)
    for i, c in enumerate(cols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        y = pd.to_numeric(hist[c], errors="coerce")
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.3)
        pos = y[y > 0]
        if len(pos) == y.notna().sum() and len(pos) > 1 and pos.max() / pos.min() > 100:
            ax.set_yscale("log")  # learning rates and losses spanning decades
        for j, (xb, _) in enumerate(kept):
            ax.axvline(xb, color="tab:green", linestyle="--", linewidth=1, label=label if j == 0 else None)
        for xs, name in starts:
            ax.axvline(xs, color="0.5", linewidth=0.8)
            ax.text(xs + 0.2, 0.98, name, transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="0.35")
        ax.set_title(c, fontsize=10)
        ax.set_xlabel("epoch (stages one after the other)" if starts else "epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if kept and i == 0:
            ax.legend(fontsize=8)
    if not cols:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no numeric column in the history", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"{title}: {len(hist)} epochs", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, out_png)


# ---------------------------------------------------------------- evaluation

METHOD_ORDER = ("cam", "pseudomask", "self_training", "segmenter", "hu_threshold", "upper_bound")


def _first(df, *names):
    return next((n for n in names if n in df), None)


def _message(out_png, text):
    fig = _new_figure(6, 2)
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
    ax.set_axis_off()
    save_figure(fig, out_png)


def evaluation_figures(metrics_tsv, dice_png, volume_png) -> None:
    """Dice per scan and method (strip plot, mean over GT-positive scans as a bar) and predicted
    against true volume with the identity line."""
    df = read_tsv(metrics_tsv, dtype={"scan_id": str})
    dice, vp, vt = _first(df, "dice", "dice3d"), _first(df, "vol_pred_ml", "volume_pred_ml"), _first(df, "vol_true_ml", "volume_true_ml")
    if df.empty or "method" not in df or dice is None:
        _message(dice_png, "no scan with ground truth to score")
        _message(volume_png, "no scan with ground truth to score")
        return
    methods = [m for m in METHOD_ORDER if m in set(df["method"])] + sorted(set(df["method"]) - set(METHOD_ORDER))
    positive = (pd.to_numeric(df[vt], errors="coerce") > 0) if vt else pd.Series(True, index=df.index)
    if "positive" in df:
        positive = df["positive"].astype(str).str.lower().isin(["true", "1"])
    rng = np.random.default_rng(0)  # fixed jitter: the same table draws the same picture

    fig = _new_figure(max(6.0, 1.4 * len(methods) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(methods):
        sel = df["method"] == m
        y = pd.to_numeric(df.loc[sel, dice], errors="coerce")
        pos = positive[sel]
        mean = y[pos].mean()
        if np.isfinite(mean):
            ax.bar(i, mean, width=0.6, color="tab:blue", alpha=0.25, edgecolor="tab:blue")
        jitter = rng.uniform(-0.18, 0.18, size=len(y))
        ax.scatter(i + jitter[pos.to_numpy()], y[pos], s=16, color="tab:red", label="GT positive" if i == 0 else None, zorder=3)
        ax.scatter(i + jitter[~pos.to_numpy()], y[~pos], s=16, facecolors="none", edgecolors="gray",
                   label="GT negative" if i == 0 else None, zorder=3)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("Dice (3-D, per scan)")
    ax.set_title("Dice per scan; bar: mean over GT-positive scans")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, dice_png)

    if vp is None or vt is None:
        _message(volume_png, "no volume columns in the metrics table")
        return
    fig = _new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    hi = 0.0
    for m in methods:
        sel = df["method"] == m
        x, y = pd.to_numeric(df.loc[sel, vt], errors="coerce"), pd.to_numeric(df.loc[sel, vp], errors="coerce")
        ax.scatter(x, y, s=18, alpha=0.8, label=m)
        hi = max(hi, float(np.nanmax([x.max(), y.max(), 0])))
    hi = hi * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], color="black", linewidth=1, linestyle="--", label="identity")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true volume (mL)")
    ax.set_ylabel("predicted volume (mL)")
    ax.set_title("Hemorrhage volume per scan")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, volume_png)


# ---------------------------------------------------------------- cohort

_PATHLIKE = re.compile(r"^(/|\\|[A-Za-z]:\\|\.{1,2}/)|[/\\]|\.(dcm|nii|gz|csv|tsv|json)$", re.I)


def reason_group(reason: str, max_len: int = 60) -> str:
    """A short, path-free reason for grouping rejections: file names and numbers are dropped."""
    parts = [p.strip() for p in str(reason).split(": ") if p.strip()]
    kept = [p for p in parts if not _PATHLIKE.search(p)]
    text = ": ".join(kept) or "unspecified"
    text = re.sub(r"\d{3,}", "#", text)  # UIDs, sizes, counts: group 'has 3 slices' with 'has 4'
    text = re.sub(r"\(.*?\)", "", text).strip()
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


def cohort_figure(scans_tsv, out_png) -> None:
    """Accepted scans by split and rejected ones by reason, as horizontal bars with counts."""
    scans = read_tsv(scans_tsv, dtype={"scan_id": str})
    ok = scans[scans["status"] == "ok"]
    bad = scans[scans["status"] != "ok"]
    rows = []
    split = ok["split"].fillna("").astype(str) if "split" in ok else pd.Series("", index=ok.index)
    for s in ("train", "val", "test", ""):
        n = int((split == s).sum())
        if n:
            rows.append((f"accepted: {s or 'no split'}", n, "tab:green"))
    for reason, n in bad["reason"].fillna("").map(reason_group).value_counts().sort_index().items():
        rows.append((f"rejected: {reason}", int(n), "tab:red"))
    if not rows:
        rows.append(("no scans", 0, "gray"))
    fig = _new_figure(9.0, 0.45 * len(rows) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))[::-1]
    counts = [r[1] for r in rows]
    ax.barh(y, counts, color=[r[2] for r in rows])
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    for yi, c in zip(y, counts):
        ax.text(c, yi, f" {c}", va="center", fontsize=8)
    ax.set_xlim(0, max(counts + [1]) * 1.15)
    ax.set_xlabel("series / scans")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Cohort: {len(ok)} accepted, {len(bad)} rejected")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_png)


# ---------------------------------------------------------------- provenance

def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, obj


def provenance_html(provenance_json, out_html) -> None:
    """A small standalone HTML page of the seed, versions and every config key of the run."""
    prov = json.loads(Path(provenance_json).read_text())

    def table(title, pairs):
        body = "".join(
            f"<tr><td><code>{html.escape(str(k))}</code></td><td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
            for k, v in pairs)
        return f"<h2>{html.escape(title)}</h2><table><tr><th>key</th><th>value</th></tr>{body}</table>"

    versions = prov.get("versions", {}) or {}
    config = prov.get("config", {}) or {}
    other = {k: v for k, v in prov.items() if k not in ("versions", "config")}
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>hemocam provenance</title><style>"
        "body{font-family:sans-serif;margin:1.5em;font-size:14px}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eee}"
        "</style></head><body><h1>hemocam run provenance</h1>"
        + table("Run", list(_flatten(other)))
        + table("Versions", list(_flatten(versions)))
        + table("Configuration", list(_flatten(config)))
        + "</body></html>\n"
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(page)
