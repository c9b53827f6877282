"""The adapter registry: a SQLite catalog plus a content-addressed store of PEFT adapter folders."""

from adaptory.registry.entry import Entry, FileRecord
from adaptory.registry.refs import Ref, parse_ref
from adaptory.registry.registry import GcResult, Problem, Registry

__all__ = ["Entry", "FileRecord", "GcResult", "Problem", "Ref", "Registry", "parse_ref"]
