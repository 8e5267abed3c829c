"""The Snakemake report of a finished tiny run: built, complete, identifier-free, and it renders.

The workflow runs once for the module (a few minutes on 2 cores). The rendering test opens the
report in headless Chromium (tests/report/install_chromium.sh installs it): it is skipped with a
reason where Chromium is absent, and fails instead when the CI variable is set.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, run_snakemake
from hemocam.batch import ok_scans
from hemocam.io import read_tsv
from hemocam.labelset import LABELS

pytestmark = pytest.mark.workflow

CATEGORIES = {"Cohort", "Scans", "Volumes", "Training", "Evaluation", "Provenance"}


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def run_dir(request, tmp_path_factory):
    """A finished tiny run: the session-wide ``demo_run`` when conftest provides one, else our own."""
    try:
        return request.getfixturevalue("demo_run")
    except pytest.FixtureLookupError:
        pass
    if not TINY.exists():
        pytest.skip(f"{TINY} missing: the tiny test config is needed for a workflow run")
    wd = tmp_path_factory.mktemp("report_run")
    run_snakemake(wd)
    return wd


@pytest.fixture(scope="module")
def report_html(run_dir):
    out = run_dir / "report.html"
    run_snakemake(run_dir, "--report", str(out))
    assert out.exists() and out.stat().st_size > 100_000
    return out


def report_results(html_path) -> dict:
    """The report's embedded ``results`` object: path -> {name, mime_type, data_uri, ...}."""
    text = Path(html_path).read_text()
    m = re.search(r"var results = (\{.*?\});\s*</script>", text, re.S)
    assert m, "no results object in the report"
    return json.loads(m.group(1))


def test_outputs_of_a_finished_run(run_dir):
    R = run_dir / "results"
    scans = read_tsv(R / "scans.tsv", dtype={"scan_id": str})
    ok = set(scans.loc[scans["status"] == "ok", "scan_id"])
    vols = read_tsv(R / "volumes.tsv", dtype={"scan_id": str})
    assert list(vols.columns) == ["scan_id", "volume_ml", "lesions", "largest_ml", "abc2_ml"] + [f"p_{l}" for l in LABELS]
    segmented = set(ok_scans(sorted((R / "segmentation" / "batches").glob("*.tsv"))))
    assert segmented and set(vols["scan_id"]) == segmented and segmented <= ok
    assert (vols["volume_ml"] >= vols["largest_ml"] - 1e-6).all()
    assert ((vols["lesions"] == 0) == (vols["volume_ml"] == 0)).all()
    assert vols["p_any"].between(0, 1).all()
    gallery = sorted(p.stem for p in (R / "figures" / "gallery").glob("*.png"))
    assert gallery and set(gallery) <= ok
    for name in ("cohort.png", "training_classifier.png", "training_segmenter.png", "training_segmenter_r0.png",
                 "evaluation_dice.png", "evaluation_volume.png"):
        with Image.open(R / "figures" / name) as im:
            assert im.size[0] >= 300 and np.asarray(im.convert("L"), float).std() > 0, name
    assert "Configuration" in (R / "figures" / "provenance.html").read_text()


def test_report_has_every_figure_and_no_identifiers(run_dir, report_html):
    results = report_results(report_html)
    gallery = {p.name for p in (run_dir / "results" / "figures" / "gallery").glob("*.png")}
    pngs = {Path(p).name for p, r in results.items() if r["mime_type"] == "image/png"}
    assert gallery <= pngs, "every gallery scan is its own report item"
    assert {"cohort.png", "training_classifier.png", "evaluation_dice.png"} <= pngs
    names = {Path(p).name for p in results}
    assert {"volumes.tsv", "provenance.html", "scans.tsv"} <= names
    text = report_html.read_text()
    cats = set(json.loads(re.search(r"var categories = (\{.*?\});\s*</script>", text, re.S).group(1)))
    assert CATEGORIES <= cats, cats
    # the report is the file people share: no DICOM patient identifiers of the demo cohort in it,
    # neither in its text nor inside the files it embeds (base64 data URIs)
    truth = read_tsv(run_dir / "resources" / "demo" / "truth.tsv", dtype=str)
    markers = sorted({v for values in truth["phi_values"].fillna("") for v in values.split("|") if len(v) >= 6})
    assert markers, "the demo cohort must carry identifying values to check"
    embedded = [base64.b64decode(r["data_uri"].split(",", 1)[1]) for r in results.values()
                if r["data_uri"].startswith("data:") and ";base64," in r["data_uri"]]
    assert len(embedded) == len(results)
    assert any(b"scan_id\t" in blob for blob in embedded)  # decoding works: the TSVs are readable
    leaked = [m for m in markers if m in text or any(m.encode() in blob for blob in embedded)]
    assert not leaked, f"identifying DICOM values in the report: {leaked[:5]}"


CHECK_JS = """
<script>
window.addEventListener("load", async () => {
  const out = {images: [], shown: null};
  const entries = Object.entries(results).filter(([p, r]) => r.mime_type.startsWith("image/"));
  await Promise.all(entries.map(([p, r]) => new Promise(done => {
    const img = new Image();
    img.onload = () => { out.images.push({path: p, ok: img.complete && img.naturalWidth > 0,
                                          w: img.naturalWidth, h: img.naturalHeight}); done(); };
    img.onerror = () => { out.images.push({path: p, ok: false}); done(); };
    img.src = r.data_uri;
  })));
  // open one scan figure the way a click in the report's menu does
  const scan = entries.find(([p, r]) => p.includes("gallery"));
  if (scan && typeof app !== "undefined") {
    app.setView({content: "img", contentPath: scan[1].data_uri, resultPath: scan[0]});
  }
  for (let i = 0; i < 50 && !document.querySelector("#app img[src^='data:image']"); i++) {
    await new Promise(r => setTimeout(r, 100));
  }
  const shown = document.querySelector("#app img[src^='data:image']");
  if (shown) {
    if (!shown.complete) await new Promise(r => { shown.onload = r; shown.onerror = r; });
    out.shown = {ok: shown.complete && shown.naturalWidth > 0, w: shown.naturalWidth, path: scan[0]};
  }
  const pre = document.createElement("pre");
  pre.id = "hemocam-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium(binary, page, profile, *args, timeout=120):
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
           *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_chromium(report_html, tmp_path, capsys):
    binary = chromium_binary()
    if binary is None:
        msg = "chromium not installed: run tests/report/install_chromium.sh (Debian package chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    page = tmp_path / "report_check.html"
    text = report_html.read_text()
    assert "</body>" in text
    cut = text.rindex("</body>")  # the last one: libraries embedded above may contain the string
    page.write_text(text[:cut] + CHECK_JS + text[cut:])

    proc = chromium(binary, page, tmp_path / "profile-dom", "--dump-dom", "--enable-logging=stderr", "--v=0")
    js_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert not js_errors, f"JavaScript errors in the report: {js_errors[:5]}"
    m = re.search(r'<pre id="hemocam-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the check script did not finish (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    check = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    expected = {p for p, r in report_results(report_html).items() if r["mime_type"].startswith("image/")}
    assert {i["path"] for i in check["images"]} == expected
    broken = [i["path"] for i in check["images"] if not i["ok"]]
    assert not broken, f"images that do not load in Chromium: {broken}"
    assert check["shown"] and check["shown"]["ok"], check["shown"]

    shot = tmp_path / "report_scan.png"
    proc = chromium(binary, page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,1000",
                    "--hide-scrollbars")
    assert shot.exists(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    with Image.open(shot) as im:
        gray = np.asarray(im.convert("L"), float)
    assert gray.std() > 10, "blank screenshot"
    # the scan figure is drawn on black: a report showing it has a large dark area
    assert (gray < 30).mean() > 0.05, "the scan figure is not visible in the screenshot"
    with capsys.disabled():
        print(f"\nreport screenshot: {shot}")
