"""Screenshot a built report with one scan figure open, as tests/test_report.py checks it.

    .venv/bin/python tests/report/screenshot.py report.html docs/report-demo.png
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_report import CHECK_JS, chromium, chromium_binary  # noqa: E402


def main(report, out):
    binary = chromium_binary()
    if binary is None:
        sys.exit("chromium not installed: run tests/report/install_chromium.sh")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = Path(report).read_text()
        cut = text.rindex("</body>")
        page = tmp / "page.html"
        page.write_text(text[:cut] + CHECK_JS + text[cut:])
        shot = tmp / "shot.png"
        proc = chromium(binary, page, tmp / "profile", f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
        if not shot.exists():
            sys.exit(f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
