"""References and names: what parses, what is refused and how the refusal reads."""

import pytest

from adaptory.registry import Ref, parse_ref
from adaptory.registry.errors import InvalidName, InvalidReference
from adaptory.registry.refs import validate_name, validate_tag


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sentiment", Ref("sentiment")),
        ("sentiment:3", Ref("sentiment", version=3)),
        ("sentiment:prod", Ref("sentiment", tag="prod")),
        ("a.b_c-1:v2", Ref("a.b_c-1", tag="v2")),
        ("7b-chat:12", Ref("7b-chat", version=12)),
    ],
)
def test_parse_ref_accepts_name_version_and_tag(text, expected):
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("a:b:c", "more than one ':'"),
        ("name:", "nothing after ':'"),
        ("name:0", "versions start at 1"),
        ("../etc", "path separator"),
        ("-flag", "must start with a letter or digit"),
        ("name:pr od", "whitespace"),
        ("name:pr/od", "path separator"),
    ],
)
def test_parse_ref_refuses_bad_references(text, fragment):
    with pytest.raises(InvalidReference) as info:
        parse_ref(text)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("a/b", "path separator '/'"),
        ("a\\b", "path separator"),
        ("a:b", "':'"),
        ("tab\there", "control character"),
        (".hidden", "must start with a letter or digit"),
        ("x" * 65, "at most 64"),
        ("", "must not be empty"),
    ],
)
def test_invalid_names_name_the_offending_character(name, fragment):
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert fragment in info.value.message


def test_numeric_tags_are_refused_because_numbers_are_versions():
    with pytest.raises(InvalidName, match="tag '3' is a number; numbers are versions"):
        validate_tag("3")
    assert validate_tag("v3") == "v3"
