"""Training in several processes (torchrun, gloo on CPUs) is training on the global batch:
two processes of 4 rows each give the losses and weights of one process of 8 rows, with a
row that fails to decode making the shares unequal; a resumed 2-process run continues
exactly; --worker_gpu starts torchrun as --nproc-per-node does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch

from clipsearch.finetune.distributed import GlobalBatches, World
from clipsearch.finetune.synth import write_tsv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """19 good rows and one that does not decode: global batches of 8, 8 and 3 usable rows."""
    path = write_tsv(tmp_path_factory.mktemp("ddp") / "pairs.tsv", 19, seed=1, image_size=64)
    lines = path.read_text().splitlines()
    lines.insert(7, "a row whose image is broken\tnot-base64!!")
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(pairs: Path, output: Path, model: str, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "clipsearch", "train", "--train", str(pairs), "--output", str(output),
                        "--model", model, "--device", "cpu", "--lr", "1e-4", "--warmup-steps", "1", "--seed", "5",
                        "--logging-steps", "1", "--no-progress", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return [orjson.loads(line) for line in (output / "metrics.jsonl").read_bytes().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    """Equal within `atol`. Adam divides each gradient by its running size (+ 1e-6), so where a
    true gradient is near zero, summation-order rounding moves a weight by up to lr x noise /
    1e-6: the runs use lr 1e-4 to keep that under 1e-5."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].float(), b[name].float()
        if name.endswith("attn.in_proj_bias"):
            # Softmax ignores a shift shared by all keys, so the key bias's true gradient is 0 and
            # what it gets is rounding noise, which Adam scales up to ±lr: compare queries and values.
            d = len(x) // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


def test_global_batches_split_one_process_batches_between_ranks() -> None:
    one = list(GlobalBatches(21, 8, World(), seed=3))
    loader = torch.utils.data.DataLoader(range(21), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    assert one == [b.tolist() for b in loader]  # one process: the order DataLoader(shuffle=True) draws
    shares = [list(GlobalBatches(21, 4, World(rank=r, size=2), seed=3)) for r in range(2)]
    assert [a + b for a, b in zip(*shares, strict=True)] == one
    assert [len(s) for s in shares[0]] == [4, 4, 3] and [len(s) for s in shares[1]] == [4, 4, 2]
    assert list(GlobalBatches(21, 4, World(rank=1, size=2), seed=3, start=1)) == shares[1][1:]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["open_clip", "siglip"])
def test_two_processes_train_as_one_on_the_global_batch(pairs, tmp_path, tiny_spec, hf_spec, family) -> None:
    model = tiny_spec if family == "open_clip" else hf_spec("siglip")
    one = _train(pairs, tmp_path / "one", model, "--batch-size", "8", "--epochs", "1")
    two = _train(pairs, tmp_path / "two", model, "--batch-size", "4", "--epochs", "1", "--nproc-per-node", "2")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    _assert_same_weights(_weights(tmp_path / "one/checkpoints/step-3.pt"),
                         _weights(tmp_path / "two/checkpoints/step-3.pt"), atol=1e-5)
    assert torch.load(tmp_path / "two/checkpoints/step-3.pt", weights_only=False)["world_size"] == 2
    assert (tmp_path / "two/best").is_dir()


@pytest.mark.slow
def test_two_process_run_resumes_where_it_stopped(pairs, tmp_path, tiny_spec) -> None:
    args = ("--batch-size", "4", "--epochs", "2", "--save-steps", "2", "--save-all-checkpoints",
            "--nproc-per-node", "2")
    straight = _train(pairs, tmp_path / "a", tiny_spec, *args)
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    # the same run stopped after step 2, then started again with --resume auto
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a/checkpoints/step-2.pt", tmp_path / "b/checkpoints/step-2.pt")
    resumed = _train(pairs, tmp_path / "b", tiny_spec, *args, "--resume", "auto")
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(straight[2:], resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    _assert_same_weights(_weights(tmp_path / "a/checkpoints/step-6.pt"),
                         _weights(tmp_path / "b/checkpoints/step-6.pt"), atol=1e-6)


def test_worker_gpu_and_nproc_per_node_start_torchrun(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli import app

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train_args = ["train", "--train", "t.tsv", "--output", "o", "--nproc-per-node", "3", "--epochs", "1"]
    easynlp_args = ["easynlp", "--mode", "train", "--worker_gpu=3", "--tables=t.tsv", "--input_schema=text:str:1,"
                    "image:str:1", "--first_sequence=text", "--second_sequence=image", "--checkpoint_dir=o",
                    "--user_defined_parameters=pretrain_model_name_or_path=clipsearch-tiny"]
    for argv in (train_args, easynlp_args):
        monkeypatch.setattr(sys, "argv", ["clipsearch", *argv])
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m",
                "clipsearch"]
    assert calls == [[*launcher, "train", "--train", "t.tsv", "--output", "o", "--epochs", "1"],
                     [*launcher, *(a for a in easynlp_args if a != "--worker_gpu=3")]]
