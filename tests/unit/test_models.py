"""Status ordering, ids, tokens and the event envelope."""

from __future__ import annotations

import time

import orjson

from receiver.models import (
    Event,
    Route,
    hash_token,
    is_terminal,
    new_callback_token,
    new_id,
    status_rank,
)


def test_statuses_only_move_forward() -> None:
    """pending < running < completed; completed and failed are terminal and equal."""
    assert status_rank("pending") < status_rank("running") < status_rank("completed")
    assert status_rank("completed") == status_rank("failed")
    assert is_terminal("completed") and is_terminal("failed") and not is_terminal("running")


def test_unknown_status_ranks_between_running_and_terminal() -> None:
    """An unknown status (e.g. cancelled) is accepted, above running, not terminal."""
    assert status_rank("running") < status_rank("cancelled") < status_rank("completed")
    assert not is_terminal("cancelled")


def test_ids_sort_by_creation_and_are_unique() -> None:
    """Ids made a millisecond apart sort in creation order (newest-first listings rely on it),
    and ids never repeat."""
    ids = [new_id("job") for _ in range(1000)]
    assert len(set(ids)) == 1000
    earlier = new_id("job")
    time.sleep(0.002)
    assert earlier < new_id("job")


def test_token_is_long_and_only_its_hash_is_kept() -> None:
    """A callback token has 256 bits; its stored form is a sha256 hex that does not reveal it."""
    token = new_callback_token()
    assert len(token) >= 43
    assert hash_token(token) != token and len(hash_token(token)) == 64
    assert new_callback_token() != token


def test_envelope_carries_the_prediction_as_received() -> None:
    """The envelope is valid JSON whose `data` is the stored body, and it is stable."""
    body = b'{"id":"pred_1","status":"completed","response":{"total_amount":12.5}}'
    event = Event(
        "evt_1",
        "job_1",
        "pred_1",
        "completed",
        "document.invoice",
        "callback",
        "hmac-sha256",
        1_700_000_000.0,
        body,
    )
    envelope = orjson.loads(event.envelope())
    assert envelope["type"] == "prediction.completed"
    assert envelope["id"] == "evt_1" and envelope["job_id"] == "job_1"
    assert envelope["data"] == orjson.loads(body)
    assert envelope["received_at"] == "2023-11-14T22:13:20Z"
    assert event.envelope() == event.envelope()


def test_route_filters() -> None:
    """Empty filters match all; statuses and domains both must match when given."""
    assert Route("a").matches("running", "x.y")
    route = Route("b", statuses=("completed",), domains=("document.invoice",))
    assert route.matches("completed", "document.invoice")
    assert not route.matches("failed", "document.invoice")
    assert not route.matches("completed", "document.receipt")
