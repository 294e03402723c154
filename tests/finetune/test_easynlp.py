"""EasyNLP's three CLIP commands, typed as its documentation types them (flags as --flag=value
and as --flag value), run by `clipsearch easynlp`: train writes --checkpoint_dir, evaluate
reads it (the same recall as the native evaluate), and predict writes EasyNLP's feature file
with the checkpoint's own vectors; flags that mean nothing here warn once each, and unknown
flags or EasyNLP's own model names fail with one line that says what to pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch.finetune.synth import synth_rows
from clipsearch.inputs.pairs import decode_offline_image
from clipsearch.model.clip import load_model

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", "easynlp", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("easynlp")
    rows = synth_rows(64, seed=3, image_size=64)
    out = {"train": root / "MUGE_MR_train_sampled_part.tsv", "valid": root / "MUGE_MR_valid_sampled_part.tsv",
           "text": root / "MUGE_MR_test_sampled_part_text.tsv", "image": root / "MUGE_MR_test_sampled_part_image.tsv"}
    out["train"].write_text("".join(f"{c}\t{i}\n" for c, i, _ in rows[:48]))
    out["valid"].write_text("".join(f"{c}\t{i}\n" for c, i, _ in rows[48:]))
    out["text"].write_text("".join(f"{c}\n" for c, _, _ in rows[48:]))
    out["image"].write_text("".join(f"{i}\n" for _, i, _ in rows[48:]))
    return out


@pytest.mark.slow
def test_the_three_commands_as_typed(tables, tiny_spec, tmp_path) -> None:
    ckpt = tmp_path / "clip_model"
    r = _run("--mode", "train", "--worker_gpu=1", f"--tables={tables['train']},{tables['valid']}",
             "--input_schema=text:str:1,image:str:1", "--first_sequence=text", "--second_sequence=image",
             f"--checkpoint_dir={ckpt}/", "--learning_rate=1e-4", "--epoch_num=1", "--random_seed=42",
             "--logging_steps=100", "--save_checkpoint_steps", "200", "--sequence_length=32",
             "--micro_batch_size=16", "--app_name=clip", "--save_all_checkpoints",
             f"--user_defined_parameters=pretrain_model_name_or_path={tiny_spec} fix_vision=True mode=finetune")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --sequence_length=32: ignored (texts are cut at the model's own context length)"]
    assert (ckpt / "best").is_dir()

    r = _run("--mode", "evaluate", "--worker_gpu=1", f"--tables={tables['valid']}",
             "--input_schema=text:str:1,image:str:1", "--first_sequence=text", "--second_sequence=image",
             f"--checkpoint_dir={ckpt}/", "--random_seed=42", "--logging_steps=100", "--save_checkpoint_steps=500",
             "--sequence_length=32", "--micro_batch_size=32", "--app_name=clip")
    assert r.returncode == 0, r.stderr[-3000:]
    native = subprocess.run([sys.executable, "-m", "clipsearch", "evaluate", "--data", str(tables["valid"]),
                             "--model", f"local-dir:{ckpt}/best", "--device", "auto", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert json.loads(r.stdout.splitlines()[-1]) == json.loads(native.stdout)
    assert "text-to-image: R@1" in r.stdout

    model = load_model(f"local-dir:{ckpt}/best", device="cpu")
    for feature, table in (("text", tables["text"]), ("image", tables["image"])):
        out = tmp_path / f"{feature}_feat.tsv"
        r = _run("--mode", "predict", "--worker_gpu=1", f"--tables={table}", f"--input_schema={feature}:str:1",
                 f"--output_schema={feature}_feat", f"--outputs={out}", f"--first_sequence={feature}",
                 f"--checkpoint_dir={ckpt}/", "--random_seed=42", "--logging_steps=100",
                 "--save_checkpoint_steps=500", "--sequence_length=32", "--micro_batch_size=2", "--app_name=clip")
        assert r.returncode == 0, r.stderr[-3000:]
        lines = out.read_text().splitlines()
        inputs = table.read_text().splitlines()
        assert len(lines) == len(inputs) and all(len(line.split("\t")) == model.dim for line in lines)
        got = np.asarray([[float(x) for x in line.split("\t")] for line in lines], np.float32)
        if feature == "text":
            want = model.encode_tokens(model.tokenize(inputs))
        else:
            want = model.encode_pixels(torch.stack([model.preprocess(decode_offline_image(b)) for b in inputs]))
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_what_cannot_run_here_says_what_to_pass(tables, tmp_path) -> None:
    common = [f"--tables={tables['train']}", "--input_schema=text:str:1,image:str:1", "--first_sequence=text",
              "--second_sequence=image", f"--checkpoint_dir={tmp_path / 'ckpt'}"]
    r = _run("--mode=train", *common, "--app_name=clip",
             "--user_defined_parameters=pretrain_model_name_or_path=clip_chinese_roberta_large_with_vit_large")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "an EasyNLP model name" in r.stderr and "hf:OFA-Sys/chinese-clip-vit-large-patch14" in r.stderr
    r = _run("--mode=train", *common, "--no_such_flag=3", "--user_defined_parameters=pretrain_model_name_or_path=x")
    assert r.returncode == 2 and "--no_such_flag: not an EasyNLP CLIP flag" in r.stderr
    r = _run("--mode=evaluate", *common, "--app_name=text_classify")
    assert r.returncode == 2 and "only EasyNLP's clip app" in r.stderr
    r = _run("--mode=predict", *common[:-1], "--input_schema=query:str:1", f"--checkpoint_dir={tmp_path}",
             "--output_schema=text_feat", f"--outputs={tmp_path / 'o.tsv'}")
    assert r.returncode == 2 and "no column 'text'" in r.stderr
    assert not (tmp_path / "ckpt").exists()
