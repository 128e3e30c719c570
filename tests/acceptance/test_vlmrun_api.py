"""The service against `receiver simulate`, which accepts only what the API reference and the
SDK document: images as `images`, large files through the presigned flow, known files reused,
callbacks signed in either header, and results of downtime recovered within a minute."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from receiver.simulator import DIRECT_UPLOAD_MAX
from tests.acceptance.conftest import (
    API_KEY,
    WEBHOOK_SECRET,
    Process,
    api_env,
    base_env,
    free_port,
    submit,
    wait_for,
)

pytestmark = pytest.mark.acceptance


def start_simulator(tmp_path: Path, *extra: str, delay: str = "0.05") -> Process:
    port = free_port()
    args = ["simulate", "--port", str(port), "--api-key", API_KEY, "--delay", delay]
    args += ["--webhook-secret", WEBHOOK_SECRET, *extra]
    return Process(args, base_env(), tmp_path / f"simulator-{port}.log", port).start("/v1/health")


def api_get(simulator: Process, path: str) -> Any:
    r = httpx.get(f"{simulator.url}/v1{path}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def post_job(service: Process, files: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    r = httpx.post(
        f"{service.url}/v1/jobs",
        files=files,
        data=data,
        headers={"Authorization": "Bearer acceptance-admin-token"},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    job: dict[str, Any] = r.json()
    return job


def completed(service: Process, admin: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = admin.get(f"{service.url}/v1/jobs/{job_id}").json()
    return job if job["status"] == "completed" else None


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def test_an_uploaded_image_goes_as_a_data_url_and_completes(
    service: Process, simulator: Process, admin: httpx.Client
) -> None:
    """kind=image with a file: sent to /image/generate as a data URL (the simulator refuses a
    file_id there), not uploaded as a file; the job completes."""
    job = post_job(
        service,
        {"file": ("receipt.png", png(), "image/png")},
        {"kind": "image", "domain": "document.receipt"},
    )
    done = wait_for(lambda: completed(service, admin, job["id"]), 15, "the image job")
    (event,) = done["events"]
    assert event["prediction"]["usage"]["element_type"] == "image"
    assert event["prediction"]["response"]["items"]
    assert api_get(simulator, "/files") == []


def test_an_image_already_uploaded_goes_through_document_generate(
    service: Process, simulator: Process, admin: httpx.Client
) -> None:
    """kind=image with a file_id: sent by file_id to /document/generate, as the SDK's CLI does."""
    uploaded = httpx.post(
        f"{simulator.url}/v1/files",
        params={"purpose": "assistants"},
        files={"file": ("receipt.png", png(), "image/png")},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    r = admin.post(
        f"{service.url}/v1/jobs",
        json={"kind": "image", "domain": "document.receipt", "file_id": uploaded["id"]},
    )
    assert r.status_code == 201, r.text
    wait_for(lambda: completed(service, admin, r.json()["id"]), 15, "the image job by file id")


def test_a_file_over_32_mib_is_uploaded_through_a_presigned_url(
    service: Process, simulator: Process, admin: httpx.Client
) -> None:
    """A 33 MiB document (the simulator answers 413 to a direct upload that large) goes up
    through the presigned flow and its job completes."""
    content = os.urandom(DIRECT_UPLOAD_MAX + 1024 * 1024)
    job = post_job(
        service,
        {"file": ("scan.pdf", content, "application/pdf")},
        {"domain": "document.invoice"},
    )
    wait_for(lambda: completed(service, admin, job["id"]), 30, "the large job")
    (file,) = api_get(simulator, "/files")
    assert file["bytes"] == len(content) and file["filename"] == "scan.pdf"


def test_the_same_file_twice_is_uploaded_once(
    service: Process, simulator: Process, admin: httpx.Client
) -> None:
    """A file whose MD5 the API already knows is not uploaded again: both jobs use its id."""
    content = b"%PDF-1.4 " + os.urandom(4096)
    jobs = [
        post_job(
            service,
            {"file": (f"copy-{i}.pdf", content, "application/pdf")},
            {"domain": "document.invoice"},
        )
        for i in range(2)
    ]
    (file,) = api_get(simulator, "/files")
    for job in jobs:
        wait_for(lambda job=job: completed(service, admin, job["id"]), 15, "the jobs")
    assert file["filename"] == "copy-0.pdf"


@pytest.mark.parametrize("header", ["X-VLMRun-Signature", "X-VLM-Signature"])
def test_callbacks_signed_in_either_header_are_verified(
    tmp_path: Path, start_service: Callable[..., Process], admin: httpx.Client, header: str
) -> None:
    """A callback signed in X-VLMRun-Signature or X-VLM-Signature is verified and recorded."""
    simulator = start_simulator(tmp_path, "--signature-header", header)
    try:
        service = start_service(
            "serve",
            env=api_env(f"{simulator.url}/v1"),
        )
        (job,) = submit(service, 1)
        done = wait_for(lambda: completed(service, admin, job["id"]), 15, "the callback")
        (event,) = done["events"]
        assert (event["source"], event["verification"]) == ("callback", "hmac-sha256")
    finally:
        simulator.stop()


def test_results_of_downtime_are_back_within_a_minute_with_default_settings(
    tmp_path: Path, start_service: Callable[..., Process], admin: httpx.Client
) -> None:
    """Stop the service, let the API finish 5 jobs (their callbacks fail for good), start it
    again with default settings: all 5 are completed, by polling, within 60 s."""
    simulator = start_simulator(tmp_path, delay="1.0")
    try:
        service = start_service("serve", env=api_env(f"{simulator.url}/v1"))
        jobs = submit(service, 5)
        service.stop()

        def finished() -> bool:
            states = [api_get(simulator, f"/predictions/{j['prediction_id']}") for j in jobs]
            return all(s["status"] == "completed" for s in states)

        wait_for(finished, 15, "the API to finish the jobs")
        time.sleep(1.5)  # the second and last callback attempt (1 s backoff) fails too
        service.start()
        restarted = time.monotonic()

        def all_done() -> bool:
            return all(completed(service, admin, j["id"]) for j in jobs)

        wait_for(all_done, 60, "the jobs finished while the service was down")
        assert time.monotonic() - restarted < 60
        for job in jobs:
            (event,) = admin.get(f"{service.url}/v1/jobs/{job['id']}").json()["events"]
            assert event["source"] == "poll"
    finally:
        simulator.stop()
