"""The reverse-proxy example in deploy/nginx serves clipsearch as its comments say (real nginx,
installed by .ci/run; skipped where no nginx binary is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import free_port, live_server, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_example_proxies_and_keeps_its_promises(tmp_path, tiny_model) -> None:
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as upstream:
        port = free_port()
        conf = (ROOT / "deploy/nginx/clipsearch.conf").read_text()
        conf = conf.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("pid /run/clipsearch-nginx.pid;", f"pid {tmp_path}/nginx.pid;")
        prefix = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's temp paths
        (tmp_path / "logs").mkdir()
        (tmp_path / "nginx.conf").write_text(prefix + conf)
        proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g",
                                 f"daemon off; error_log {tmp_path}/logs/error.log;"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            if not wait_until_up(f"{base}/healthz", process=proc, seconds=20):
                raise AssertionError(f"nginx did not serve: {(tmp_path / 'logs/error.log').read_text()}")
            via = httpx.post(f"{base}/embed", json={"texts": ["a red circle"]}, timeout=30).json()["texts"]
            direct = httpx.post(f"http://127.0.0.1:{upstream}/embed", json={"texts": ["a red circle"]},
                                timeout=30).json()["texts"]
            np.testing.assert_allclose(via, direct, atol=1e-6)
            assert httpx.get(f"{base}/metrics", timeout=5).status_code == 403
            assert httpx.post(f"{base}/admin/reload", timeout=5).status_code == 403
            big = httpx.post(f"{base}/embed", content=b"x" * (40 << 20), timeout=30,
                             headers={"content-type": "application/json"})
            assert big.status_code == 413
        finally:
            proc.terminate()
            proc.wait(10)
