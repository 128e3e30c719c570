"""Callback verification: signatures over raw bytes, rotation, fail-closed, body parsing."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from receiver.verify import Rejected, check_signature, parse_prediction, sign

BODY = b'{"id":"pred_1","status":"completed","domain":"document.invoice"}'


def vlmrun_header(secret: str, body: bytes) -> str:
    """The header exactly as VLM Run documents it, computed independently of our code."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_valid_signature_is_accepted() -> None:
    """A body signed with the configured secret verifies as hmac-sha256."""
    assert check_signature(["s3cret"], BODY, vlmrun_header("s3cret", BODY)) == "hmac-sha256"


def test_sign_matches_the_documented_scheme() -> None:
    """Our signer (used by the simulator) produces VLM Run's documented header."""
    assert sign("k", BODY) == vlmrun_header("k", BODY)


def test_any_configured_secret_verifies_during_rotation() -> None:
    """During rotation a body signed with the older secret still verifies."""
    assert check_signature(["new", "old"], BODY, vlmrun_header("old", BODY)) == "hmac-sha256"


def test_uppercase_hex_is_accepted() -> None:
    """Hex case does not matter."""
    header = "sha256=" + vlmrun_header("k", BODY).removeprefix("sha256=").upper()
    assert check_signature(["k"], BODY, header) == "hmac-sha256"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("md5=abc", "sha256="),
        ("sha256=" + "0" * 64, "does not match"),
        ("sha256=zz", "does not match"),
    ],
)
def test_bad_or_missing_signature_is_401(header: str | None, reason: str) -> None:
    """With secrets configured, a missing, malformed or wrong signature is refused (fail closed)."""
    with pytest.raises(Rejected) as info:
        check_signature(["k"], BODY, header)
    assert info.value.status == 401
    assert reason in info.value.reason


def test_one_changed_byte_breaks_the_signature() -> None:
    """The signature covers the raw bytes: re-serialised or altered JSON does not verify."""
    header = vlmrun_header("k", BODY)
    with pytest.raises(Rejected):
        check_signature(["k"], BODY.replace(b"completed", b"completeD"), header)


def test_no_secrets_means_token_only() -> None:
    """Without configured secrets the URL token is the proof, and is reported as such."""
    assert check_signature([], BODY, None) == "token"


def test_prediction_fields_are_parsed() -> None:
    """id, status and domain are read from the body."""
    p = parse_prediction(BODY)
    assert (p.id, p.status, p.domain) == ("pred_1", "completed", "document.invoice")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"", 400),
        (b"[1, 2]", 422),
        (b'{"status": "completed"}', 422),
        (b'{"id": "p", "status": 3}', 422),
        (b'{"id": "", "status": "completed"}', 422),
    ],
)
def test_bad_bodies_get_clear_answers(body: bytes, status: int) -> None:
    """Non-JSON is 400; JSON that is not a prediction is 422."""
    with pytest.raises(Rejected) as info:
        parse_prediction(body)
    assert info.value.status == status


@pytest.mark.parametrize("field", ["id", "status", "domain"])
def test_nul_in_a_stored_field_is_422(field: str) -> None:
    """A NUL in `id`, `status` or `domain` (PostgreSQL text cannot hold it) is a 422 by name."""
    fields = {"id": "pred_1", "status": "completed", "domain": "document.invoice"}
    body = orjson.dumps(fields | {field: fields[field] + "\x00"})
    with pytest.raises(Rejected) as info:
        parse_prediction(body)
    assert info.value.status == 422 and f"`{field}`" in info.value.reason
