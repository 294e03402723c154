"""Request bodies are parsed by pydantic-core's JSON parser (`parse_json`): the same values as
orjson (the parser before it) on any document, the same documents refused, and a clear 422."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.http.routes import parse_json

json_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
edits = st.sampled_from(["keep", "delete", "insert", "replace"])
pads = st.sampled_from(["", " \n\t"])


def _outside_64_bits(value: object) -> bool:
    """Numbers orjson refuses or turns into floats: ints past 64 bits and floats that overflow."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, float):
        return value in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return any(map(_outside_64_bits, value))
    if isinstance(value, dict):
        return any(map(_outside_64_bits, value.values()))
    return False


@settings(max_examples=400, deadline=None)
@given(doc=json_docs, edit=edits, at=st.integers(0, 10**6), byte=st.integers(0, 255), pad=pads)
def test_parse_json_reads_what_orjson_reads(doc, edit: str, at: int, byte: int, pad: str) -> None:
    raw = bytearray(pad.encode() + orjson.dumps(doc) + pad.encode())
    i = at % (len(raw) + 1)
    if edit == "delete" and i < len(raw):
        del raw[i]
    elif edit == "insert":
        raw.insert(i, byte)
    elif edit == "replace" and i < len(raw):
        raw[i] = byte
    body = bytes(raw)
    try:
        want: object = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        want = exc
    try:
        got: object = parse_json(body)
    except json.JSONDecodeError as exc:
        got = exc
    if "infinity" in str(want) or _outside_64_bits(got):  # an edit made a number overflow: see below
        return
    assert isinstance(got, Exception) == isinstance(want, Exception), (body, got, want)
    if isinstance(got, Exception):
        assert got.msg and 0 <= got.pos <= len(body), got
    else:
        assert got == want and type(got) is type(want), (body, got, want)
    if edit == "keep":
        assert got == doc


def test_numbers_past_64_bits_still_get_a_4xx_from_the_schemas() -> None:
    """Where the parsers differ (orjson refused 1e400 and read big ints as floats; jiter reads
    inf and exact ints), no request field takes a float, and int fields are bounded."""
    assert parse_json(b"[1e400, 123456789012345678901234567890]") == [float("inf"), 123456789012345678901234567890]


async def test_a_body_that_is_not_json_gets_a_422_naming_the_body(make_client, tiny_model) -> None:
    """Both ways a body is read: `read_body` (/embed, /search/*: pydantic-core parses and
    validates in one pass) and FastAPI's body parameter over `parse_json` (/classify)."""
    cases = {b'{"texts": ["a"': "EOF while parsing a list at line 1 column 14",
             b'{"texts":\n ["a"] x}': "at line 2 column", b"\xff\xfe": "at line 1 column 1", b"": "at line 1 column 0"}
    async with make_client(tiny_model) as client:
        for path in ("/embed", "/search/text", "/classify"):
            for body, reason in cases.items():
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 422, (path, body, r.text)
                error = r.json()["error"]
                if path == "/classify" and not body:  # FastAPI reads an empty body as a missing one
                    assert error["message"] == "body: Field required", error
                    continue
                assert error["field"] == "body" and error["message"].startswith("body: not valid JSON: "), error
                assert reason in error["message"], (path, error)
        for body, field in ((b'{"text": "x", "k": 1e400}', "k"), (b'{"text": "x", "k": -1e400}', "k"),
                            (b'{"text": "x", "k": NaN}', "k"), (b'{"text": "x", "nprobe": 99999999999999999999999}',
                                                              "nprobe")):
            r = await client.post("/search/text", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
