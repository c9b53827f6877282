"""`adaptory train` and `adaptory eval`: thin layers over adapters.train and adapters.evaluate."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from adaptory.cli.lmeval_cmd import TOKENIZERS, lm_eval_cmd
from adaptory.cli.main import App, pass_app, styled

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _metric_line(metrics: dict, task: str) -> str:
    base = metrics.get("base") or {}
    keys = ["accuracy", "macro_f1"] if task == "seq-cls" else ["eval_loss", "perplexity"]
    if task != "seq-cls" and "exact_match" in metrics:
        keys.append("exact_match")
    parts = []
    for key in keys:
        if key in metrics:
            was = f" (base {base[key]:.4g})" if key in base else ""
            parts.append(f"{key} {metrics[key]:.4g}{was}")
    return ", ".join(parts)


@click.command("train")
@click.option(
    "--base",
    help="Base model: minilm or tinylm (built in), a base made with `adaptory base`, or a folder.",
)
@click.option(
    "--data",
    multiple=True,
    help="Training data (.jsonl, .csv, .tsv, .parquet), or a hub dataset NAME or ORG/NAME[:SPLIT] "
    "(needs the `datasets` package and a network). Repeat to mix files, each FILE@WEIGHT "
    "(a row counts WEIGHT times; default 1).",
)
@click.option("--name", help="Registry name for the adapter (a new version if it exists).")
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "seq-cls"]),
    help="Default: seq-cls if the data has a label column, else causal-lm.",
)
@click.option(
    "--method",
    type=click.Choice(["lora", "prefix", "prompt", "ia3"]),
    help="Adapter kind.  [default: lora]",
)
@click.option(
    "--config",
    "config_file",
    type=_FILE,
    help="TOML file with any of these settings (flags given here override it).",
)
@click.option("--eval-data", help="Held-out evaluation file (or hub dataset, as --data).")
@click.option(
    "--eval-split",
    type=float,
    help="Hold out this share of --data for evaluation (seeded).  [default: 0.1 without "
    "--eval-data; 0 = no evaluation]",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(
        ["text", "prompt-completion", "chat", "classification", "alpaca", "sharegpt"]
    ),
    help="Data format. Default: detected from the columns.",
)
@click.option(
    "--columns",
    metavar="NAME=COLUMN,...",
    help="Which of your columns holds each one the format reads, e.g. "
    "text=sentence,label=priority (names: text, label, prompt, completion, messages, "
    "instruction, input, output, conversations).",
)
@click.option(
    "--chat-template",
    metavar="NAME|FILE",
    help="Render chat data with this template instead of the base's: chatml, llama-3, zephyr, "
    "or a Jinja file. Stored with the adapter; serving and eval use it.",
)
@click.option(
    "--quant", type=click.Choice(["nf4", "fp4", "int8", "none"]), help="Base quantization. [nf4]"
)
@click.option("--rank", type=int, help="LoRA rank.  [8]")
@click.option("--alpha", type=float, help="LoRA alpha.  [16]")
@click.option("--dropout", type=float, help="LoRA dropout.  [0.05]")
@click.option("--target-modules", help="Comma-separated modules to adapt (LoRA, IA3).")
@click.option("--dora/--no-dora", default=None, help="Weight-decomposed LoRA.")
@click.option("--rslora/--no-rslora", default=None, help="Rank-stabilised LoRA scaling.")
@click.option("--virtual-tokens", type=int, help="Prefix / prompt length.  [16]")
@click.option("--prefix-projection/--no-prefix-projection", default=None, help="Prefix MLP.")
@click.option(
    "--lr",
    type=float,
    help="Learning rate. Default: per method and task (LoRA 2e-3, 5e-4 for seq-cls).",
)
@click.option(
    "--head-lr-factor",
    type=float,
    help="A classifier's new head learns at lr x this.  [1]",
)
@click.option(
    "--epochs",
    type=int,
    help="Passes over the data. Default: sized by the data, enough for 160 steps (1-40).",
)
@click.option("--max-steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, help="Rows per batch.  [8]")
@click.option("--grad-accum", type=int, help="Batches per optimizer step.  [1]")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None)
@click.option(
    "--warmup", type=float, help="Warm-up: a share of steps (<1, at most 100) or steps.  [0.1]"
)
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), help="[cosine]")
@click.option("--weight-decay", type=float, help="AdamW weight decay.  [0]")
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm (0 = off).  [1.0]")
@click.option("--eval-every", type=int, help="Evaluate every N steps.  [each epoch]")
@click.option("--early-stopping", type=int, help="Stop after N evaluations without improvement.")
@click.option(
    "--keep",
    type=click.Choice(["best", "last"]),
    help="Store the adapter with the best eval loss, or the last one.  [best]",
)
@click.option("--checkpoint-every", type=int, help="Save a resumable checkpoint every N steps.")
@click.option("--seed", type=int, help="[0]")
@click.option("--max-length", type=int, help="Tokens per row (longer rows are cut).  [128]")
@click.option(
    "--output-dir", type=click.Path(file_okay=False), help="Run folder. [HOME/runs/NAME-TIME]"
)
@click.option(
    "--resume",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[RUN_DIR]",
    help="Continue an interrupted run (default: the latest) with its stored settings; other flags are ignored.",
)
@click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable).")
@click.option("--description", help="A line saying what this adapter is for.")
@click.option("--device", help="cpu, cuda, cuda:1 …  [cuda if available]")
@click.option("--threads", type=int, help="CPU threads for torch.  [1: faster for adapters]")
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON; no progress.")
@pass_app
def train_cmd(app: App, config_file, as_json, fmt, tags, **options) -> None:
    """Train an adapter on a 4-bit base and add it to the registry.

    \b
    adaptory train --base minilm --data reviews.jsonl --name reviews
    adaptory train --config examples/configs/shout.toml
    adaptory train --resume            # continue the latest interrupted run
    """
    from adaptory.adapters.training.loop import TrainConfig, train_adapter

    options["format"] = fmt
    options["tags"] = list(tags) or None
    data = list(options.get("data") or ())
    options["data"] = (data[0] if len(data) == 1 else data) or None
    if config_file is not None:
        config = TrainConfig.from_toml(config_file, **options)
    else:
        config = TrainConfig(**{k: v for k, v in options.items() if v is not None})
    result = train_adapter(config, registry=app.registry, show_progress=not as_json)
    entry = result.entry
    if as_json:
        app.out.print_json(json.dumps(entry.to_dict(), default=str))
        return
    line = _metric_line(result.metrics, entry.task)
    app.out.print(
        styled(
            ("trained", "green"),
            " ",
            (entry.ref, "bold"),
            f" ({entry.method}, {entry.task}) in {result.wall_time_s:.0f}s, {result.steps} steps"
            + (" (stopped early)" if result.stopped_early else ""),
        )  # fmt: skip
    )
    if line:
        app.out.print(f"  {line}")
    app.out.print(f"  stored as {entry.digest[:12]} in {app.home}; run folder {result.run_dir}")
    hint = "predict" if entry.task == "seq-cls" else "generate"
    app.out.print(f"  use it: adaptory {hint} {entry.ref} …   evaluate: adaptory eval {entry.ref}")


@click.command("eval")
@click.argument("ref")
@click.option("--data", type=_FILE, help="Evaluation data file (or --lm-eval TASKS).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(
        ["text", "prompt-completion", "chat", "classification", "alpaca", "sharegpt"]
    ),
    help="Data format. Default: detected from the columns.",
)
@click.option(
    "--columns",
    metavar="NAME=COLUMN,...",
    help="Which of your columns holds each one the format reads (as for train).",
)
@click.option("--limit", type=int, help="Only the first N rows (with --lm-eval: docs per task).")
@click.option("--no-record", is_flag=True, help="Do not store the result with the entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--lm-eval", "lm_eval_tasks", metavar="TASKS",
              help="Instead of --data: lm-eval tasks (comma-separated), REF served on 127.0.0.1 "
                   "(pip install 'adaptory[eval]'); printed, not stored.")  # fmt: skip
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --lm-eval: a folder of more task YAMLs.")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(1, 256), default=4, show_default=True,
              help="With --lm-eval: prompts per request.")  # fmt: skip
@click.option("--tokenizer", type=click.Choice(TOKENIZERS), default="base", show_default=True,
              help="With --lm-eval: base = the base's tokenizer files, token-id prompts; server = "
                   "the server's /tokenize; none = text prompts, generation tasks only.")  # fmt: skip
@click.option("--quant", type=click.Choice(["nf4", "fp4", "int8", "none"]), default="nf4",
              show_default=True, help="With --lm-eval: how to load the base.")  # fmt: skip
@click.option("--device", help="With --lm-eval: cpu, cuda, cuda:1 … (default: best available)")
@pass_app
def eval_cmd(app: App, ref, data, fmt, columns, limit, no_record, as_json, lm_eval_tasks,
             include_path, batch_size, tokenizer, quant, device) -> None:  # fmt: skip
    """Evaluate adapter REF on a data file, or on lm-eval tasks (--lm-eval).

    With --data the result is stored under metrics.evals. With --lm-eval, REF (or base:B, the
    plain base) is served on 127.0.0.1 and lm-eval's scores of it are printed."""
    if (data is None) == (lm_eval_tasks is None):
        raise click.UsageError("give --data FILE or --lm-eval TASKS (one of them)")
    if lm_eval_tasks is not None:
        return lm_eval_cmd(
            app, ref, lm_eval_tasks, limit=limit, include_path=include_path,
            batch_size=batch_size, tokenizer=tokenizer, quant=quant, device=device,
            as_json=as_json,
        )  # fmt: skip
    from adaptory.adapters.training.evaluate import evaluate_entry

    entry = app.registry.resolve(ref)
    status = app.err.status(f"evaluating {entry.ref} on {data.name}")
    with status if not as_json else contextlib.nullcontext():
        metrics = evaluate_entry(
            app.registry, entry.ref, data, fmt=fmt, record=not no_record, limit=limit,
            columns=columns,
        )  # fmt: skip
    if as_json:
        app.out.print_json(json.dumps({"ref": entry.ref, "data": str(data), "metrics": metrics}))
        return
    app.out.print(styled((entry.ref, "bold"), f" on {data} ({metrics['rows']} rows)"))
    app.out.print(f"  {_metric_line(metrics, entry.task)}")
    if "confusion_matrix" in metrics:
        cm = metrics["confusion_matrix"]
        for name, row in zip(cm["labels"], cm["matrix"], strict=True):
            app.out.print(f"  {name:>12}: {row}", highlight=False)
    if not no_record:
        app.out.print(f"  recorded under metrics.evals[{data.name!r}]", highlight=False)
