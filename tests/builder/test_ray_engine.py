"""The Ray engine: on a local Ray cluster, the same index as the local engine (ids, vectors,
skipped records), also after an interrupted Ray run resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch.builder.build import BuildError, BuildOptions, run_build
from clipsearch.builder.writer import WORK_DIR
from clipsearch.index.search import load_index_set
from tests.conftest import encode_image, make_image, make_photo_folder

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs, started here; the builder joins it as a driver would."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _corpus(tmp_path: Path) -> list[Path]:
    """A TSV with bad records in two different spans, and an image directory."""
    lines = []
    for i in range(150):
        image = encode_image(make_image(900 + i), urlsafe=i % 2 == 0)
        lines.append(f"caption {i}\t{'not base64 @@' if i in (20, 131) else image}")
    (tmp_path / "corpus.tsv").write_text("\n".join(lines) + "\n")
    return [tmp_path / "corpus.tsv", make_photo_folder(tmp_path, 20, seed=2000)]


def _opts(inputs: list[Path], output: Path, spec: str, **kw) -> BuildOptions:
    return BuildOptions(inputs=inputs, output=output, model=spec, device="cpu", shard_size=32, progress=False,
                        workers=0, **kw)


def _contents(version_dir: Path, fingerprint: str, dim: int) -> dict[str, tuple[list, np.ndarray]]:
    served = load_index_set(version_dir, fingerprint=fingerprint, dim=dim)
    out = {}
    for modality in ("image", "text"):
        index = served.get(modality)
        out[modality] = ([it["id"] for it in index.items], index.vectors_of(np.arange(index.count)))
    return out


def _assert_same(a, b) -> None:
    for modality in ("image", "text"):
        ids_a, vec_a = a[modality]
        ids_b, vec_b = b[modality]
        assert ids_a == ids_b
        assert (vec_a * vec_b).sum(1).min() >= 0.9999


@pytest.mark.slow
def test_ray_build_equals_local_build_and_resumes(cluster, tiny_spec, tiny_model, tmp_path: Path) -> None:
    inputs = _corpus(tmp_path)
    local = run_build(_opts(inputs, tmp_path / "local", tiny_spec), model=tiny_model)
    on_ray = run_build(_opts(inputs, tmp_path / "ray", tiny_spec, engine="ray"), model=tiny_model)
    fp, dim = tiny_model.info.fingerprint, tiny_model.dim
    want = _contents(local.version_dir, fp, dim)
    assert len(want["image"][0]) == 168 and len(want["text"][0]) == 150  # 150 + 20 images, 2 + 1 bad
    _assert_same(want, _contents(on_ray.version_dir, fp, dim))
    assert sorted((e["source"], e["reason"]) for e in on_ray.errors) == \
        sorted((e["source"], e["reason"]) for e in local.errors)
    assert on_ray.skipped == local.skipped == 3

    # interrupted: the first bad record stops the Ray run (--max-errors 0) after some shards
    with pytest.raises(BuildError, match="more than --max-errors 0"):
        run_build(_opts(inputs, tmp_path / "resume", tiny_spec, engine="ray", max_errors=0), model=tiny_model)
    kept = list((tmp_path / "resume" / WORK_DIR).glob("*/shard-*.npz"))
    assert kept and not (tmp_path / "resume" / "CURRENT").exists()
    resumed = run_build(_opts(inputs, tmp_path / "resume", tiny_spec, engine="ray"), model=tiny_model)
    assert resumed.resumed_shards >= len(kept) >= 1
    _assert_same(want, _contents(resumed.version_dir, fp, dim))
    assert resumed.skipped == 3


@pytest.mark.slow
def test_cli_joins_a_running_cluster_by_address(cluster, tiny_spec, tiny_model, tmp_path: Path) -> None:
    """A second driver (the CLI, another process) joins the cluster by its address, as a job on
    a real cluster does with --ray-address auto or ray://; its inputs are given as fsspec URLs
    (file://), which the actors list and read through fsspec."""
    import subprocess
    import sys

    inputs = _corpus(tmp_path)
    address = ray.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "clipsearch", "index", "build", "-o", str(tmp_path / "cli"), "--model", tiny_spec,
            "--device", "cpu", "--shard-size", "32", "--workers", "0", "--no-progress", "--engine", "ray",
            "--ray-address", address]
    for path in inputs:
        args += ["--input", path.as_uri()]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped: 3" in r.stdout
    local = run_build(_opts(inputs, tmp_path / "local", tiny_spec), model=tiny_model)
    fp, dim = tiny_model.info.fingerprint, tiny_model.dim
    from clipsearch.index.format import current_version_dir

    _assert_same(_contents(local.version_dir, fp, dim), _contents(current_version_dir(tmp_path / "cli"), fp, dim))


def test_unknown_engine_is_refused(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown engine 'spark'"):
        run_build(_opts([tmp_path], tmp_path / "o", "x", engine="spark"), model=tiny_model)
