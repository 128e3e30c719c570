"""The Submit page: `/ui/submit`, a file or a URL sent to VLM Run as a new job.

The form is validated and submitted by the same code as `POST /v1/jobs`
(`receiver.routes.jobs.read_submission` and `submit_job`: same limits, same rules, same
answers from VLM Run); like every dashboard form it carries the session's CSRF token and is
refused from another site. A job taken lands on its page, which follows it live.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from receiver.models import JOB_KINDS, Job, is_terminal
from receiver.routes import BadRequest, services
from receiver.routes.jobs import SubmitFailed, read_submission, submit_job
from receiver.ui.pages import page, render, templates
from receiver.ui.session import check_csrf, refuse_other_sites

FIELDS = ("kind", "domain", "url")  # what the form sends besides the file and the token
# A job's page follows the job until it is settled (job.html: `job.status is not terminal`).
templates.env.tests["terminal"] = is_terminal


def form(
    request: Request,
    status: int = 200,
    *,
    error: str | None = None,
    values: dict[str, Any] | None = None,
    job: Job | None = None,
) -> Response:
    """The form; after a refusal, with the reason and what was typed."""
    shown = {"kind": "document", "domain": "", "url": ""} | (values or {})
    return render(
        request, "submit.html", status, kinds=JOB_KINDS, values=shown, error=error, job=job
    )


@page
async def submit(request: Request) -> Response:
    if request.method == "GET":
        return form(request)
    refuse_other_sites(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("refused: the form's CSRF token is missing or stale; reload the page", 403)
    svc = services(request)
    fields, upload = await read_submission(request, svc)
    check_csrf(request, fields.pop("csrf", ""))
    if upload is not None and not upload.filename:
        upload = None  # the file input left empty
    data = {k: v for k, v in fields.items() if k in FIELDS}
    try:
        job = await submit_job(svc, data, upload)
    except BadRequest as exc:
        return form(request, exc.status, error=exc.reason, values=data)
    except SubmitFailed as exc:
        return form(request, exc.status, error=f"VLM Run: {exc.reason}", values=data, job=exc.job)
    request.session["flash"] = f"Submitted: job {job.id} is {job.status}."
    return RedirectResponse(request.url_for("ui:job", job_id=job.id), status_code=303)
