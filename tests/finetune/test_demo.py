"""The README's first command, shortened: every stage of the demo runs and reports, and the
curl lines it prints work against the service it built."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "clipsearch", "demo", "--workdir", str(tmp_path), "--n-train", "200",
                        "--epochs", "1", "--no-serve"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "t2i R@1", "curl -s", "/search/text",
                  "/ui in a browser"):
        assert stage in r.stdout, stage
    assert (tmp_path / "train-output" / "best" / "open_clip_config.json").is_file()
    assert (tmp_path / "index" / "CURRENT").is_file()

    from service.http.app import create_app
    from service.settings import Settings
    from tests.conftest import live_server

    lines = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("curl -s")]
    assert len(lines) == 5 and sum("=@" in line for line in lines) == 3
    settings = Settings(model=f"local-dir:{tmp_path / 'train-output' / 'best'}", index_dir=tmp_path / "index",
                        device="cpu", warmup=False)
    with live_server(create_app(settings)) as port:
        for line in lines:
            line = re.sub(r"http://[\w.]+:\d+", f"http://127.0.0.1:{port}", line)
            done = subprocess.run(["bash", "-c", f"{line} -o /dev/null -w '%{{http_code}}'"], capture_output=True,
                                  text=True, timeout=60)
            assert done.stdout == "200", (line, done.stdout, done.stderr)
