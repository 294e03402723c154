"""The README's first command, shortened: every stage of the demo runs and reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "clipsearch", "demo", "--workdir", str(tmp_path), "--n-train", "200",
                        "--epochs", "1", "--no-serve"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "t2i R@1", "curl -s", "/search/text"):
        assert stage in r.stdout, stage
    assert (tmp_path / "train-output" / "best" / "open_clip_config.json").is_file()
    assert (tmp_path / "index" / "CURRENT").is_file()
