"""What `POST /v1/jobs` sends to VLM Run for each kind of input, and how it refuses bad ones."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from receiver.routes import BadRequest
from receiver.routes.jobs import generate_call, validate_submission

CALLBACK = "https://hooks.example.com/callbacks/vlmrun/tok"
SVC: Any = SimpleNamespace(settings=SimpleNamespace(allow_training=False))


def call(data: dict[str, Any], image: str | None = None) -> tuple[str, dict[str, Any]]:
    return generate_call(SVC, validate_submission(data, image is not None), CALLBACK, image)


def test_an_image_url_goes_to_image_generate_as_images() -> None:
    """kind=image with a URL calls /image/generate with `images: [url]`, never `url`."""
    kind, body = call({"kind": "image", "domain": "document.receipt", "url": "https://x/r.jpg"})
    assert kind == "image" and body["images"] == ["https://x/r.jpg"] and "url" not in body


def test_an_uploaded_image_goes_as_its_data_url() -> None:
    """kind=image with uploaded bytes sends their data URL in `images`."""
    kind, body = call({"kind": "image", "domain": "document.receipt"}, "data:image/png;base64,AA==")
    assert (kind, body["images"]) == ("image", ["data:image/png;base64,AA=="])


def test_an_image_file_id_goes_through_document_generate() -> None:
    """kind=image with a file_id calls /document/generate, as the SDK's CLI does."""
    kind, body = call({"kind": "image", "domain": "document.receipt", "file_id": "f1"})
    assert (kind, body["file_id"]) == ("document", "f1") and "images" not in body


def test_config_and_metadata_are_the_sdks_with_allow_training_as_configured() -> None:
    """Unset config fields take the SDK's defaults; allow_training follows the setting unless
    the job says otherwise; unknown config keys are passed on."""
    _, body = call(
        {"domain": "document.invoice", "url": "https://x/a.pdf", "config": {"new_knob": 1}}
    )
    assert body["config"] == {
        "max_retries": 3,
        "max_tokens": 65535,
        "temperature": 0.0,
        "detail": "auto",
        "confidence": False,
        "grounding": False,
        "new_knob": 1,
    }
    assert body["metadata"] == {"environment": "dev", "session_id": None, "allow_training": False}
    assert body["batch"] is True and body["callback_url"] == CALLBACK
    _, body = call(
        {"domain": "a.b", "url": "https://x/a.pdf", "metadata": {"allow_training": True}}
    )
    assert body["metadata"]["allow_training"] is True


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"config": {"detail": "ultra"}}, "`config.detail`"),
        ({"config": {"max_tokens": "many"}}, "`config.max_tokens`"),
        ({"metadata": {"environment": "qa"}}, "`metadata.environment`"),
    ],
)
def test_a_wrong_config_or_metadata_value_is_422_naming_the_field(
    data: dict[str, Any], field: str
) -> None:
    """A config or metadata value the API would refuse is refused here first, by name."""
    with pytest.raises(BadRequest) as refused:
        validate_submission({"domain": "a.b", "url": "https://x/a.pdf", **data}, False)
    assert refused.value.status == 422 and field in str(refused.value)
