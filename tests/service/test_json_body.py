"""Request bodies that are not JSON, or hold numbers no field takes, get a clear 422."""

from __future__ import annotations


async def test_a_body_that_is_not_json_gets_a_422_naming_the_body(make_client, tiny_model) -> None:
    """Every route with a body reads it the same way: one message naming the body and where
    the JSON broke."""
    cases = {b'{"texts": ["a"': "EOF while parsing a list at line 1 column 14",
             b'{"texts":\n ["a"] x}': "at line 2 column", b"\xff\xfe": "at line 1 column 1", b"": "at line 1 column 0"}
    async with make_client(tiny_model) as client:
        for path in ("/embed", "/search/text", "/search/image", "/classify", "/similarity"):
            for body, reason in cases.items():
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 422, (path, body, r.text)
                error = r.json()["error"]
                assert error["field"] == "body" and error["message"].startswith("body: not valid JSON: "), error
                assert reason in error["message"], (path, error)
        for body, field in ((b'{"text": "x", "k": 1e400}', "k"), (b'{"text": "x", "k": -1e400}', "k"),
                            (b'{"text": "x", "k": NaN}', "k"), (b'{"text": "x", "nprobe": 99999999999999999999999}',
                                                              "nprobe")):
            r = await client.post("/search/text", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


async def test_json_sent_as_curl_sends_it_without_a_header(make_client, tiny_model) -> None:
    """`curl -d '{...}'` labels its body urlencoded: a JSON object still reads as JSON, and a
    real urlencoded form still reads as a form."""
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    async with make_client(tiny_model) as client:
        r = await client.post("/embed", content=b'{"texts": ["a red circle"]}', headers=urlencoded)
        assert r.status_code == 200 and len(r.json()["texts"]) == 1
        r = await client.post("/embed", content=b"texts=a+red+circle&texts=two", headers=urlencoded)
        assert r.status_code == 200 and len(r.json()["texts"]) == 2
