"""Names, tags and references: `NAME` (latest), `NAME:3` (a version), `NAME:prod` (a tag).

Names and tags become parts of references and of output users paste into shells, so they are
kept to a small, path-safe alphabet; a tag is never all digits, which keeps `NAME:3` unambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adaptory.registry.errors import InvalidName, InvalidReference

MAX_NAME_LENGTH = 64
_ALLOWED = re.compile(r"[A-Za-z0-9._-]")
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME_HINT = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _describe_char(char: str) -> str:
    if char == "/" or char == "\\":
        return f"path separator {char!r}"
    if not char.isprintable():
        return f"control character {char!r}"
    if char.isspace():
        return f"whitespace {char!r}"
    return repr(char)


def validate_name(name: str, *, kind: str = "name") -> str:
    """Return `name` unchanged if it can be stored as a name (or tag), else raise InvalidName."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{kind} must not be empty", hint=_NAME_HINT)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"{kind} {name[:20]!r}... is {len(name)} characters long (at most {MAX_NAME_LENGTH})",
            hint=_NAME_HINT,
        )
    for char in name:
        if not _ALLOWED.fullmatch(char):
            raise InvalidName(f"{kind} {name!r} contains {_describe_char(char)}", hint=_NAME_HINT)
    if not _VALID.fullmatch(name):
        raise InvalidName(
            f"{kind} {name!r} must start with a letter or digit, not {name[0]!r}", hint=_NAME_HINT
        )
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid name that is not a number (numbers are versions)."""
    validate_name(tag, kind="tag")
    if tag.isdigit():
        raise InvalidName(
            f"tag {tag!r} is a number; numbers are versions",
            hint="choose a tag with at least one letter, e.g. 'prod' or 'v2-candidate'",
        )
    return tag


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a name plus at most one of a version or a tag (neither = latest)."""

    name: str
    version: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.tag is not None:
            return f"{self.name}:{self.tag}"
        return self.name


def parse_ref(text: str) -> Ref:
    """Parse `NAME`, `NAME:VERSION` or `NAME:TAG`; raise InvalidReference naming the problem."""
    hint = "a reference is NAME, NAME:VERSION (e.g. sentiment:3) or NAME:TAG (e.g. sentiment:prod)"
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference("empty adapter reference", hint=hint)
    if text.count(":") > 1:
        raise InvalidReference(f"reference {text!r} has more than one ':'", hint=hint)
    name, _, selector = text.partition(":")
    try:
        validate_name(name)
    except InvalidName as exc:
        raise InvalidReference(f"reference {text!r}: {exc.message}", hint=hint) from None
    if ":" not in text:
        return Ref(name)
    if not selector:
        raise InvalidReference(f"reference {text!r} has nothing after ':'", hint=hint)
    if selector.isdigit():
        version = int(selector)
        if version < 1:
            raise InvalidReference(f"reference {text!r}: versions start at 1", hint=hint)
        return Ref(name, version=version)
    try:
        validate_name(selector, kind="tag")
    except InvalidName as exc:
        raise InvalidReference(f"reference {text!r}: {exc.message}", hint=hint) from None
    return Ref(name, tag=selector)
