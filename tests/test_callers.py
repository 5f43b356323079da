"""The callers token file (swc_service.callers): parsing, precise errors, identification."""

from __future__ import annotations

import pytest

from swc_service.callers import (
    SHARED_CALLER,
    CallerFileError,
    identify,
    load_callers,
    parse_callers,
    with_shared,
)

A = "a" * 16
B = "b:with:colons-0123456789"


def test_parses_names_tokens_comments_and_rotation(tmp_path):
    path = tmp_path / "callers"
    path.write_text(f"# the mapper\nmapper:{A}\n\n  batch-jobs.v2 : {B}  \nmapper:{'c' * 20}\n")
    callers = load_callers(path)
    assert callers == {A: "mapper", B: "batch-jobs.v2", "c" * 20: "mapper"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"mapper {A}\n", "found no ':'"),
        (f":{A}\n", "empty caller name"),
        ("mapper:\n", "empty token"),
        (f"map per:{A}\n", "must be 1-63 of"),
        (f"-x:{A}\n", "must be 1-63 of"),
        (f"{'n' * 64}:{A}\n", "must be 1-63 of"),
        (f"anonymous:{A}\n", "reserved"),
        ("mapper:short\n", "shorter than 16"),
        (f"mapper:{A} {A}\n", "printable ASCII"),
        ("mapper:" + "é" * 16 + "\n", "printable ASCII"),
        (f"one:{A}\ntwo:{A}\n", "duplicate token (also on line 1, caller 'one')"),
        ("# nothing\n\n", "no callers"),
    ],
)
def test_malformed_files_are_refused_precisely(tmp_path, text, message):
    path = tmp_path / "callers"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CallerFileError) as ei:
        load_callers(path)
    assert message in str(ei.value)
    assert str(path) in str(ei.value)


def test_error_names_the_line():
    with pytest.raises(CallerFileError, match=r"^f:3: empty caller name"):
        parse_callers(f"# c\nok:{A}\n:{B}\n", "f")


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(CallerFileError, match="cannot read"):
        load_callers(tmp_path / "absent")
    bad = tmp_path / "bin"
    bad.write_bytes(b"\xff\xfe:" + b"x" * 20)
    with pytest.raises(CallerFileError, match="cannot read"):
        load_callers(bad)


def test_shared_token_still_works_as_the_default_caller():
    callers = with_shared(parse_callers(f"mapper:{A}\n"), "shared-token")
    assert identify(callers, "shared-token") == SHARED_CALLER
    assert identify(callers, A) == "mapper"
    assert with_shared({}, None) == {}
    assert with_shared({"t": SHARED_CALLER}, "t") == {"t": SHARED_CALLER}
    with pytest.raises(CallerFileError, match="also caller 'mapper'"):
        with_shared(callers, A)


def test_identify_refuses_unknown_prefixes_and_empty_tokens():
    callers = parse_callers(f"mapper:{A}\nother:{B}\n")
    assert identify(callers, A[:-1]) is None
    assert identify(callers, A + "a") is None
    assert identify(callers, "") is None
    assert identify(callers, B) == "other"
