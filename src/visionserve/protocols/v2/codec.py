"""Open Inference Protocol (V2) wire format, free of HTTP and of models.

Covers the JSON tensor form, Triton's binary tensor data extension (a JSON header followed
by raw little-endian tensors, its length in ``Inference-Header-Content-Length``), BYTES
elements as 4-byte length-prefixed strings, MLServer's ``content_type: "base64"`` for
JSON BYTES, and gzip/deflate bodies. Every malformed input raises ``BadRequest`` with a
message that says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from visionserve.errors import BadRequest, PayloadTooLarge

# V2 datatype -> numpy dtype (little-endian, as the binary extension requires).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_LENGTH = np.dtype("<u4")

# Called with each input's name, datatype and shape before any of its elements is decoded,
# so a caller's limits (a batch size) hold before work in proportion to the element count.
InputCheck = Callable[[str, str, tuple[int, ...]], None]

# Elements converted to numpy at a time when decoding cooperatively (see ``split_body``).
_CHUNK_ELEMENTS = 1 << 16

# Most arrays, objects and strings a JSON request may hold (see ``parse_json``). A nested
# PIXELS tensor has one array per pixel: up to about a megapixel nested, any size flat.
MAX_JSON_CONTAINERS = 1 << 20


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded input tensor. BYTES tensors hold a flat list of ``bytes`` in ``data``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    parameters: Mapping[str, Any]
    inputs: list[Tensor]
    outputs: list[Mapping[str, Any]] | None  # the requested outputs as sent, None = all


# -- bodies ----------------------------------------------------------------------------------


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body with its Content-Encoding (gzip, deflate, identity) undone, at most ``max_bytes``."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        # HTTP's "deflate" is a zlib stream, but some clients send raw deflate: accept both.
        wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS
    else:
        raise BadRequest(f"unsupported Content-Encoding {content_encoding!r}: use gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise BadRequest(f"cannot decompress the {encoding} request body: {e}") from None
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"the decompressed request body exceeds the limit of {max_bytes} bytes")
    if not inflater.eof:
        raise BadRequest(f"the {encoding} request body is truncated")
    return out


def split_body(
    body: bytes, header_length: str | int | None, cooperative: bool = False
) -> tuple[dict[str, Any], memoryview]:
    """The JSON header object and the binary tensor data that follows it.

    ``cooperative``: for a large body parsed in a worker thread. CPython's JSON parser holds
    the GIL for the whole document, so a thread parsing megabytes of numbers stalls the event
    loop all the same; Python-level number hooks give the GIL up as they go (numbers parse
    about 3x slower).
    """
    json_end = json_length(len(body), header_length)
    if json_end == 0:
        raise BadRequest("the request body is empty: expected an inference request JSON object")
    try:
        header = parse_json(bytes(body[:json_end]), cooperative)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply for the parser
        hint = "" if header_length is not None else " (binary tensor data needs Inference-Header-Content-Length)"
        raise BadRequest(f"the inference request is not valid JSON: {json_problem(e)}{hint}") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    return header, memoryview(body)[json_end:]


def json_problem(e: ValueError | RecursionError) -> str:
    """What ``json.loads`` found wrong, in words for a client rather than Python's own (which
    name ``sys`` functions and codecs)."""
    if isinstance(e, RecursionError):
        return "it is nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte {e.start})"
    if "integer string conversion" in str(e):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return str(e)


def json_length(body_bytes: int, header_length: str | int | None) -> int:
    """How many of a body's bytes are its JSON header: all, or what
    Inference-Header-Content-Length says when binary tensor data follows."""
    if header_length is None or header_length == "":
        return body_bytes
    try:
        json_end = int(header_length)
    except (TypeError, ValueError):
        raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if json_end < 0 or json_end > body_bytes:
        raise BadRequest(f"Inference-Header-Content-Length {json_end} is outside the {body_bytes}-byte request body")
    return json_end


def parse_json(text: bytes, cooperative: bool = False) -> Any:
    """json.loads; ``cooperative``: giving the GIL up as it goes (see ``split_body``).

    BadRequest for a document of more than MAX_JSON_CONTAINERS arrays, objects and strings:
    the parser makes those without calling Python (only numbers reach the hooks), so
    millions of them (``[[],[],...]``, ``[[[[...]]]]``) held the GIL for seconds while being
    parsed, collected and freed; counted in the raw bytes first (vectorised, a few ms for 20 MB).
    A text no longer than the cap cannot hold more (each one takes a byte at least), so it is
    not counted: the route that parses it inline has counted it already, to decide that.
    """
    found = json_containers(text) if len(text) > MAX_JSON_CONTAINERS else 0
    if found > MAX_JSON_CONTAINERS:
        raise BadRequest(
            f"the request holds about {found} JSON arrays, objects and strings; at most {MAX_JSON_CONTAINERS} are "
            "taken: send large tensors as flat lists of numbers (row-major) or as binary data"
        )
    return json.loads(text, parse_int=_parse_int, parse_float=_parse_float) if cooperative else json.loads(text)


def json_containers(text: bytes | memoryview) -> int:
    """An upper bound of the arrays, objects and strings in a JSON text: its ``[``, ``{``
    and half its ``"`` (those inside strings count too, so it can only overestimate)."""
    raw = np.frombuffer(text, np.uint8)
    return sum(int(np.count_nonzero(raw == ord(c))) for c in "[{") + int(np.count_nonzero(raw == ord('"'))) // 2


def _parse_int(text: str) -> int:
    return int(text)


def _parse_float(text: str) -> float:
    return float(text)


# -- BYTES elements --------------------------------------------------------------------------


def pack_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary form: each one a little-endian uint32 length, then its bytes."""
    items = list(items)
    if not items:
        return b""
    lengths = np.fromiter((len(b) for b in items), dtype=_LENGTH, count=len(items))
    prefixes = [lengths[i : i + 1].tobytes() for i in range(len(items))]
    return b"".join(part for pair in zip(prefixes, items) for part in pair)


def unpack_bytes(buf: bytes | memoryview, expected: int | None = None) -> list[bytes]:
    """The BYTES elements of a length-prefixed buffer; every byte must belong to an element."""
    view = memoryview(buf)
    items: list[bytes] = []
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 4:
            raise BadRequest(f"BYTES data is truncated: {end - offset} byte(s) left where a 4-byte length was expected")
        size = int(np.frombuffer(view[offset : offset + 4], dtype=_LENGTH)[0])
        offset += 4
        if size > end - offset:
            raise BadRequest(f"BYTES element {len(items)} declares {size} bytes but only {end - offset} remain")
        items.append(bytes(view[offset : offset + size]))
        offset += size
        if expected is not None and len(items) > expected:
            raise BadRequest(f"BYTES data holds more than the {expected} element(s) its shape declares")
    if expected is not None and len(items) != expected:
        raise BadRequest(f"BYTES data holds {len(items)} element(s), its shape declares {expected}")
    return items


def decode_base64(text: str) -> bytes:
    # Line breaks are allowed (MIME base64, as `base64` writes it without -w0); nothing else.
    if "\n" in text:
        text = text.replace("\r\n", "").replace("\n", "")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("a BYTES element marked content_type 'base64' is not valid base64") from None


# -- requests --------------------------------------------------------------------------------


def parse_infer_request(
    header: Mapping[str, Any], binary: memoryview, check: InputCheck | None = None, cooperative: bool = False
) -> InferRequest:
    """Validates an inference request and decodes its inputs (JSON data or binary tensors).

    ``check`` sees each input's declared name, datatype and shape before its data is decoded;
    ``cooperative``: converting large JSON data gives the GIL up as it goes (see ``split_body``).
    """
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _parameters(header.get("parameters"), "request")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of input tensors")
    inputs: list[Tensor] = []
    offset = 0
    for i, spec in enumerate(raw_inputs):
        tensor, used = _parse_input(spec, i, binary[offset:], parameters, check, cooperative)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequest(
            f"the request has {len(binary) - offset} byte(s) of binary data that no input claims "
            "(check each input's binary_data_size)"
        )
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise BadRequest("'outputs' must be a list")
        for j, out in enumerate(outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadRequest(f"outputs[{j}] must be an object with a string 'name'")
            _parameters(out.get("parameters"), f"output '{out['name']}'")
    return InferRequest(request_id, parameters, inputs, outputs)


def _parameters(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"the {where} 'parameters' must be a JSON object")
    return value


def _parse_input(
    spec: Any,
    index: int,
    binary: memoryview,
    request_parameters: Mapping[str, Any],
    check: InputCheck | None,
    cooperative: bool,
) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise BadRequest(f"inputs[{index}] must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] needs a string 'name'")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:  # a list or object is not hashable
        raise BadRequest(
            f"input '{name}': unsupported datatype {datatype!r}; expected one of {', '.join(NUMPY_DTYPES)}"
        )
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    if check is not None:
        check(name, datatype, tuple(shape))
    params = _parameters(spec.get("parameters"), f"input '{name}'")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
        if size > len(binary):
            raise BadRequest(
                f"input '{name}' declares binary_data_size {size} but only {len(binary)} byte(s) of binary data remain"
            )
        chunk = binary[:size]
        if datatype == "BYTES":
            if size < 4 * count:  # each element has a 4-byte length: checked before reading any
                raise BadRequest(
                    f"input '{name}': binary_data_size {size} is too small for shape {shape} of BYTES "
                    f"(each of its {count} element(s) takes at least 4 bytes)"
                )
            data: np.ndarray | list[bytes] = unpack_bytes(chunk, count)
        else:
            dtype = NUMPY_DTYPES[datatype]
            if size != count * dtype.itemsize:
                raise BadRequest(
                    f"input '{name}': binary_data_size {size} does not match shape {shape} of {datatype} "
                    f"({count * dtype.itemsize} bytes)"
                )
            data = _reshape(np.frombuffer(chunk, dtype=dtype), shape, name)
        return Tensor(name, datatype, tuple(shape), data, params), size
    if "data" not in spec:
        raise BadRequest(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    data = _json_data(spec["data"], name, datatype, shape, params, request_parameters, cooperative)
    return Tensor(name, datatype, tuple(shape), data, params), 0


def _json_data(
    data: Any,
    name: str,
    datatype: str,
    shape: list[int],
    params: Mapping[str, Any],
    request_parameters: Mapping[str, Any],
    cooperative: bool = False,
) -> np.ndarray | list[bytes]:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _flatten(data if isinstance(data, list) else [data])
        if len(items) != count:
            raise BadRequest(f"input '{name}' has {len(items)} element(s), its shape {shape} needs {count}")
        content_type = params.get("content_type", request_parameters.get("content_type"))
        if content_type == "base64":
            if not all(isinstance(x, str) for x in items):
                raise BadRequest(f"input '{name}': base64 BYTES elements must be strings")
            return [decode_base64(x) for x in items]
        if not all(isinstance(x, str) for x in items):
            raise BadRequest(f"input '{name}': JSON BYTES elements must be strings")
        try:
            return [x.encode("utf-8") for x in items]
        except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which UTF-8 cannot hold
            raise BadRequest(
                f"input '{name}': a JSON BYTES element is not valid Unicode (it holds a lone UTF-16 surrogate); "
                "send binary data as base64 (content_type 'base64') or with the binary tensor extension"
            ) from None
    dtype = NUMPY_DTYPES[datatype]
    _check_layout(data, shape, name)
    try:
        array = _chunked_array(data, count, dtype) if cooperative else _array(data, dtype)
    except _Booleans:
        raise BadRequest(
            f"input '{name}': 'data' holds true/false, not {datatype} numbers (BOOL is a datatype of its own)"
        ) from None
    except ValueError:
        raise BadRequest(f"input '{name}': 'data' is a ragged nested list") from None
    except TypeError:  # chunks of unrelated kinds (numbers and strings) do not concatenate
        raise BadRequest(f"input '{name}': 'data' holds mixed values, not {datatype}") from None
    if array.size != count:
        raise BadRequest(f"input '{name}' has {array.size} element(s), its shape {shape} needs {count}")
    if array.size and not _json_kind_fits(array.dtype, dtype):
        raise BadRequest(f"input '{name}': 'data' holds {_kind_name(array.dtype)} values, not {datatype}")
    if dtype.kind in "ui" and array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise BadRequest(f"input '{name}': a value is out of range for {datatype}")
    return _reshape(array.astype(dtype), shape, name)


def _check_layout(data: Any, shape: list[int], name: str) -> None:
    """Refuses data whose outline does not fit the shape before converting it: flat or nested
    at most as deep as the shape, and as many elements as the shape has along its first
    elements (a regular array has them everywhere; numpy finds irregular ones). Converting
    is a C loop that holds the GIL, so the millions of elements of a body that declares a
    few (or nests lists far deeper) are refused without it."""
    lengths, node = [], data
    while isinstance(node, list) and len(lengths) <= len(shape):
        lengths.append(len(node))
        node = node[0] if node else None
    if len(lengths) > max(len(shape), 1):
        raise BadRequest(f"input '{name}': 'data' is nested deeper than its shape {shape}")
    found, count = math.prod(lengths), math.prod(shape)
    if found != count:
        raise BadRequest(f"input '{name}' has {found} element(s), its shape {shape} needs {count}")


def _chunked_array(data: Any, count: int, wanted: np.dtype) -> np.ndarray:
    """_array(data, wanted), a slice of the outermost list at a time: converting a list holds
    the GIL throughout, and millions of numbers take a good part of a second."""
    while isinstance(data, list) and len(data) == 1 and count > _CHUNK_ELEMENTS:
        data = data[0]  # [[...]]: the shape is restored by the caller's reshape
    if not isinstance(data, list) or len(data) < 2 or count <= _CHUNK_ELEMENTS:
        return _array(data, wanted)
    rows = max(1, len(data) * _CHUNK_ELEMENTS // count)
    return np.concatenate([_array(data[i : i + rows], wanted) for i in range(0, len(data), rows)])


class _Booleans(Exception):
    """JSON true or false among the data of a numeric tensor."""


def _array(data: Any, wanted: np.dtype) -> np.ndarray:
    """np.asarray(data); _Booleans when a numeric tensor's data holds JSON true or false,
    which numpy would take for 1 and 0 among numbers."""
    array = np.asarray(data)
    if wanted.kind != "b" and _holds_booleans(data, array):
        raise _Booleans
    return array


def _holds_booleans(data: Any, array: np.ndarray) -> bool:
    """Whether ``data``, converted to ``array``, held Python booleans. Only 0 and 1 can have
    been booleans, so one vectorised test clears most tensors; the others have their
    elements' types gathered by C loops (itertools, map, set), no Python code per element."""
    if array.dtype.kind == "b":
        return array.size > 0
    if array.dtype.kind not in "iuf" or array.ndim == 0 or not ((array == 0) | (array == 1)).any():
        return False  # strings or mixed values are refused for what they are
    items: Any = data
    for _ in range(array.ndim - 1):  # a regular nested list: as deep as the array
        items = itertools.chain.from_iterable(items)
    return bool in set(map(type, items))


def _reshape(array: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    # Sizes already match; numpy can still refuse an empty tensor with a gigantic dimension.
    try:
        return array.reshape(shape)
    except ValueError:
        raise BadRequest(f"input '{name}': shape {shape} is too large") from None


def _flatten(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(items)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _json_kind_fits(found: np.dtype, wanted: np.dtype) -> bool:
    if wanted.kind == "b":
        return found.kind == "b"
    if wanted.kind in "ui":
        return found.kind in "ui"
    if wanted.kind == "f":
        return found.kind in "uif"
    return False


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "number", "U": "string", "O": "mixed"}.get(
        dtype.kind, str(dtype)
    )


# -- responses -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray | None = None  # numeric tensors
    items: Sequence[bytes] | None = None  # BYTES tensors, flat, row-major
    shape: tuple[int, ...] = ()


def encode_output(out: OutputTensor, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """The ``$response_output`` object and, in binary mode, the raw bytes that follow the JSON."""
    shape = list(out.shape if out.items is not None else out.array.shape)  # type: ignore[union-attr]
    entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": shape}
    if out.datatype == "BYTES":
        items = list(out.items or [])
        if binary:
            raw = pack_bytes(items)
            entry["parameters"] = {"binary_data_size": len(raw)}
            return entry, raw
        entry["data"] = [b.decode("utf-8", errors="replace") for b in items]
        return entry, None
    array = np.ascontiguousarray(out.array, dtype=NUMPY_DTYPES[out.datatype])
    if binary:
        raw = array.tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = array.reshape(-1).tolist()
    return entry, None


def encode_response(header: dict[str, Any], chunks: Sequence[bytes]) -> tuple[bytes, int | None]:
    """The response body and, when binary chunks follow the JSON, the JSON's length."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def wants_binary(request_parameters: Mapping[str, Any], output_parameters: Mapping[str, Any] | None) -> bool:
    """Per-output ``binary_data`` wins over the request's ``binary_data_output``."""
    if output_parameters and "binary_data" in output_parameters:
        return output_parameters["binary_data"] is True
    return request_parameters.get("binary_data_output") is True
