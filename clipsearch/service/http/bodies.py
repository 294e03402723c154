"""Request bodies: JSON, or `multipart/form-data` (`curl -F image=@cat.jpg`), into one pydantic
model per route, with the same limits and the same errors either way.

In a form, a field of the model is one part (or, for a list field, one part per item, in
order); an image is an uploaded file or a text part holding what JSON would (base64, a data:
URI or a URL). Integers, booleans and filters (JSON) come as text and are read as JSON's
are; an empty one or `null` is left out.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, TypeVar

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from clipsearch.core.errors import PayloadTooLarge
from clipsearch.service.settings import Settings

Body = TypeVar("Body", bound=BaseModel)

_INTEGER = re.compile(r"^-?[0-9]{1,4000}$")  # Python reads up to 4300 digits
_NUMBER = re.compile(r"^-?[0-9]{1,300}(\.[0-9]{1,300})?([eE][-+]?[0-9]{1,3})?$")
_ABSENT = object()
URLENCODED = "application/x-www-form-urlencoded"
FORM_TYPES = ("multipart/form-data", URLENCODED)


async def read_body(request: Request, model: type[Body], settings: Settings) -> Body:
    """The body validated as `model`: a form when the request says multipart/form-data (or
    urlencoded, unless the body is a JSON object: what `curl -d @query.json` sends without a
    header), else JSON whatever the content type, parsed and validated in one pass of
    pydantic-core (NaN and Infinity refused). Errors are the same 422 as a body parameter's.
    Such a route declares its body with `openapi_extra=body_schema(model)`."""
    kind = request.headers.get("content-type", "").lower()
    if kind.startswith(FORM_TYPES) and not (kind.startswith(URLENCODED) and
                                            (await request.body()).lstrip().startswith(b"{")):
        data = await _read_form(request, model, settings)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _body_errors(exc) from None
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _body_errors(exc) from None


def _body_errors(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])


def _refuse(name: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", name), "msg": message, "input": None}])


def _is_list(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    return field is not None and typing.get_origin(field.annotation) is list


def _kinds(model: type[BaseModel], name: str, *, items: bool = False) -> set[Any]:
    """The plain types a field takes: {int}, {int, NoneType}, {dict}, ...; with `items`, those
    of a list field's items."""
    field = model.model_fields.get(name)
    if field is None:
        return set()
    annotation = field.annotation
    if items and typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return {typing.get_origin(o) or o for o in _options(annotation)}


def _options(annotation: Any) -> list[Any]:
    """The plain types of an annotation: unions and Annotated unwrapped, nested ones too."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _options(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [plain for option in typing.get_args(annotation) for plain in _options(option)]
    return [annotation]


def _takes_files(model: type[BaseModel], name: str) -> bool:
    """Whether a field (or its items) may be bytes, that is an uploaded file: the images."""
    return bytes in _kinds(model, name, items=True)


def _text_value(model: type[BaseModel], name: str, value: str) -> Any:
    """A form's text part as the field's JSON value: an integer, a boolean, a JSON object (a
    filter), or the text itself."""
    kinds = _kinds(model, name)
    text = value.strip()
    if int in kinds and _INTEGER.match(text):
        return int(text)
    if float in kinds and _NUMBER.match(text):
        return float(text)
    if (int in kinds or dict in kinds) and text in ("", "null"):
        return _ABSENT  # how a form leaves out an optional value: the default applies
    if bool in kinds and text.lower() in ("true", "false", "1", "0", "on", "off"):
        return text.lower() in ("true", "1", "on")
    if dict in kinds:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            raise _refuse(name, "expected a JSON object") from None
    return value


def _largest_text_part(settings: Settings) -> int:
    """A text part may carry a base64 image as JSON would."""
    return max(1 << 20, settings.max_image_bytes * 4 // 3 + 1024, settings.max_text_chars * 4 + 1024)


async def _read_form(request: Request, model: type[BaseModel], settings: Settings) -> dict[str, Any]:
    items = settings.max_items_per_request
    data: dict[str, Any] = {}
    async with request.form(max_files=items, max_fields=items + 16,
                            max_part_size=_largest_text_part(settings)) as form:
        ignored = model.model_config.get("extra") == "ignore"
        for name, value in form.multi_items():
            if ignored and name not in model.model_fields:
                continue  # a field this form does not know, as its JSON body would ignore it
            listed = _is_list(model, name)
            if not listed and name in data:
                raise _refuse(name, "given more than once; a form gives this field once")
            item = f"{name}[{len(data.get(name, ()))}]" if listed else name
            if isinstance(value, UploadFile):
                if not _takes_files(model, name):
                    raise _refuse(item, "a file was uploaded here; this field takes text")
                if value.size is not None and value.size > settings.max_image_bytes:
                    raise PayloadTooLarge(f"{item}: image is larger than the limit of {settings.max_image_bytes} "
                                          "bytes", field=item)
                parsed: Any = await value.read()
            else:
                parsed = _text_value(model, name, value)
                if parsed is _ABSENT:
                    continue
            if listed:
                data.setdefault(name, []).append(parsed)
            else:
                data[name] = parsed
    return data


def body_schema(model: type[BaseModel], *, form: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body with `read_body`: JSON, and with
    `form` also multipart/form-data, where images are uploaded files."""
    schema = model.model_json_schema()
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if form:
        upload = {"type": "string", "format": "binary", "description": "an image file"}
        properties = {}
        for name, prop in schema.get("properties", {}).items():
            if _takes_files(model, name):
                prop = {**prop, "items": upload} if prop.get("type") == "array" else {**upload}
            properties[name] = prop
        multipart = {**schema, "properties": properties}
        encoding = {name: {"contentType": "image/*, application/octet-stream"} for name in properties
                    if _takes_files(model, name)}
        content["multipart/form-data"] = {"schema": multipart, "encoding": encoding}
    return {"requestBody": {"required": True, "content": content}}
