"""Incremental builds: a version extended with new inputs, less deleted ids, equals one build
of the same corpus (vectors, items, thumbnails); a re-sent id replaces its item."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from clipsearch.builder.build import BuildError, BuildOptions, run_build
from clipsearch.builder.incremental import BaseError
from clipsearch.finetune.synth import write_tsv
from clipsearch.index.format import current_version_dir
from tests.builder.test_build import load_vectors
from tests.conftest import encode_image, make_image


def _opts(output, inputs, model, **kw) -> BuildOptions:
    return BuildOptions(inputs=inputs, output=output, model=model.info.spec, device="cpu", progress=False,
                        index_type="flat", shard_size=16, **kw)


def _version(output):
    version = current_version_dir(output)
    out = {m: load_vectors(version, m) for m in ("image", "text")}
    return out, (version / "image.thumbs").read_bytes()


def test_extended_version_equals_a_full_build(tmp_path, tiny_model) -> None:
    a, b, c = (tmp_path / f"{n}.tsv" for n in "abc")
    for seed, path, n in ((1, a, 30), (2, b, 20), (3, c, 15)):
        write_tsv(path, n, seed=seed, lang="en")
    run_build(_opts(tmp_path / "full", [a, b, c], tiny_model), model=tiny_model)
    run_build(_opts(tmp_path / "inc", [a, b], tiny_model), model=tiny_model)
    extended = run_build(_opts(tmp_path / "inc", [c], tiny_model, base=True), model=tiny_model)
    assert extended.extra["encoded_this_run"] == 2 * 15  # only the new input was encoded
    (full, full_thumbs), (inc, inc_thumbs) = _version(tmp_path / "full"), _version(tmp_path / "inc")
    for modality in ("image", "text"):
        assert [i["id"] for i in inc[modality][1]] == [i["id"] for i in full[modality][1]]
        assert inc[modality][1] == full[modality][1]
        np.testing.assert_array_equal(inc[modality][0], full[modality][0])
    assert inc_thumbs == full_thumbs

    gone = tmp_path / "gone.txt"
    gone.write_text("# removed by request\na:3\nc:1\n\nc:15\n")
    run_build(_opts(tmp_path / "inc", [], tiny_model, base=True, delete=gone), model=tiny_model)
    (after, _) = _version(tmp_path / "inc")
    for modality in ("image", "text"):
        keep = [i for i, item in enumerate(full[modality][1]) if item["id"] not in {"a:3", "c:1", "c:15"}]
        assert after[modality][1] == [full[modality][1][i] for i in keep]
        np.testing.assert_array_equal(after[modality][0], full[modality][0][keep])


def test_a_resent_id_replaces_its_item(tmp_path, tiny_model) -> None:
    def jsonl(path, seeds):
        path.write_text("".join(json.dumps({"id": f"x{i}", "image": encode_image(make_image(s)),
                                            "metadata": {"seed": s}}) + "\n" for i, s in seeds))
    first, update = tmp_path / "first.jsonl", tmp_path / "update.jsonl"
    jsonl(first, [(1, 11), (2, 12), (3, 13)])
    jsonl(update, [(2, 99)])
    out = tmp_path / "index"
    run_build(_opts(out, [first], tiny_model), model=tiny_model)
    run_build(_opts(out, [update], tiny_model, base=True), model=tiny_model)
    vectors, items = load_vectors(current_version_dir(out), "image")
    assert [(i["id"], i["metadata"]["seed"]) for i in items] == [("x1", 11), ("x3", 13), ("x2", 99)]
    sent = Image.open(io.BytesIO(base64.b64decode(encode_image(make_image(99)))))
    np.testing.assert_allclose(vectors[2], tiny_model.encode_images([sent])[0], atol=1e-6)


def test_base_needs_a_published_version_of_the_same_model(tmp_path, tiny_model) -> None:
    corpus = tmp_path / "c.tsv"
    write_tsv(corpus, 5, seed=1, lang="en")
    with pytest.raises(BaseError, match="no published version"):
        run_build(_opts(tmp_path / "none", [corpus], tiny_model, base=True), model=tiny_model)
    with pytest.raises(BuildError, match="--delete needs --base"):
        run_build(_opts(tmp_path / "none", [corpus], tiny_model, delete=corpus), model=tiny_model)


def test_dedup_drops_exact_duplicates_after_the_first(tmp_path, tiny_model) -> None:
    corpus, more = tmp_path / "corpus.tsv", tmp_path / "more.tsv"
    write_tsv(corpus, 10, seed=4, lang="en")
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join([*lines, lines[2], lines[5]]) + "\n")  # two pairs again
    plain = run_build(_opts(tmp_path / "plain", [corpus], tiny_model), model=tiny_model)
    assert plain.encoded == {"image": 12, "text": 12}
    once = run_build(_opts(tmp_path / "once", [corpus], tiny_model, dedup=True), model=tiny_model)
    _, items = load_vectors(once.version_dir, "image")
    assert once.encoded == {"image": 10, "text": len({line.split("\t")[0] for line in lines})}
    assert [i["id"] for i in items] == [str(n) for n in range(1, 11)]  # the first occurrences stay
    more.write_text(lines[7] + "\n" + lines[0].split("\t")[0] + "\t" + lines[1].split("\t")[1] + "\n")
    grown = run_build(_opts(tmp_path / "once", [more], tiny_model, base=True, dedup=True), model=tiny_model)
    assert grown.encoded["image"] == 10  # both images were in the base already
