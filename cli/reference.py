"""Render every command's `--help` into one Markdown page (docs/CLI.md).

`python -m adaptory.cli.reference > docs/CLI.md` regenerates it; a test fails when the checked-in
page and the commands drift apart.
"""

from __future__ import annotations

import click

from adaptory.cli.main import cli


def _walk(command: click.Command, path: list[str], ctx: click.Context | None):
    # The root's context settings (-h as well as --help, width) as a real run applies them, so
    # the page does not depend on which commands ran before in the same process.
    settings = {**command.context_settings, "terminal_width": 100}
    ctx = click.Context(command, info_name=path[-1], parent=ctx, **settings)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, [*path, name], ctx)


def render() -> str:
    parts = [
        "# CLI reference",
        "",
        "Generated from the commands themselves by `python -m adaptory.cli.reference > "
        "docs/CLI.md`; a test keeps it in sync.",
        "",
    ]
    for path, command, ctx in _walk(cli, ["adaptory"], None):
        parts += [f"## `{' '.join(path)}`", "", "```", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
