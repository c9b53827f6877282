"""References and names at their edges: exact limits, exact messages, what a Ref promises.

Written against the mutants of registry/refs.py that test_registry_refs.py let survive
(docs/TESTING.md): each test pins one boundary or one word of a message a user reads.
"""

import dataclasses
import string

import pytest

from adaptory.registry import Ref, parse_ref
from adaptory.registry.errors import InvalidName, InvalidReference
from adaptory.registry.refs import MAX_NAME_LENGTH, validate_name


def test_version_one_is_the_first_version_and_zero_is_refused():
    assert parse_ref("a:1") == Ref("a", version=1)
    assert parse_ref("a:2") == Ref("a", version=2)
    with pytest.raises(InvalidReference, match="versions start at 1"):
        parse_ref("a:0")


def test_a_name_of_exactly_the_limit_is_accepted_one_more_is_refused():
    assert MAX_NAME_LENGTH == 64
    assert validate_name("n" * 64) == "n" * 64
    with pytest.raises(InvalidName, match="is 65 characters long"):
        validate_name("n" * 65)


def test_a_too_long_name_is_quoted_by_its_first_twenty_characters():
    name = ((string.ascii_letters + string.digits) * 2)[:65]
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert info.value.message == (f"name {name[:20]!r}... is 65 characters long (at most 64)")


@pytest.mark.parametrize(
    ("name", "described"),
    [
        ("a/b", "path separator '/'"),
        ("a\\b", "path separator '\\\\'"),
        ("a:b", "':'"),  # ':' sorts after '/': still a plain character, not a separator
        ("a~b", "'~'"),  # '~' sorts after '\\'
        ("a b", "whitespace ' '"),
        ("a\x7fb", "control character '\\x7f'"),
    ],
)
def test_each_refused_character_is_described_exactly(name, described):
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert info.value.message == f"name {name!r} contains {described}"


def test_a_bad_first_character_is_the_one_named():
    with pytest.raises(InvalidName) as info:
        validate_name(".xy")
    assert info.value.message == "name '.xy' must start with a letter or digit, not '.'"


def test_kind_is_keyword_only():
    """`validate_name(tag, "tag")` would read as a second name; the kind must be named."""
    with pytest.raises(TypeError):
        validate_name("ok", "tag")  # type: ignore[misc]
    with pytest.raises(InvalidName, match="^tag 'a b'"):
        validate_name("a b", kind="tag")


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_or_blank_references_are_called_empty(text):
    with pytest.raises(InvalidReference) as info:
        parse_ref(text)
    assert info.value.message == "empty adapter reference"


@pytest.mark.parametrize("value", [None, 3, b"name"])
def test_a_reference_that_is_not_a_string_is_an_invalid_reference(value):
    with pytest.raises(InvalidReference, match="empty adapter reference"):
        parse_ref(value)  # type: ignore[arg-type]


def test_a_ref_is_immutable_and_hashable():
    ref = parse_ref("a:prod")
    assert {ref: 1}[Ref("a", tag="prod")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.name = "b"  # type: ignore[misc]
