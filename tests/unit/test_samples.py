"""The simulator's sample responses (receiver/samples.json) against the published schemas."""

from __future__ import annotations

import copy
import importlib.resources
import json
from typing import Any

import pytest
from pydantic import BaseModel
from vlmrun.client.types import MarkdownDocument
from vlmrun.hub.registry import registry

SAMPLES: dict[str, list[Any]] = json.loads(
    (importlib.resources.files("receiver") / "samples.json").read_text(encoding="utf-8")
)
HUB_DOMAINS = sorted(registry.list_schemas())
TRANSCRIPTION_DOMAINS = ["audio.transcription", "video.transcription"]
EXTRA_DOMAINS = ["document.markdown", *TRANSCRIPTION_DOMAINS]


def _normalise(value: Any) -> Any:
    """JSON numbers compare by value: 10 == 10.0; everything else is kept as is."""
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _differences(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Where `actual` (the model's dump) departs from `expected` (the sample), one line each."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}.{key}: not in the schema (dropped)" for key in expected.keys() - actual]
        out += [f"{path}.{key}: added by the model" for key in actual.keys() - expected]
        for key in expected.keys() & actual.keys():
            out += _differences(expected[key], actual[key], f"{path}.{key}")
        return sorted(out)
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items, dumped as {len(actual)}"]
        return [
            line
            for index, (one, other) in enumerate(zip(expected, actual, strict=True))
            for line in _differences(one, other, f"{path}[{index}]")
        ]
    if expected != actual:
        return [f"{path}: {expected!r} dumped as {actual!r}"]
    return []


def strict_differences(model: type[BaseModel], sample: Any) -> list[str]:
    """Validate `sample` and list every path where the JSON dump of the result differs.

    Pydantic ignores unknown keys by default, so a misspelt field (`tax` for `tax_amount`)
    validates; it shows up here because the dump no longer has it.
    """
    dumped = model.model_validate(sample).model_dump(mode="json", exclude_unset=True)
    return _differences(_normalise(sample), _normalise(dumped))


def _cases(domains: list[str]) -> list[Any]:
    return [
        pytest.param(domain, index, id=f"{domain}[{index}]")
        for domain in domains
        for index in range(len(SAMPLES.get(domain, [])))
    ]


@pytest.mark.parametrize("domain", [*HUB_DOMAINS, *EXTRA_DOMAINS])
def test_every_domain_has_three_distinct_samples(domain: str) -> None:
    """Every hub domain, markdown and the transcriptions get three different responses."""
    samples = SAMPLES.get(domain)
    assert samples is not None, f"{domain}: no samples"
    assert len(samples) == 3, f"{domain}: {len(samples)} samples, want 3"
    assert all(isinstance(sample, dict) and sample for sample in samples), domain
    assert len({json.dumps(sample, sort_keys=True) for sample in samples}) == 3, domain


def test_generic_fallback_has_three_samples() -> None:
    """Domains the hub lacks get one of three generic responses from the simulator."""
    samples = SAMPLES.get("generic")
    assert samples is not None and len(samples) == 3
    assert all(isinstance(sample, dict) and sample for sample in samples)


def test_hub_has_the_domains_the_samples_were_written_for() -> None:
    """A hub upgrade that adds a domain fails here until it has samples too."""
    assert len(HUB_DOMAINS) >= 31
    assert set(HUB_DOMAINS) <= SAMPLES.keys()


@pytest.mark.parametrize(("domain", "index"), _cases(HUB_DOMAINS))
def test_hub_sample_is_a_strict_instance_of_its_schema(domain: str, index: int) -> None:
    """A completed response validates against the domain's hub schema, with no unknown keys."""
    sample = SAMPLES[domain][index]
    problems = strict_differences(registry[domain], sample)
    assert not problems, f"{domain}[{index}]:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize(("domain", "index"), _cases(["document.markdown"]))
def test_markdown_sample_is_a_strict_markdown_document(domain: str, index: int) -> None:
    """A markdown response parses as the SDK's MarkdownDocument, with no unknown keys."""
    sample = SAMPLES[domain][index]
    problems = strict_differences(MarkdownDocument, sample)
    assert not problems, f"{domain}[{index}]:\n  " + "\n  ".join(problems)
    assert 1 <= len(sample["pages"]) <= 3


def test_one_markdown_sample_has_a_table() -> None:
    """Some markdown response carries a structured table with headers and rows."""
    tables = [
        table
        for doc in SAMPLES["document.markdown"]
        for page in MarkdownDocument.model_validate(doc).pages
        for table in page.tables or []
    ]
    assert tables and all(table.headers and table.data for table in tables)


@pytest.mark.parametrize(("domain", "index"), _cases(TRANSCRIPTION_DOMAINS))
def test_transcription_segments_are_contiguous(domain: str, index: int) -> None:
    """Segments start at 0, follow each other without gaps and end at the duration."""
    sample = SAMPLES[domain][index]
    assert set(sample) == {"metadata", "segments"}
    assert set(sample["metadata"]) == {"duration", "language"}
    allowed = {"start_time", "end_time", "content"}
    if domain == "video.transcription":
        allowed.add("video_content")
    segments = sample["segments"]
    assert segments and segments[0]["start_time"] == 0
    previous_end = 0.0
    for number, segment in enumerate(segments):
        where = f"{domain}[{index}].segments[{number}]"
        assert set(segment) <= allowed, f"{where}: unknown keys {set(segment) - allowed}"
        assert isinstance(segment["content"], str) and segment["content"], where
        assert segment["start_time"] == pytest.approx(previous_end), f"{where}: gap or overlap"
        assert segment["end_time"] > segment["start_time"], f"{where}: not increasing"
        previous_end = segment["end_time"]
    assert previous_end == pytest.approx(sample["metadata"]["duration"])


@pytest.mark.parametrize("index", range(3))
def test_invoice_amounts_add_up(index: int) -> None:
    """Line totals, subtotal, total and balance due of an invoice are consistent."""
    inv = SAMPLES["document.invoice"][index]
    for item in inv["items"]:
        assert item["total_price"] == round(item["quantity"] * item["unit_price"], 2), item
    assert inv["subtotal"] == pytest.approx(sum(i["total_price"] for i in inv["items"]))
    expected = (
        inv["subtotal"]
        - inv.get("discount_amount", 0)
        + inv.get("shipping_cost", 0)
        + inv["tax_amount"]
    )
    assert inv["total_amount"] == pytest.approx(expected)
    assert inv["balance_due"] == pytest.approx(inv["total_amount"] - inv["amount_paid"])


@pytest.mark.parametrize("index", range(3))
def test_receipt_amounts_add_up(index: int) -> None:
    """Line totals, subtotal and total of a receipt are consistent."""
    rec = SAMPLES["document.receipt"][index]
    for item in rec["items"]:
        assert item["total_price"] == round(item["quantity"] * item["unit_price"], 2), item
    assert rec["subtotal"] == pytest.approx(sum(i["total_price"] for i in rec["items"]))
    charges = sum(charge["amount"] for charge in rec.get("additional_charges", []))
    expected = (
        rec["subtotal"]
        - rec.get("discount_amount", 0)
        + rec["tax"]
        + rec.get("tip_amount", 0)
        + charges
    )
    assert rec["total"] == pytest.approx(expected)


def test_strict_check_catches_a_misspelt_field() -> None:
    """An invoice saying `tax` where the schema says `tax_amount` is rejected, by path."""
    wrong = copy.deepcopy(SAMPLES["document.invoice"][0])
    wrong["tax"] = wrong.pop("tax_amount")
    registry["document.invoice"].model_validate(wrong)  # plain validation lets it through
    assert strict_differences(registry["document.invoice"], wrong) == [
        "$.tax: not in the schema (dropped)"
    ]


def test_strict_check_catches_a_nested_unknown_key() -> None:
    """An unknown key deep inside a sample (an item's `sku`) is reported with its path."""
    wrong = copy.deepcopy(SAMPLES["document.invoice"][1])
    wrong["items"][2]["sku"] = "NW-ONB-8H"
    assert strict_differences(registry["document.invoice"], wrong) == [
        "$.items[2].sku: not in the schema (dropped)"
    ]


def test_strict_check_catches_a_value_the_schema_rewrites() -> None:
    """A value the schema would change on the way through (a float for a Decimal) is reported."""
    wrong = copy.deepcopy(SAMPLES["document.form-work-order"][0])
    wrong["total_amount"] = 512.63
    assert strict_differences(registry["document.form-work-order"], wrong) == [
        "$.total_amount: 512.63 dumped as '512.63'"
    ]
