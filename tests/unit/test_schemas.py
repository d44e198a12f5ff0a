import json
import re
from pathlib import Path

import pytest

from zimage_stream import schemas
from zimage_stream.errors import ERROR_CODES, for_code
from zimage_stream.schemas import (
    EraseTextRequest,
    GenerateRequest,
    RequestParseError,
    ResultEvent,
    Timings,
    json_schemas,
    parse_request,
)
from zimage_stream.styles import STYLE_NAMES

LIMIT = 1 << 20


def _raw(**fields: object) -> bytes:
    event = {
        "schema_version": 1,
        "request_id": "r-1",
        "task": "generate",
        "params": {"prompt": "a mug"},
    }
    event.update(fields)
    return json.dumps(event).encode()


def _error(raw: bytes | None) -> RequestParseError:
    with pytest.raises(RequestParseError) as info:
        parse_request(raw, LIMIT)
    return info.value


def test_generate_defaults_follow_the_contract() -> None:
    request = parse_request(_raw(), LIMIT)
    assert isinstance(request, GenerateRequest)
    p = request.params
    assert (p.width, p.height, p.num_images, p.num_inference_steps, p.guidance_scale) == (
        1024,
        1024,
        4,
        8,
        0.0,
    )
    assert p.style is None and p.seed is None


def test_erase_text_request_is_selected_by_task() -> None:
    raw = _raw(task="erase_text", params={"source": {"uri": "s3://b/k.png"}})
    request = parse_request(raw, LIMIT)
    assert isinstance(request, EraseTextRequest)
    assert request.params.languages == ["en", "ch"] and request.params.engine == "auto"


def test_derived_seed_is_stable_and_content_dependent() -> None:
    a = parse_request(_raw(), LIMIT).params
    b = parse_request(_raw(request_id="other-id"), LIMIT).params
    c = parse_request(_raw(params={"prompt": "a cup"}), LIMIT).params
    assert a.resolved_seed() == b.resolved_seed()  # the request id does not matter
    assert a.resolved_seed() != c.resolved_seed()
    explicit = parse_request(_raw(params={"prompt": "a mug", "seed": 7}), LIMIT).params
    assert explicit.resolved_seed() == 7


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (None, "invalid_json"),
    ],
)
def test_unreadable_messages_have_no_request_id(raw: bytes | None, code: str) -> None:
    error = _error(raw)
    assert error.error.code == code and error.request_id is None


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"prompt": "x", "width": 1000}, "multiple of 16"),
        ({"prompt": "x", "height": 128}, "greater than or equal to 256"),
        ({"prompt": "x", "num_images": 9}, "less than or equal to 8"),
        ({"prompt": "x", "num_images": "4"}, "valid integer"),
        ({"prompt": "x", "style": "vaporwave"}, "minimal_white"),
        ({"prompt": ""}, "at least 1 character"),
        ({"prompt": "x", "seed": 2**32}, "less than or equal to"),
        ({"prompt": "x", "num_image": 2}, "unknown field"),
        ({"prompt": "x", "num_inference_steps": 0}, "greater than or equal to 1"),
    ],
)
def test_invalid_params_are_rejected_with_a_fix(params: dict, fragment: str) -> None:
    error = _error(_raw(params=params))
    assert error.error.code == "invalid_request"
    assert error.error.status == "rejected" and not error.error.retriable
    assert error.request_id == "r-1" and error.task == "generate"
    assert fragment in error.error.message


def test_unsupported_schema_version_keeps_the_request_id() -> None:
    error = _error(_raw(schema_version=2))
    assert error.error.code == "unsupported_schema_version" and error.request_id == "r-1"


def test_schema_version_must_be_the_integer_one() -> None:
    error = _error(_raw(schema_version=True))
    assert error.error.code == "invalid_request" and error.request_id == "r-1"
    assert "schema_version" in error.error.message


def test_a_whole_number_written_with_a_fraction_is_an_integer() -> None:
    """JSON Schema's ``integer`` is any number without a fraction, so 1.0 and 512.0 are
    integers to every schema-generated client; the worker reads them the same way."""
    request = parse_request(_raw(schema_version=1.0, params={"prompt": "a", "width": 512.0}), LIMIT)
    assert request.params.width == 512 and isinstance(request.params.width, int)
    assert _error(_raw(schema_version=2.0)).error.code == "unsupported_schema_version"
    assert "multiple of 16" in _error(_raw(params={"prompt": "a", "width": 300.0})).error.message


_DOCUMENT = _raw(params={"prompt": "a mug", "seed": 0})


@pytest.mark.parametrize(
    "raw",
    [
        b"9" * 5000,  # past Python's int-string conversion limit
        _DOCUMENT.replace(b'"seed": 0', b'"seed": ' + b"9" * 5000),
        b"[" * 50_000 + b"]" * 50_000,  # past Python's recursion limit
        _DOCUMENT.replace(b'"seed": 0', b'"seed": ' + b"[" * 500 + b"]" * 500),
        b"\xef\xbb\xbf" + _DOCUMENT,  # a UTF-8 byte-order mark
        _DOCUMENT.replace(b'"a mug"', b'"\\ud800"'),  # an escaped lone surrogate
        _DOCUMENT.replace(b'"a mug"', b'"\xed\xa0\x80"'),  # an encoded one: not UTF-8
        _DOCUMENT.decode().encode("utf-16"),
    ],
    ids=[
        "huge-int",
        "huge-int-in-params",
        "deep",
        "deep-in-params",
        "bom",
        "surrogate",
        "surrogate-bytes",
        "utf-16",
    ],
)
def test_json_the_parser_cannot_read_is_invalid_json(raw: bytes) -> None:
    assert _error(raw).error.code == "invalid_json"


def test_a_validator_that_fails_otherwise_is_still_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Failing:
        def validate_json(self, raw: bytes) -> None:
            raise RecursionError("a validator went too deep")

    monkeypatch.setattr(schemas, "_REQUEST_ADAPTER", Failing())
    error = _error(_raw())
    assert error.error.code == "invalid_request" and error.request_id == "r-1"


def test_bad_request_id_and_unknown_task() -> None:
    assert _error(_raw(request_id="has space")).request_id is None
    error = _error(_raw(task="upscale"))
    assert error.error.code == "invalid_request" and error.task is None


def test_oversized_message_is_rejected_before_parsing() -> None:
    raw = _raw(params={"prompt": "x" * 5000})
    with pytest.raises(RequestParseError) as info:
        parse_request(raw, 1024)
    assert "limit is 1024" in info.value.error.message


def test_erase_source_needs_exactly_one_of_uri_or_base64() -> None:
    both = _raw(task="erase_text", params={"source": {"uri": "s3://b/k", "base64": "AAAA"}})
    assert "exactly one" in _error(both).error.message


def test_result_requires_error_exactly_when_not_succeeded() -> None:
    timings = Timings(queued=0, inference=0, total=0)
    with pytest.raises(ValueError):
        ResultEvent(request_id="r", task="generate", status="failed", timings_ms=timings)
    ok = ResultEvent(request_id="r", task="generate", status="succeeded", timings_ms=timings)
    assert json.loads(ok.to_bytes())["cache_hit"] is False


def test_json_schemas_describe_the_contract() -> None:
    schemas = json_schemas()
    request, result = schemas["request"], schemas["result"]
    assert set(request["discriminator"]["mapping"]) == {"generate", "erase_text"}
    generate = request["$defs"]["GenerateParams"]["properties"]
    assert set(generate) == {
        "prompt",
        "style",
        "width",
        "height",
        "num_images",
        "seed",
        "num_inference_steps",
        "guidance_scale",
    }
    styles = request["$defs"]["GenerateParams"]["properties"]["style"]["anyOf"][0]["enum"]
    assert tuple(styles) == STYLE_NAMES
    assert set(result["properties"]["status"]["enum"]) == {
        "succeeded",
        "failed",
        "rejected",
        "timed_out",
    }
    assert set(result["properties"]) >= {
        "schema_version",
        "request_id",
        "task",
        "status",
        "images",
        "text_regions",
        "cache_hit",
        "error",
        "model",
        "timings_ms",
        "completed_at",
    }
    assert len(ERROR_CODES) == 13


def test_the_repositorys_contract_is_the_shared_one_and_names_every_error_code() -> None:
    """Users read ``docs/CONTRACT.md``; it must stay equal to the contract other services
    are built against (``../shared/CONTRACT.md`` beside a developer's checkout)."""
    repo = Path(__file__).resolve().parents[2]
    contract = (repo / "docs" / "CONTRACT.md").read_text()
    shared = repo.parent / "shared" / "CONTRACT.md"
    if shared.is_file():
        assert contract == shared.read_text(), "docs/CONTRACT.md differs from ../shared/CONTRACT.md"
    missing = {code for code in ERROR_CODES if f"`{code}`" not in contract}
    assert not missing, f"error codes the contract does not name: {sorted(missing)}"


def test_the_readmes_error_table_names_every_code_with_its_status_and_retriable() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {
        code: (status, retriable == "yes")
        for code, status, retriable in re.findall(
            r"^\| `([a-z_]+)` \| `([a-z_]+)` \| (yes|no) \|", readme, re.M
        )
    }
    for code in ERROR_CODES:
        error = for_code(code)("x")
        assert rows.get(code) == (error.status, error.retriable), code
