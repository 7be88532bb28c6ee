"""The V2 wire format without a server: binary tensors, BYTES packing, base64, compression."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.utils as tritonutils

from visionserve.errors import BadRequest, PayloadTooLarge
from visionserve.protocols.v2.codec import (
    MAX_JSON_CONTAINERS,
    NUMPY_DTYPES,
    OutputTensor,
    decompress,
    encode_output,
    encode_response,
    json_containers,
    pack_bytes,
    parse_infer_request,
    parse_json,
    split_body,
    unpack_bytes,
    wants_binary,
)


def _request(header: dict, *chunks: bytes) -> tuple[bytes, int | None]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), (len(head) if chunks else None)


# -- BYTES packing ---------------------------------------------------------------------------


def test_pack_bytes_matches_tritonclient_serialisation():
    items = [b"dog", b"", b"\x00\xff binary \x00", "bicycle".encode()]
    packed = pack_bytes(items)
    expected = tritonutils.serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert packed == expected
    assert packed[:4] == (3).to_bytes(4, "little")


def test_unpack_bytes_reads_what_tritonclient_writes():
    items = [b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3, b"x"]
    raw = tritonutils.serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert unpack_bytes(raw, expected=2) == items


def test_unpack_bytes_round_trips_empty_elements():
    assert unpack_bytes(pack_bytes([b"", b"", b"a"])) == [b"", b"", b"a"]
    assert pack_bytes([]) == b"" and unpack_bytes(b"") == []


@pytest.mark.parametrize(
    "raw, expected, message",
    [
        (b"\x05\x00", None, "truncated"),
        (b"\x05\x00\x00\x00abc", None, "declares 5 bytes but only 3 remain"),
        (pack_bytes([b"a", b"b"]), 1, "more than the 1 element"),
        (pack_bytes([b"a"]), 2, "holds 1 element(s), its shape declares 2"),
    ],
)
def test_unpack_bytes_rejects_malformed_buffers(raw, expected, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        unpack_bytes(raw, expected)


# -- bodies ----------------------------------------------------------------------------------


def test_split_body_uses_the_header_length():
    body, n = _request({"inputs": []}, b"\x01\x02\x03")
    header, rest = split_body(body, str(n))
    assert header == {"inputs": []} and bytes(rest) == b"\x01\x02\x03"


def test_split_body_without_header_length_is_all_json():
    header, rest = split_body(b'{"a": 1}', None)
    assert header == {"a": 1} and len(rest) == 0


@pytest.mark.parametrize(
    "body, length, message",
    [
        (b'{"a":1}', "abc", "must be an integer"),
        (b'{"a":1}', "99", "outside the 7-byte"),
        (b'{"a":1}', "-1", "outside"),
        (b"", None, "empty"),
        (b"{not json", None, "not valid JSON"),
        (b'{"a":1}\x00\x01', None, "needs Inference-Header-Content-Length"),
        (b"[1, 2]", None, "must be a JSON object"),
    ],
)
def test_split_body_errors(body, length, message):
    with pytest.raises(BadRequest, match=message):
        split_body(body, length)


def test_decompress_gzip_and_both_deflate_flavours():
    data = b'{"inputs": []}' * 50
    assert decompress(gzip.compress(data), "gzip", 10_000) == data
    assert decompress(zlib.compress(data), "deflate", 10_000) == data
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decompress(raw.compress(data) + raw.flush(), "deflate", 10_000) == data
    assert decompress(data, None, 10) == data  # identity is not limited here: the body limit applies


def test_decompress_limits_the_inflated_size():
    bomb = gzip.compress(b"\x00" * 1_000_000)
    with pytest.raises(PayloadTooLarge):
        decompress(bomb, "gzip", 100_000)


@pytest.mark.parametrize(
    "body, encoding, message",
    [
        (b"not gzip", "gzip", "cannot decompress"),
        (gzip.compress(b"x" * 1000)[:-30], "gzip", "truncated|cannot decompress"),
        (b"data", "br", "unsupported Content-Encoding"),
    ],
)
def test_decompress_errors(body, encoding, message):
    with pytest.raises(BadRequest, match=message):
        decompress(body, encoding, 10_000)


# -- inference requests ----------------------------------------------------------------------


def test_binary_inputs_follow_the_json_in_order():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    image = pack_bytes([b"jpegdata"])
    header = {
        "id": "42",
        "parameters": {"min_confidence": 0.5},
        "inputs": [
            {"name": "PIXELS", "datatype": "UINT8", "shape": [2, 3, 3], "parameters": {"binary_data_size": pixels.nbytes}},
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(image)}},
        ],
        "outputs": [{"name": "BOXES", "parameters": {"binary_data": True}}],
    }
    body, n = _request(header, pixels.tobytes(), image)
    req = parse_infer_request(*split_body(body, n))
    assert req.id == "42" and req.parameters == {"min_confidence": 0.5}
    assert np.array_equal(req.inputs[0].data, pixels) and req.inputs[0].shape == (2, 3, 3)
    assert req.inputs[1].data == [b"jpegdata"]
    assert req.outputs == [{"name": "BOXES", "parameters": {"binary_data": True}}]


def test_json_inputs_nested_or_flat():
    nested = {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 3], "data": [[[1, 2, 3], [4, 5, 255]]]}
    flat = {**nested, "data": [1, 2, 3, 4, 5, 255]}
    for spec in (nested, flat):
        (t,) = parse_infer_request({"inputs": [spec]}, memoryview(b"")).inputs
        assert t.data.dtype == np.uint8 and t.data.tolist() == [[[1, 2, 3], [4, 5, 255]]]


def test_json_bytes_plain_and_base64():
    jpeg = b"\xff\xd8\xff\xe0 not utf-8 \x80"
    b64 = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"},
           "data": [base64.b64encode(jpeg).decode()]}
    assert parse_infer_request({"inputs": [b64]}, memoryview(b"")).inputs[0].data == [jpeg]
    # MLServer also allows the content type on the request
    req_level = {"parameters": {"content_type": "base64"}, "inputs": [{**b64, "parameters": {}}]}
    assert parse_infer_request(req_level, memoryview(b"")).inputs[0].data == [jpeg]
    text = {"name": "IMAGE", "datatype": "BYTES", "shape": [2], "data": ["héllo", "x"]}
    assert parse_infer_request({"inputs": [text]}, memoryview(b"")).inputs[0].data == ["héllo".encode(), b"x"]
    # Line-wrapped (MIME) base64, as `base64 file` writes it without -w0.
    wrapped = {**b64, "data": [base64.encodebytes(jpeg * 10).decode()]}
    assert "\n" in wrapped["data"][0]
    assert parse_infer_request({"inputs": [wrapped]}, memoryview(b"")).inputs[0].data == [jpeg * 10]
    crlf = {**b64, "data": [base64.encodebytes(jpeg * 10).decode().replace("\n", "\r\n")]}
    assert parse_infer_request({"inputs": [crlf]}, memoryview(b"")).inputs[0].data == [jpeg * 10]


@pytest.mark.parametrize(
    "inputs, binary, message",
    [
        (None, b"", "'inputs' must be a non-empty list"),
        ([], b"", "'inputs' must be a non-empty list"),
        (["x"], b"", r"inputs\[0\] must be a JSON object"),
        ([{"datatype": "UINT8", "shape": [1], "data": [1]}], b"", "needs a string 'name'"),
        ([{"name": "A", "datatype": "BF16", "shape": [1], "data": [1]}], b"", "unsupported datatype 'BF16'"),
        # JSON arrays and objects are not hashable: a set lookup would raise TypeError
        ([{"name": "A", "datatype": ["BYTES"], "shape": [1], "data": ["a"]}], b"", r"unsupported datatype \['BYTES'\]"),
        ([{"name": "A", "datatype": {"t": 1}, "shape": [1], "data": ["a"]}], b"", "unsupported datatype"),
        ([{"name": ["A"], "datatype": "BYTES", "shape": [1], "data": ["a"]}], b"", "needs a string 'name'"),
        ([{"name": "A", "datatype": "UINT8", "shape": [1, [2]], "data": [1]}], b"", "non-negative integers"),
        ([{"name": "A", "datatype": "UINT8", "shape": [True], "data": [1]}], b"", "non-negative integers"),
        ([{"name": "A", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}], b"", "lone UTF-16 surrogate"),
        ([{"name": "A", "datatype": "UINT8", "shape": [-1], "data": [1]}], b"", "non-negative integers"),
        ([{"name": "A", "datatype": "UINT8", "shape": "3", "data": [1]}], b"", "non-negative integers"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2]}], b"", "neither 'data' nor"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1]}], b"", "has 1 element"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, 300]}], b"", "out of range"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, -1]}], b"", "out of range"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, "a"]}], b"", "string values"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1.5, 2]}], b"", "number values"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2, 2], "data": [[1, 2], [3]]}], b"", "ragged"),
        # The outline is checked before converting: deeper than the shape, or more elements
        # along the first ones than the shape has (here strings, which converting would name).
        ([{"name": "A", "datatype": "UINT8", "shape": [2, 2], "data": [[[1, 2], [3, 4]]]}], b"",
         r"nested deeper than its shape \[2, 2\]"),
        ([{"name": "A", "datatype": "UINT8", "shape": [3], "data": [[[[[[1, 2, 3]]]]]]}], b"", "nested deeper"),
        ([{"name": "A", "datatype": "UINT8", "shape": [1, 3], "data": ["a"] * 1000}], b"",
         r"has 1000 element\(s\), its shape \[1, 3\] needs 3"),
        ([{"name": "A", "datatype": "UINT8", "shape": [1, 3], "data": [[]] * 1000}], b"", "has 0 element"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2, 3], "data": [[1, 2, 3, 4, 5, 6, 7]]}], b"", "has 7 element"),
        ([{"name": "A", "datatype": "UINT8", "shape": [0, 2**62, 2**62], "data": []}], b"", "too large"),
        ([{"name": "A", "datatype": "BYTES", "shape": [1], "data": [5]}], b"", "must be strings"),
        ([{"name": "A", "datatype": "BYTES", "shape": [1], "data": ["!!"], "parameters": {"content_type": "base64"}}],
         b"", "not valid base64"),
        ([{"name": "A", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}], b"\x01\x02",
         "only 2 byte"),
        ([{"name": "A", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 3}}], b"\x01\x02\x03",
         "does not match shape"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}}], b"\x01\x02\x03",
         "1 byte.* that no input claims"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, 2], "parameters": {"binary_data_size": 2}}],
         b"\x01\x02", "both 'data' and binary_data_size"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": "2"}}], b"\x01\x02",
         "must be a non-negative integer"),
        ([{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, 2], "parameters": [1]}], b"",
         "'parameters' must be a JSON object"),
    ],
)
def test_malformed_requests_say_what_is_wrong(inputs, binary, message):
    with pytest.raises(BadRequest, match=message):
        parse_infer_request({"inputs": inputs}, memoryview(binary))


class _Refused(Exception):
    pass


def _refuse(name: str, datatype: str, shape: tuple[int, ...]) -> None:
    raise _Refused((name, datatype, shape))


def test_the_input_check_sees_the_declared_shape_before_any_element_is_decoded():
    # 4.9 million empty BYTES elements: unpacking them first froze the server for seconds
    # before the batch limit refused them.
    count = 4_900_000
    header = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [count],
                          "parameters": {"binary_data_size": 4 * count}}]}
    with pytest.raises(_Refused) as refused:
        parse_infer_request(header, memoryview(bytes(4 * count)), check=_refuse)
    assert refused.value.args[0] == ("IMAGE", "BYTES", (count,))
    # The same for JSON data, and for data the codec itself would refuse.
    for spec in ({"name": "P", "datatype": "UINT8", "shape": [2, 1, 1, 3], "data": ["not", "numbers"]},
                 {"name": "I", "datatype": "BYTES", "shape": [3], "data": [1, 2]}):
        with pytest.raises(_Refused):
            parse_infer_request({"inputs": [spec]}, memoryview(b""), check=_refuse)
    # A check that lets an input through changes nothing.
    spec = {"name": "P", "datatype": "UINT8", "shape": [1, 3], "data": [1, 2, 3]}
    assert parse_infer_request({"inputs": [spec]}, memoryview(b""), check=lambda *a: None).inputs[0].shape == (1, 3)


def test_binary_bytes_too_small_for_their_shape_are_refused_before_unpacking():
    header = {"inputs": [{"name": "A", "datatype": "BYTES", "shape": [10**9], "parameters": {"binary_data_size": 8}}]}
    with pytest.raises(BadRequest, match=r"binary_data_size 8 is too small for shape \[1000000000\] of BYTES \(each of its 1000000000 "):
        parse_infer_request(header, memoryview(pack_bytes([b"", b""])))


@pytest.mark.parametrize("shape, data", [
    ([2, 3], [1, 2, 3, 4, 5, 6]),  # flat, row-major
    ([2, 3], [[1, 2, 3], [4, 5, 6]]),  # nested as the shape
    ([2, 3], [[1, 2, 3, 4, 5, 6]]),  # nested part of the way
    ([1, 2, 3], [[1, 2, 3], [4, 5, 6]]),  # without the leading 1
    ([], 5),  # a scalar
    ([0, 3], []),
])
def test_json_data_may_be_flat_or_nested_in_any_way_that_fits_the_shape(shape, data):
    spec = {"name": "A", "datatype": "INT32", "shape": shape, "data": data}
    for cooperative in (False, True):
        (t,) = parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=cooperative).inputs
        assert t.data.shape == tuple(shape) and t.data.reshape(-1).tolist() == np.asarray(data).reshape(-1).tolist()


def test_a_json_document_of_millions_of_arrays_is_refused_before_it_is_parsed():
    # The parser makes arrays, objects and strings in C without a pause: millions of them
    # held the GIL for seconds. Counted in the raw bytes; numbers do not count.
    # 3 "[" and 3 "{" (one of each inside a string: an overestimate) and 10 quotes, 5 strings
    assert json_containers(b'{"a": [[1, 2], {"b": "c"}], "d": "[{"}') == 11
    many = b'{"inputs": [{"name": "A", "datatype": "UINT8", "shape": [1], "data": [' + b"[]," * MAX_JSON_CONTAINERS + b"1]}]}"
    for cooperative in (False, True):
        # + 3 arrays, 2 objects and 7 strings around the data
        with pytest.raises(BadRequest, match=f"holds about {MAX_JSON_CONTAINERS + 12} JSON arrays, objects and strings; "
                                             f"at most {MAX_JSON_CONTAINERS}"):
            split_body(many, None, cooperative)
    deep = b"[" * (MAX_JSON_CONTAINERS + 1) + b"]" * (MAX_JSON_CONTAINERS + 1)
    with pytest.raises(BadRequest, match="JSON arrays"):
        parse_json(deep)
    numbers = b'{"inputs": [{"name": "A", "datatype": "UINT8", "shape": [2000000], "data": [' + b"1," * 1_999_999 + b"1]}]}"
    assert split_body(numbers, None, True)[0]["inputs"][0]["shape"] == [2_000_000]


def test_cooperative_decoding_gives_the_same_request():
    # 1200 rows of 100 pixels: more elements than one chunk, so converted a slice at a time.
    pixels = np.random.default_rng(0).integers(0, 256, (1, 1200, 100, 3), dtype=np.uint8)
    header = {"parameters": {"min_confidence": 0.25, "timeout": 10**30}, "inputs": [
        {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1200, 100, 3], "data": pixels.tolist()}]}
    body, _ = _request(header)
    for cooperative in (False, True):
        req = parse_infer_request(*split_body(body, None, cooperative), cooperative=cooperative)
        assert req.parameters == {"min_confidence": 0.25, "timeout": 10**30}
        assert req.inputs[0].data.dtype == np.uint8 and np.array_equal(req.inputs[0].data, pixels)
        flat = {"inputs": [{**header["inputs"][0], "data": pixels.reshape(-1).tolist()}]}
        assert np.array_equal(parse_infer_request(flat, memoryview(b""), cooperative=cooperative).inputs[0].data, pixels)


@pytest.mark.parametrize("data, message", [
    ([[1, 2, 3]] * 40_000 + [[1, 2]], "ragged"),
    ([1] * 100_000 + ["a"] * 100_000, "mixed values|string values"),
    ([1.5] * 200_000, "number values"),
])
def test_cooperative_decoding_refuses_what_plain_decoding_refuses(data, message):
    spec = {"name": "A", "datatype": "UINT8", "shape": [200_000], "data": data}
    if isinstance(data[0], list):
        spec["shape"] = [40_001, 3]
    for cooperative in (False, True):
        with pytest.raises(BadRequest, match=message):
            parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=cooperative)


NUMERIC = [t for t in NUMPY_DTYPES if t not in ("BOOL", "BYTES")]


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("data, shape", [
    ([1, True, 3], [3]),
    ([[2, 3], [False, 4]], [2, 2]),
    ([[0.5, 1.0], [True, 2.0]], [2, 2]),  # among fractions too (integer tensors refuse them anyway)
    ([True, False], [2]),
    ([[[1, 2, True]]], [1, 1, 3]),
])
def test_true_and_false_are_not_numbers(datatype, data, shape):
    # numpy reads them as 1 and 0 beside numbers; V2 has BOOL for them.
    spec = {"name": "T", "datatype": datatype, "shape": shape, "data": data}
    for cooperative in (False, True):
        with pytest.raises(BadRequest, match=rf"input 'T': 'data' holds true/false, not {datatype} numbers"):
            parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=cooperative)


@pytest.mark.parametrize("datatype", NUMERIC)
def test_true_and_false_are_found_among_many_numbers_and_across_chunks(datatype):
    # 200k elements: the cooperative path converts them a chunk at a time, and a chunk of
    # booleans alone becomes a bool array that concatenating with numbers turns into 1s and 0s.
    rows = [[1, 0, 1]] * 70_000
    for at in (0, 35_000, 69_999):
        data = [*rows[:at], [1, True, 0], *rows[at + 1:]]
        spec = {"name": "T", "datatype": datatype, "shape": [70_000, 3], "data": data}
        for cooperative in (False, True):
            with pytest.raises(BadRequest, match="holds true/false"):
                parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=cooperative)
    spec = {"name": "T", "datatype": datatype, "shape": [140_000], "data": [False] * 70_000 + [1] * 70_000}
    with pytest.raises(BadRequest, match="holds true/false"):
        parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=True)
    # Numbers alone, 0s and 1s included, still decode.
    spec = {"name": "T", "datatype": datatype, "shape": [70_000, 3], "data": rows}
    for cooperative in (False, True):
        (t,) = parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=cooperative).inputs
        assert t.data.dtype == NUMPY_DTYPES[datatype] and t.data.shape == (70_000, 3) and int(t.data.astype(np.int64).sum()) == 140_000


def test_bool_tensors_take_true_and_false_only():
    spec = {"name": "B", "datatype": "BOOL", "shape": [2, 2], "data": [[True, False], [False, True]]}
    for cooperative in (False, True):
        (t,) = parse_infer_request({"inputs": [spec]}, memoryview(b""), cooperative=cooperative).inputs
        assert t.data.dtype == np.bool_ and t.data.tolist() == [[True, False], [False, True]]
        with pytest.raises(BadRequest, match="integer values, not BOOL"):
            parse_infer_request({"inputs": [{**spec, "data": [[True, 0], [1, True]]}]}, memoryview(b""),
                                cooperative=cooperative)


def test_malformed_request_level_fields():
    ok = [{"name": "A", "datatype": "UINT8", "shape": [1], "data": [1]}]
    with pytest.raises(BadRequest, match="'id' must be a string"):
        parse_infer_request({"id": 5, "inputs": ok}, memoryview(b""))
    with pytest.raises(BadRequest, match="'outputs' must be a list"):
        parse_infer_request({"inputs": ok, "outputs": {"name": "X"}}, memoryview(b""))
    with pytest.raises(BadRequest, match=r"outputs\[0\] must be an object"):
        parse_infer_request({"inputs": ok, "outputs": [{"nam": "X"}]}, memoryview(b""))


# -- responses -------------------------------------------------------------------------------


def test_binary_and_json_outputs_in_one_response_read_back_by_tritonclient():
    from tritonclient.http import InferResult

    boxes = np.array([[1.5, 2, 3, 4], [5, 6, 7, 8.25]], np.float32)
    labels = [b"dog", b"bicycle"]
    entries, chunks = [], []
    for out, binary in (
        (OutputTensor("BOXES", "FP32", array=boxes), True),
        (OutputTensor("LABELS", "BYTES", items=labels, shape=(2,)), True),
        (OutputTensor("CLASS_IDS", "INT32", array=np.array([16, 1], np.int32)), False),
        (OutputTensor("NAMES", "BYTES", items=labels, shape=(2,)), False),
    ):
        entry, raw = encode_output(out, binary)
        entries.append(entry)
        if raw is not None:
            chunks.append(raw)
    body, n = encode_response({"model_name": "m", "outputs": entries}, chunks)
    assert n is not None and json.loads(body[:n])["outputs"][0]["parameters"] == {"binary_data_size": 32}
    result = InferResult.from_response_body(body, header_length=n)
    assert np.array_equal(result.as_numpy("BOXES"), boxes)
    assert result.as_numpy("LABELS").tolist() == labels
    assert result.as_numpy("CLASS_IDS").tolist() == [16, 1]
    assert result.as_numpy("NAMES").tolist() == ["dog", "bicycle"]


def test_empty_outputs_keep_their_shape():
    entry, raw = encode_output(OutputTensor("BOXES", "FP32", array=np.zeros((0, 4), np.float32)), True)
    assert entry["shape"] == [0, 4] and raw == b"" and entry["parameters"]["binary_data_size"] == 0
    entry, raw = encode_output(OutputTensor("LABELS", "BYTES", items=[], shape=(0,)), False)
    assert entry == {"name": "LABELS", "datatype": "BYTES", "shape": [0], "data": []} and raw is None


def test_json_only_response_has_no_header_length():
    body, n = encode_response({"model_name": "m", "outputs": []}, [])
    assert n is None and json.loads(body) == {"model_name": "m", "outputs": []}


def test_binary_choice_per_output_overrides_the_request():
    assert wants_binary({"binary_data_output": True}, None)
    assert not wants_binary({"binary_data_output": True}, {"binary_data": False})
    assert wants_binary({}, {"binary_data": True})
    assert not wants_binary({}, {})
