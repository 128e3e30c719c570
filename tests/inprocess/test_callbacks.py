"""Every row of the README's callback table, in process."""

from __future__ import annotations

import orjson

from tests.inprocess.conftest import Service, signed


def prediction(pred: str, status: str, **extra: object) -> bytes:
    return orjson.dumps({"id": pred, "status": status, "domain": "document.invoice", **extra})


async def test_new_duplicate_and_stale(service: Service) -> None:
    """A new verified state is recorded; the same bytes again are a duplicate; an older status
    after a terminal one is stale; only the first is an event."""
    job = await service.submit()
    pred = job["prediction_id"]
    done = prediction(pred, "completed", response={"total_amount": 12})
    first = await service.callback(pred, done)
    assert (first.status_code, first.json()["status"]) == (200, "recorded")
    again = await service.callback(pred, done)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    late = await service.callback(pred, prediction(pred, "running"))
    assert (late.status_code, late.json()["status"]) == (200, "stale")
    assert [e["status"] for e in await service.events(job["id"])] == ["completed"]


async def test_a_second_prediction_on_the_same_token_is_linked(service: Service) -> None:
    """A prediction id the job did not record yet (the SDK retried a submission) is recorded
    and linked to the job."""
    job = await service.submit()
    path = service.api.callback_paths[job["prediction_id"]]
    service.api.callback_paths["pred_retry"] = path
    answer = await service.callback("pred_retry", prediction("pred_retry", "completed"))
    assert (answer.status_code, answer.json()["status"]) == (200, "recorded")
    assert [e["prediction_id"] for e in await service.events(job["id"])] == ["pred_retry"]


async def test_forged_missing_and_wrong_signatures_are_401(service: Service) -> None:
    """A signature made with another secret, a missing one, or one of the wrong form: 401."""
    job = await service.submit()
    pred = job["prediction_id"]
    body = prediction(pred, "completed")
    forged = await service.callback(pred, body, **signed(body, "not-the-secret"))
    unsigned = await service.callback(pred, body, **{"Content-Type": "application/json"})
    malformed = await service.callback(pred, body, **{"X-VLMRun-Signature": "md5=00"})
    assert [r.status_code for r in (forged, unsigned, malformed)] == [401, 401, 401]
    assert await service.events(job["id"]) == []


async def test_the_other_signature_header_is_verified(service: Service) -> None:
    """X-VLM-Signature, the name some SDK versions use, is checked like X-VLMRun-Signature."""
    job = await service.submit()
    pred = job["prediction_id"]
    body = prediction(pred, "completed")
    digest = signed(body)["X-VLMRun-Signature"]
    answer = await service.callback(pred, body, **{"X-VLM-Signature": digest})
    assert answer.json()["status"] == "recorded"


async def test_unknown_token_404_and_another_jobs_prediction_409(service: Service) -> None:
    """A token no job has: 404. A prediction id recorded for another job: 409. Neither is
    recorded."""
    first, second = await service.submit(), await service.submit()
    body = prediction(first["prediction_id"], "completed")
    unknown = await service.client.post(
        "/callbacks/vlmrun/not-a-token", content=body, headers=signed(body)
    )
    assert unknown.status_code == 404
    assert (await service.callback(first["prediction_id"], body)).status_code == 200
    service.api.callback_paths["cross"] = service.api.callback_paths[second["prediction_id"]]
    crossed = await service.callback("cross", body)
    assert crossed.status_code == 409
    assert await service.events(second["id"]) == []


async def test_bad_bodies_are_400_422_and_413(service: Service) -> None:
    """Not JSON: 400. JSON that is not a prediction, or with a NUL in a stored field: 422.
    Over the body limit: 413. Nothing is recorded."""
    job = await service.submit()
    pred = job["prediction_id"]
    cases = {
        b"<xml/>": 400,
        b"[]": 422,
        orjson.dumps({"id": pred}): 422,
        prediction(pred, "completed\x00"): 422,
        prediction(pred, "completed", pad="x" * 70_000): 413,
    }
    for body, status in cases.items():
        assert (await service.callback(pred, body)).status_code == status, body[:40]
    assert await service.events(job["id"]) == []


async def test_a_store_that_is_gone_is_503_never_200(service: Service) -> None:
    """With the database file removed, a valid callback gets 503 (VLM Run retries) and
    /readyz fails."""
    job = await service.submit()
    for path in service.db.parent.glob("receiver.db*"):
        path.unlink()
    answer = await service.callback(
        job["prediction_id"], prediction(job["prediction_id"], "completed")
    )
    assert answer.status_code == 503
    assert (await service.client.get("/readyz")).status_code == 503
