"""`adaptory eval REF --lm-eval TASKS`: lm-eval's tasks scored through the server, a thin layer
over adapters.bench.lmeval; `eval` (train_cmds.py) hands over to it when --lm-eval is given."""

from __future__ import annotations

import json
from pathlib import Path

import click

from adaptory.cli.main import App, styled

TOKENIZERS = ("base", "server", "none")  # adapters.bench.lmeval.TOKENIZERS, without importing it


def lm_eval_cmd(app: App, ref: str, tasks: str, *, limit: int | None, include_path: Path | None,
                batch_size: int, tokenizer: str, quant: str, device: str | None,
                as_json: bool) -> None:  # fmt: skip
    from adaptory.adapters.bench.lmeval import evaluate, require_lm_eval, results_table
    from adaptory.registry.errors import BadInput

    require_lm_eval()  # before loading anything
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise BadInput("--lm-eval needs at least one task name", hint="e.g. --lm-eval hellaswag")
    app.err.print(styled((f"lm-eval {', '.join(names)} on {ref}", "dim")), highlight=False)
    results = evaluate(
        app.registry, ref, names, limit=limit, include_path=include_path,
        batch_size=batch_size, tokenizer=tokenizer, quant=quant, device=device,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps({"ref": ref, "tasks": names, "results": results["results"]}))
        return
    app.out.print(results_table(results), highlight=False)
