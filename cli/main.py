"""The `adaptory` command: a root group, global options, lazy subcommands and error rendering.

Subcommands are imported only when run (torch takes seconds to import), so `adaptory --help` and
`adaptory list` start fast. Every library error is an `AdaptoryError`, rendered here once as one
line plus a hint, with the error's exit code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import click
from rich.console import Console

from adaptory.registry.errors import AdaptoryError

# command name -> "module:attribute" (modules under adaptory.cli)
COMMANDS: dict[str, str] = {
    "import": "registry_cmds:import_cmd",
    "list": "registry_cmds:list_cmd",
    "show": "registry_cmds:show_cmd",
    "tag": "registry_cmds:tag_cmd",
    "untag": "registry_cmds:untag_cmd",
    "rm": "registry_cmds:rm_cmd",
    "verify": "registry_cmds:verify_cmd",
    "gc": "registry_cmds:gc_cmd",
    "recover": "registry_cmds:recover_cmd",
    "export": "export_cmd:export_cmd",
    "base": "base_cmds:base_group",
    "doctor": "base_cmds:doctor_cmd",
    "train": "train_cmds:train_cmd",
    "eval": "train_cmds:eval_cmd",
    "generate": "serve_cmds:generate_cmd",
    "predict": "serve_cmds:predict_cmd",
    "chat": "serve_cmds:chat_cmd",
    "serve": "serve_cmds:serve_cmd",
    "merge": "merge_cmds:merge_cmd",
    "diff": "merge_cmds:diff_cmd",
    "bench": "bench_cmds:bench_group",
    "report": "report_cmd:report_cmd",
}

EXIT_CODES_HELP = """\b
Exit codes: 0 ok · 1 failed (or `verify` found damage) · 2 bad input or usage ·
3 not found · 4 stored files or catalog damaged · 5 base mismatch ·
6 storage (disk full, read-only home) · 130 interrupted."""


def console(*, stderr: bool = False) -> Console:
    """A console for user text (no markup). In a pipe or a log (no terminal, COLUMNS unset)
    Rich would lay tables out in 80 columns and cut cells to "accur…"; there they get room for
    their natural width instead."""
    out = Console(stderr=stderr, soft_wrap=True, markup=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = PIPE_WIDTH
    return out


PIPE_WIDTH = 240


@dataclass
class App:
    """What every subcommand receives: the chosen home, output consoles and the registry."""

    home_option: Path | None = None
    debug: bool = False
    # markup=False: names, paths, labels and messages are user text, never Rich markup (a name
    # containing "[/]" would crash the printer); styles are given explicitly with `styled`.
    out: Console = field(default_factory=lambda: console())
    err: Console = field(default_factory=lambda: console(stderr=True))

    @cached_property
    def home(self) -> Path:
        from adaptory.registry.home import resolve_home

        return resolve_home(self.home_option)

    @cached_property
    def registry(self):
        from adaptory.registry import Registry

        return Registry(self.home)


pass_app = click.make_pass_decorator(App)


def _command_available(spec: str) -> bool:
    module = spec.split(":")[0]
    return importlib.util.find_spec(f"adaptory.cli.{module}") is not None


class LazyGroup(click.Group):
    """A group whose subcommands live in other modules and are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names |= {name for name, spec in self.lazy.items() if _command_available(spec)}
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and _command_available(self.lazy[name]):
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(f"adaptory.cli.{module}"), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdaptoryError as exc:
            app = ctx.find_object(App)
            if app is not None and app.debug:
                raise
            render_error(console(stderr=True), exc)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            Console(stderr=True, markup=False).print(styled(("interrupted", "red")))
            ctx.exit(130)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="ADAPTORY_HOME",
    show_envvar=True,
    help="Registry home (catalog.db, blobs/, bases/). Default: the platform's user data dir.",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="adaptory")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, debug: bool) -> None:
    """Adaptory: train, keep, merge and serve many small adapters on one 4-bit base model."""
    ctx.obj = App(home_option=home, debug=debug)
    if not debug:
        quiet_libraries()


def quiet_libraries() -> None:
    """Silence notices that tell users nothing they can act on (set before the libraries load):
    bitsandbytes' search for optional hub kernels at import, transformers' deprecation notes."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def styled(*parts: str | tuple[str, str]):
    """Console text from plain strings and (text, style) pairs; nothing in it is parsed as
    markup, so user text (names, paths, labels, messages) prints exactly as it is."""
    from rich.text import Text

    return Text.assemble(*parts)


def render_error(err: Console, exc: AdaptoryError) -> None:
    err.print(styled(("error:", "bold red"), " ", exc.message), highlight=False)
    if exc.hint:
        err.print(styled(("hint:", "dim"), " ", exc.hint), highlight=False)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    cli(prog_name="adaptory")


if __name__ == "__main__":  # `python -m adaptory.cli.main`: use the real module, not __main__
    from adaptory.cli.main import main as _main

    _main()
