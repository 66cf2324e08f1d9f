"""JSON read back with one-line errors: a text cut anywhere is *torn*, a malformed one *corrupt*."""

from __future__ import annotations

import json

import pytest

from robustft.errors import FileContentError
from robustft.safe_io import parse_json

DOCUMENT = json.dumps(
    {"methods": {"zeroshot": {"train_seconds": 12.3456, "ok": True, "ci": None, "name": 'a "quoted" name'}},
     "steps": [1e-05, -3, 0]},
    indent=2,
)  # fmt: skip


def test_every_prefix_of_a_document_is_torn():
    """An interrupted write can stop anywhere: inside a key or string, a number (after ``12.``), a literal
    (``tr``) or between tokens; each is the torn message, never the corrupt one."""
    assert parse_json(DOCUMENT, "results.json")["steps"] == [1e-05, -3, 0]
    for cut in range(1, len(DOCUMENT)):
        with pytest.raises(FileContentError, match=r"^results.json: torn JSON: the text ends after"):
            parse_json(DOCUMENT[:cut], "results.json")


@pytest.mark.parametrize("text", ['{"methods": x}', '{"a": 1.2.3}', '{"a": 1}}', "[1, 2,, 3]", '{"a": tx}'])
def test_malformed_text_is_corrupt_and_names_its_position(text):
    with pytest.raises(FileContentError, match=r"^results.json: corrupt JSON \(line 1 column \d+: "):
        parse_json(text, "results.json")
