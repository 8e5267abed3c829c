"""Train the classifier in-process on an ingested cohort at config/config.yaml's sizes, with
overrides, and print its test AUC for `any`: a check of a training recipe, outside the workflow.

    python benchmarks/recipe_check.py RESULTS OUT NAME '{"classifier.slice_epochs": 0}'

RESULTS holds `scans.tsv`, `nifti/` and `labels/` (a workflow's results folder, e.g. the demo's);
they are copied to OUT/R, preprocessed at `preprocess.size` and trained with `config/config.yaml`
plus the overrides (`section.key`: value). OUT/NAME.json holds the figure, OUT/NAME_history.tsv the
epochs. Records of 2026-11-28 (H200, 40-scan demo): benchmarks/records/h200-2026-11-28/recipe_*.
"""
import json, shutil, sys, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
import yaml
import pandas as pd
from hemocam.preprocess import preprocess_batch
from hemocam.classifier import train_classifier

src, out, name, over = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
cfg = yaml.safe_load(open("config/config.yaml"))
for k, v in over.items():
    sec, key = k.split(".")
    cfg[sec][key] = v
R = out / "R"
if not (R / "cache").exists():
    R.mkdir(parents=True, exist_ok=True)
    for d in ("nifti", "labels"):
        shutil.copytree(src / d, R / d, dirs_exist_ok=True)
    shutil.copy(src / "scans.tsv", R / "scans.tsv")
    sc = pd.read_csv(R / "scans.tsv", sep="\t", dtype={"scan_id": str})
    ids = list(sc.loc[sc.status == "ok", "scan_id"])
    t = time.time()
    preprocess_batch(ids, R, cfg["preprocess"]["windows"], cfg["preprocess"]["size"], R / "pre.tsv", processes=8)
    print(f"preprocess {len(ids)} scans at {cfg['preprocess']['size']} px: {time.time() - t:.0f} s", flush=True)
shutil.rmtree(R / "classifier", ignore_errors=True)
t = time.time()
res = train_classifier(cfg, R / "scans.tsv", R, R / "classifier" / "model.pt", R / "classifier" / "history.tsv",
                       R / "classifier" / "metrics.tsv")
m = pd.read_csv(R / "classifier" / "metrics.tsv", sep="\t")
h = pd.read_csv(R / "classifier" / "history.tsv", sep="\t")
test_any = m[(m.split == "test") & (m.label == "any")].auc.iloc[0]
line = {"name": name, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "over": over, "test_auc_any": round(float(test_any), 4), "epochs_run": len(h),
        "best": res.get("best_epoch"), "seconds": round(time.time() - t)}
print("RESULT", json.dumps(line), flush=True)
(out / f"{name}.json").write_text(json.dumps(line) + "\n")
shutil.copy(R / "classifier" / "history.tsv", out / f"{name}_history.tsv")
