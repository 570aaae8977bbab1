"""The ``drnn`` command line: the Typer commands, and :func:`main`, which every failure leaves through.

A command turns its options into a library call (:mod:`drnn_cli.commands`; ``train``:
:mod:`drnn_cli.train_session`) and shows what comes back with :mod:`drnn_cli.render`: which lines
and tables, on which stream. What a command does, refuses or notes is decided in the library; an
option is checked here only on its own (``--max-unknown``: a share from 0 to 1). :func:`main` turns
every failure into one line on stderr and an exit code: a :class:`DrnnError` as its message, a
library failure the user can fix as :mod:`drnn_cli.errors` words it, a signal as 130, 143 or 141,
anything else as an internal error.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from drnn_cli import __version__
from drnn_cli.config import load_config
from drnn_cli.errors import (
    DrnnError,
    PeerGone,
    TrainingInterrupted,
    UsageError,
    out_of_memory_message,
    peer_gone_message,
)
from drnn_cli.files import OUTPUT_ERRNOS
from drnn_cli.presets import config_source_note, describe_presets, find_config, find_preset
from drnn_cli.rank_errors import PEER_ERROR_WAIT_S, rank_origin, waits_before_saying
from drnn_cli.render import (
    RichReporter,
    consoles,
    download_progress,
    emit_json,
    evaluation_progress,
    format_perplexity,
    plural,
    print_generated,
    print_line,
    print_note,
)
from drnn_cli.run_files import RunFiles
from drnn_cli.shown_text import percent, terminal_safe
from drnn_cli.signals import (
    TORCHRUN_ENV,
    Signalled,
    exit_on_signals,
    exit_process,
    guard_output,
    ignore_further_signals,
    in_process_group,
    launched_rank,
)

app = typer.Typer(
    name="drnn",
    help="Train deep recurrent (RNN/GRU/LSTM) character language models, then continue text and measure perplexity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

CONFIG_HELP = (
    "A YAML config file, or a preset name (drnn presets lists them: lstm2, d2l/ch9_3_deep_lstm, ...)."
)
ConfigOption = Annotated[
    str | None, typer.Option("--config", "-c", metavar="FILE_OR_PRESET", help=CONFIG_HELP)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config key: --set model.num_layers=3 (repeatable, YAML values).",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="End with one JSON object on stdout (human output goes to stderr).")
]
RunOption = Annotated[
    Path | None, typer.Option("--run", metavar="DIR", help="Run directory (default: the latest run).")
]
CheckpointOption = Annotated[
    Path | None, typer.Option("--checkpoint", metavar="FILE", help="A checkpoint file instead of a run.")
]


class Device(str, enum.Enum):
    auto = "auto"  # CUDA when present
    cpu = "cpu"
    cuda = "cuda"


class Signal(str, enum.Enum):
    hidden = "hidden"
    cell = "cell"  # LSTM cell state


class SortRuns(str, enum.Enum):
    updated = "updated"  # the newest first
    best = "best"  # the lowest best validation perplexity first
    name = "name"


class Split(str, enum.Enum):
    train = "train"
    val = "val"
    test = "test"


DeviceOption = Annotated[Device, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]


def _share(value: float | None) -> float | None:
    """A share from 0 to 1; NaN is refused as such (a range check lets it through with an odd message)."""
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"{value:g} is not a share from 0 to 1")
    return value


InitFromOption = Annotated[
    Path | None,
    typer.Option(
        "--init-from",
        metavar="RUN_OR_CHECKPOINT",
        help="Start from the weights of another run or checkpoint (fine-tuning).",
    ),
]
MaxUnknownOption = Annotated[
    float | None,
    typer.Option(
        "--max-unknown",
        metavar="F",
        callback=_share,
        help="With --init-from: largest share of tokens allowed to be <unk> (default 0.01).",
    ),
]


# ---------------------------------------------------------------------------------------------
# drnn --version


def _version(value: bool) -> None:
    if value:
        typer.echo(f"drnn {__version__}")
        raise typer.Exit()


@dataclass
class Session:
    """What the root options tell :func:`main`, which reads it after the command has ended."""

    debug: bool = False  # print the traceback of an internal error


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for unexpected errors.")] = False,
) -> None:
    if debug and isinstance(ctx.obj, Session):
        ctx.obj.debug = True
    if ctx.invoked_subcommand != "train" and TORCHRUN_ENV in os.environ and launched_rank() != 0:
        # under torchrun only training is shared out: every other command is one process's work, done
        # by rank 0 alone (each rank printed it, and --json's reader got W objects: ddp32); a stray
        # WORLD_SIZE and RANK outside torchrun run it as usual (it exited 0 in silence: review rev32)
        raise typer.Exit(0)


# ---------------------------------------------------------------------------------------------
# drnn data


MAX_SHOWN_BATCHES = 1_000  # --batches: more is no longer something to read


def _count_option(flag: str, highest: int, help_text: str, metavar: str = "N", lowest: int = 0) -> Any:
    """A whole-number option of ``drnn data`` (how many to show), its range checked by the parser."""
    return typer.Option(flag, metavar=metavar, min=lowest, max=highest, help=help_text)


MAX_NGRAM = 5  # --ngrams: drnn_cli.ngrams.MAX_N, which keys n ids as one int64
MAX_TEXT_TOKENS = 100_000  # --text: a screenful is the point; --json carries what is asked
MAX_EPOCH_SHOWN = 10**9  # --epoch: each epoch's seed is the run's and the epoch's; past this, no run goes


@app.command("data")
def data_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            metavar="RUN_OR_CHECKPOINT",
            help="Read the text as fine-tuning from this run or checkpoint would (its vocabulary).",
        ),
    ] = None,
    max_unknown: MaxUnknownOption = None,
    batches: Annotated[
        int,
        _count_option(
            "--batches",
            MAX_SHOWN_BATCHES,
            "Show the first N minibatches of an epoch as training reads them (d2l §8.3).",
        ),
    ] = 0,
    epoch: Annotated[
        int,
        _count_option(
            "--epoch",
            MAX_EPOCH_SHOWN,
            "The epoch --batches shows and the minibatch count is of (each draws its own offset).",
            metavar="E",
            lowest=1,
        ),
    ] = 1,
    text: Annotated[
        int,
        _count_option(
            "--text",
            MAX_TEXT_TOKENS,
            "Show the text's first N tokens as training reads them (after data.preprocess).",
        ),
    ] = 0,
    ngrams: Annotated[
        int,
        _count_option(
            "--ngrams",
            MAX_NGRAM,
            "Also list the most frequent N-grams of the tokens used (d2l §8.3: 2, 3 with data.token=word).",
        ),
    ] = 0,
    zipf: Annotated[
        Path | None,
        typer.Option(
            "--zipf",
            metavar="OUT.png",
            help="Draw Zipf's law: unigram, bigram and trigram counts against rank, with the fitted "
            "exponents (d2l §8.3; needs matplotlib).",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Download (if needed), tokenize and describe the corpus.

    Example: drnn data --config lstm2.yaml --set data.token=word
    """
    from drnn_cli.batch_view import view_lines
    from drnn_cli.commands import MOST_FREQUENT_SHOWN, DataRequest, describe_data, zipf_output
    from drnn_cli.start_point import given_keys, load_start_config
    from drnn_cli.zipf import ZIPF_ORDERS

    out, _ = consoles(json_out)
    found = find_config(config) if config is not None else None
    zipf_png = zipf_output(zipf, found, init_from) if zipf is not None else None
    # a bare drnn data is the one read as "what I will train on"; --set or --init-from choose their own
    said = None if config is None and (set_ or init_from) else config_source_note(config, found)
    resolved = load_start_config(found, set_ or [], init_from)
    request = DataRequest(
        resolved,
        init_from,
        max_unknown,
        given_keys(set_ or []),
        said,
        show_batches=batches,
        every_row=json_out,
        epoch=epoch,
        show_text=text,
        ngrams=ngrams,
        zipf_png=zipf_png,
    )
    with download_progress(out) as hook:
        report = describe_data(request, progress=hook)
    dataset = report.dataset
    table = Table(title=f"corpus {dataset.path}", show_header=False)
    table.add_row("SHA-1", dataset.sha1)
    data = report.config.data
    table.add_row("preprocess / tokens", f"{data.preprocess} / {data.token}")
    if report.init_from is not None:
        table.add_row("vocabulary of", report.init_from)
    table.add_row("tokens (all)", f"{dataset.total_tokens:,}")
    table.add_row("tokens used (max_tokens)", f"{len(dataset.tokens):,}")
    table.add_row("vocabulary", f"{len(dataset.vocab):,}")
    frequent, counted_over = report.most_frequent(MOST_FREQUENT_SHOWN)
    table.add_row(
        f"most frequent ({counted_over})", ", ".join(f"{token!r} {freq:,}" for token, freq in frequent)
    )
    splits = dataset.splits
    table.add_row("train / val / test", f"{len(splits.train):,} / {len(splits.val):,} / {len(splits.test):,}")
    if report.init_from is not None:
        share = percent(report.unknown / max(1, len(dataset.tokens)))  # as the notes say it
        table.add_row("not in its vocabulary (<unk>)", f"{report.unknown:,} ({share} of the tokens used)")
    table.add_row(
        "minibatches per epoch" if epoch == 1 else f"minibatches in epoch {epoch}",
        f"{report.train_batches:,} ({data.sampling}, batch {data.batch_size} × {data.num_steps} steps)",
    )
    out.print(table)
    if report.ngrams is not None:
        print_line(out, report.ngrams.line(data.token))
    if report.zipf is not None:
        fits = "; ".join(line.said() for line in report.zipf)
        if len(report.zipf) < len(ZIPF_ORDERS):  # a vocabulary too large to key longer n-grams in int64
            fits += f" (no longer n-grams: a vocabulary of {len(dataset.vocab):,} has too many to count)"
        if report.unknown:  # the rare tokens pooled into one: not the text's own curve (rev43)
            share = percent(report.unknown / max(1, len(dataset.tokens)))
            why = (
                "the checkpoint's vocabulary lacks them"
                if report.init_from
                else "data.min_freq 0 counts them"
            )
            fits += f" (the {share} of tokens read as <unk> counted as one token; {why})"
        print_line(out, f"Zipf's law, count ∝ 1/rank^α: {fits}; wrote {zipf}")
    if report.text_head is not None:
        shown = min(text, len(dataset.tokens))
        print_line(out, f"the first {shown:,} tokens, as training reads them: {report.text_head!r}")
    if report.batches is not None:
        for line in view_lines(report.batches, dataset.vocab, data.token):
            print_line(out, line)
    elif report.batches_asked:
        print_line(out, "no minibatch to show: the training split is shorter than one (the note below)")
    for note in (*report.dataset.notes, *report.notes):
        print_note(out, note)
    if report.untrainable is not None:
        print_note(out, f"drnn train would refuse this: {report.untrainable}")
    if json_out:
        emit_json(report.summary())


# ---------------------------------------------------------------------------------------------
# drnn presets


WIDE_PRESETS_TABLE = 120  # columns from which the presets table also shows each preset's measured figure


@app.command("presets", short_help="List the presets --config takes by name, or show one.")
def presets_command(
    name: Annotated[
        str | None,
        typer.Argument(help="A preset to show: its file, comments and all.", show_default=False),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """List the presets --config takes by name: what each is, its model, the figure measured with it.
    With NAME, show that preset's file (where it lies, then its settings and comments), to read a recipe
    beside the code it reproduces.

    Example: drnn presets, then drnn presets lstm2, then drnn train --config lstm2
    """
    out, _ = consoles(json_out)
    if name is not None:
        preset = find_preset(name)
        text = preset.path.read_text(encoding="utf-8")
        if json_out:
            config = load_config(preset.path)  # every setting, the defaults the file leaves out included
            emit_json(
                {"name": preset.name, "path": str(preset.path), "text": text, "config": config.to_dict()}
            )
        else:
            print(f"# {preset.path}\n{text}", end="" if text.endswith("\n") else "\n")
        return
    reports = describe_presets()
    # an 80-column terminal wrapped each description and figure into a dozen lines (156 in all): there
    # the figures are left to --json, and the model goes above its description, which then keeps the
    # width the model's two columns took (eight lines a preset beside a 27-character name: learner32)
    wide = out.width >= WIDE_PRESETS_TABLE
    table = Table(title="presets (drnn train --config NAME)")
    table.add_column("name", no_wrap=True)
    if wide:
        table.add_column("model", no_wrap=True)
        table.add_column("parameters", no_wrap=True, justify="right")
    table.add_column("description, measured" if wide else "model, description")
    for report in reports:
        model = report.config.model
        size = f"{model.cell} {model.num_layers}×{model.hidden_size}"
        if model.embedding_dim:
            size += f" emb {model.embedding_dim}"
        parameters = "—" if report.parameters is None else f"{report.parameters:,}"
        measured = f"measured: {report.preset.measured}" if report.preset.measured else "not measured"
        if wide:
            table.add_row(report.preset.name, size, parameters, f"{report.preset.description}\n{measured}")
        else:
            counted = "" if report.parameters is None else f", {parameters} parameters"
            table.add_row(report.preset.name, f"{size}{counted}\n{report.preset.description}")
    out.print(table)
    if not wide:
        out.print(
            f"the figure measured with each: drnn presets --json, or a terminal {WIDE_PRESETS_TABLE} columns wide",
            soft_wrap=True,
        )
    if any(report.parameters is None for report in reports):
        missing = "—" if wide else "left out"  # the narrow layout writes no "—" (review rev32)
        out.print(
            f"parameters: {missing} where the corpus is not downloaded yet (drnn data --config NAME fetches it)"
        )
    if json_out:
        emit_json({"presets": [report.summary() for report in reports]})


@app.command("runs", short_help="List the runs in a folder: model, progress, best validation.")
def runs_command(
    folder: Annotated[
        Path, typer.Argument(metavar="FOLDER", help="A folder of runs, or one run's directory.")
    ] = Path("runs"),
    sort: Annotated[
        SortRuns,
        typer.Option(
            "--sort",
            help="updated (the newest first), best (the lowest best validation first, each text's runs "
            "apart) or name.",
        ),
    ] = SortRuns.updated,
    json_out: JsonOption = False,
) -> None:
    """List the runs below a folder (default: runs): each one's model and text, how far it trained,
    its best validation perplexity, whether --resume would train on, and when it last wrote.

    Example: drnn runs runs/sweep --sort best, then drnn eval --run runs/sweep/h64
    """
    from drnn_cli.run_list import differing_settings, list_runs
    from drnn_cli.runs_table import runs_table

    out, _ = consoles(json_out)
    runs = list_runs(folder, sort.value)
    differing = differing_settings(runs)
    if not runs:
        shown = terminal_safe(str(folder), keep="")
        out.print(
            f"no runs in {shown} (drnn train --config quick trains one into runs/quick)", soft_wrap=True
        )
    else:
        out.print(runs_table(runs, folder, differing, sort.value, out, wide=out.width >= WIDE_PRESETS_TABLE))
        for run in runs:
            for said in run.notes():
                print_note(out, f"{run.run_dir}: {said}")
    if json_out:
        emit_json({"folder": str(folder.absolute()), "runs": [run.summary(differing) for run in runs]})


# ---------------------------------------------------------------------------------------------
# drnn train


@app.command("train", short_help="Train a model into a run directory.")
def train_command(
    config: Annotated[str, typer.Option("--config", "-c", metavar="FILE_OR_PRESET", help=CONFIG_HELP)],
    set_: SetOption = None,
    run: Annotated[
        Path | None, typer.Option("--run", metavar="DIR", help="Run directory (default: runs/<config stem>).")
    ] = None,
    device: Annotated[
        Device | None, typer.Option("--device", help="auto, cpu or cuda (overrides train.device).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")
    ] = False,
    init_from: InitFromOption = None,
    max_unknown: MaxUnknownOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run in the run directory.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Train a model and keep its run directory (config, vocabulary, checkpoints, metrics, plot).

    Example: drnn train --config lstm2.yaml --set train.epochs=5
    """
    from drnn_cli.train_session import TrainRequest, train_run

    out, _ = consoles(json_out)
    found = find_config(config)
    request = TrainRequest(
        config_path=found,
        config_note=config_source_note(config, found),  # said with the start's notes
        overrides=tuple(set_ or ()),
        run_dir=run,
        device=device.value if device is not None else None,
        resume=resume,
        init_from=init_from,
        max_unknown_fraction=max_unknown,
        overwrite=overwrite,
    )
    is_main = launched_rank() == 0
    if not is_main:  # under torchrun only rank 0 talks
        out = Console(quiet=True)
    reporter = RichReporter(out)
    with download_progress(out) as hook:
        try:
            result = train_run(request, reporter=reporter, progress=hook)
        except TrainingInterrupted as stop:
            ignore_further_signals()  # the stop and its checkpoint stand: what is left is to say so
            # a script still learns where the run stopped (its exit code says it did); not to a stdout
            # whose reader is gone (SIGPIPE)
            if json_out and is_main and stop.stopped.signal != "SIGPIPE":
                emit_json(stop.stopped.summary())
            raise
        except Signalled as again:
            ignore_further_signals()  # pressed twice: a third press must not cut its report short either
            # pressed twice: where the run stands all the same, at its last checkpoint on disk (or none)
            if json_out and is_main and again.stopped is not None:
                emit_json(again.stopped.summary())
            raise
        finally:
            reporter.finish()
    if not is_main:
        return
    table = Table(title=f"run {result.run_dir}", show_header=False)
    table.add_row(
        "epochs",
        f"{result.start_epoch:g} → {result.epochs:g}" + (" (early stop)" if result.stopped_early else ""),
    )
    table.add_row("steps / stopped by", f"{result.steps:,} / {result.stop_reason}")
    window = result.train_ppl_steps
    over = f" (last {window:,} step{'' if window == 1 else 's'})" if window else ""
    # read otherwise than validation reads its split, where it is: said in the label, whose column the
    # longest label below sets, so that the table keeps to 80 columns
    trained_as = f" ({result.train_ppl_as})" if result.train_ppl_as else ""
    table.add_row(f"train perplexity{trained_as}", format_perplexity(result.train_ppl, 3) + over)
    # a figure --json reports is shown: a resume that changed train.eval_tokens and trained nothing has a
    # last validation and no best yet (its best starts over), and showed neither (verify33)
    if result.val_ppl is not None or result.best_val_ppl is not None:
        validations = [result.val_ppl, result.best_val_ppl]
        if result.start_val_ppl is not None:  # fine-tuning: the starting weights', before any step
            validations.insert(0, result.start_val_ppl)
        table.add_row(
            f"validation perplexity ({'start / ' if len(validations) == 3 else ''}last / best)",
            " / ".join("—" if ppl is None else format_perplexity(ppl, 3) for ppl in validations)
            + ("" if result.best_at is None else f" ({result.best_at})"),
        )
        read, split = result.val_tokens, result.val_split_tokens
        if read is not None and split is not None and read < split:  # said where the figures are read
            table.add_row("validated on the first", f"{read:,} of {split:,} tokens")  # within 80 columns
    speed = "nothing trained" if result.tokens_per_s is None else f"{result.tokens_per_s:.1f} tokens/sec"
    # the last epoch's (or the epoch so far, where a stop cut it), as d2l reports: not the run's mean
    # a budget or a signal stopped it inside an epoch, after steps of this session
    within = result.tokens_per_s is not None and result.epochs != int(result.epochs)
    table.add_row(
        f"tokens/s ({'this epoch so far' if within else 'last epoch'})",
        "—" if result.tokens_per_s is None else f"{result.tokens_per_s:,.1f}",
    )
    if result.seconds is not None:  # tokens/s counts the steps alone; train.max_time all of it
        spent = result.seconds
        table.add_row("time (this session)", f"{spent.session:,.1f} s")
        table.add_row(
            "training / validating / checkpoints / rest",
            " / ".join(
                f"{part:,.1f} s" for part in (spent.training, spent.validating, spent.checkpoints, spent.rest)
            ),
        )
    threads = "" if result.threads is None else f", {plural(result.threads, 'thread')}"
    processes = f"{result.world_size:,} process{'' if result.world_size == 1 else 'es'}"
    table.add_row("device", f"{result.device}{threads}, {processes}")
    out.print(table)
    # d2l's figure, which a learner looks for and the log never named (learner34)
    plot = RunFiles(result.run_dir).plot
    if plot.is_file():
        out.print(f"plot: {plot} (perplexity against tokens seen, redrawn while training)", soft_wrap=True)
    # train.keep_every's checkpoints, for --checkpoint (a line of its own: the table keeps to 80 columns)
    if result.kept:
        names = [path.name for path in result.kept]
        shown = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
        out.print(
            f"kept: {plural(len(names), 'checkpoint')} in {result.run_dir / 'kept'}/ ({shown})",
            soft_wrap=True,
        )
    # d2l's line, whole whatever COLUMNS says: scripts grep it
    out.print(
        f"perplexity {format_perplexity(result.train_ppl, 1)}, {speed} on {result.device}", soft_wrap=True
    )
    for text in result.samples.values():
        print_generated(out, text)
    for note in result.samples_notes:
        print_note(out, note)
    if json_out:
        emit_json(result.summary())


# ---------------------------------------------------------------------------------------------
# drnn predict


@app.command("predict", short_help="Continue prefixes with a trained model.")
def predict_command(
    prefixes: Annotated[
        list[str],
        typer.Argument(help="One or more prefixes to continue.", show_default=False, metavar="PREFIX"),
    ],
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    num_chars: Annotated[
        int, typer.Option("--num-chars", "-n", metavar="N", help="Tokens to generate after the prefix.")
    ] = 50,
    sample: Annotated[
        bool, typer.Option("--sample", help="Sample instead of taking the most likely token.")
    ] = False,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", metavar="T", help="Sampling temperature (1e-6 to 1000; default 1)."),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", metavar="K", help="Sample only among the K most likely tokens.")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", metavar="P", help="Sample from the smallest set with mass ≥ P.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", metavar="S", help="Make sampling reproducible.")
    ] = None,
    device: DeviceOption = Device.auto,
    json_out: JsonOption = False,
) -> None:
    """Continue prefixes with the latest run's best checkpoint, its last where the run has no validation
    split (greedy by default, as d2l's predict_ch8).

    Example: drnn predict "time traveller" "the machine" -n 100 --sample --temperature 0.8 --seed 1
    """
    from drnn_cli.commands import Continuation, decode_options, load_model, plan_predict, predict_all

    options, seed_drawn = decode_options(num_chars, sample, temperature, top_k, top_p, seed)
    loaded = load_model(run, checkpoint, device.value)
    plan = plan_predict(loaded, prefixes, options, seed_drawn)
    shown, notes = consoles(json_out)
    print_line(notes, f"checkpoint {plan.checkpoint}")  # which run answers, on stderr
    for note in plan.notes:
        print_note(notes, note)
    stream = not json_out and sys.stdout.isatty()

    def on_token(piece: str) -> None:
        """First the prefix as the model saw it, then each new token as it is generated."""
        sys.stdout.write(terminal_safe(piece))  # streaming: stdout is a terminal
        sys.stdout.flush()

    def on_continuation(index: int, continuation: Continuation) -> None:
        # On a terminal a continuation over several lines ends with a blank line, before the next one
        # starts: where one ends is otherwise unclear. Piped output stays exactly what was generated.
        apart = "\n" in continuation.text and index + 1 < len(prefixes)
        if stream:
            sys.stdout.write("\n\n" if apart else "\n")
        else:
            print_generated(shown, continuation.text + ("\n" if apart and shown.is_terminal else ""))

    report = predict_all(plan, on_token if stream else None, on_continuation)
    for note in report.blank_notes:
        print_note(notes, note)
    if json_out:
        emit_json(report.summary())


# ---------------------------------------------------------------------------------------------
# drnn eval


@app.command("eval", short_help="Perplexity of a checkpoint on a split or a text.")
def eval_command(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    split: Annotated[
        Split | None,
        typer.Option("--split", help="train, val or test (default: val if the run has one, else train)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", metavar="FILE", help="Evaluate on this text file instead of a split."),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            "--corpus",
            metavar="FILE",
            help="Where the run's corpus is now, if it moved (another machine): its splits are read "
            "from this file once its SHA-1 shows it is the same text.",
        ),
    ] = None,
    rows: Annotated[
        int | None,
        typer.Option(
            "--rows",
            metavar="N",
            min=1,
            help="Parallel rows the text is read in, each from a zero state (default: the run's "
            "data.batch_size; 1 = one continuous stream, as drnn inspect reads it).",
        ),
    ] = None,
    splits_of: Annotated[
        Path | None,
        typer.Option(
            "--splits-of",
            metavar="RUN_OR_CHECKPOINT",
            help="Read the split of that run's text, as it cuts it (its rows too): a base model on its "
            "fine-tuned run's test split. The vocabularies must be the same.",
        ),
    ] = None,
    device: DeviceOption = Device.auto,
    json_out: JsonOption = False,
) -> None:
    """Perplexity and bits per token of a checkpoint, over every token of a split or a file exactly once.

    Perplexity is exp(the mean cross-entropy in nats) over the tokens predicted: 1 is a model that is
    always sure and right, the vocabulary's size one that guesses uniformly (d2l 0.17.6 §8.4).

    Example: drnn eval --run runs/lstm2 --split val --json
    """
    from drnn_cli.commands import check_eval_source, evaluate_split, load_model
    from drnn_cli.report import training_position

    split_name = split.value if split is not None else None
    check_eval_source(split_name, data, corpus, splits_of)  # before the model loads: evaluate_split does too
    out, notes = consoles(json_out)
    loaded = load_model(run, checkpoint, device.value)
    with evaluation_progress(notes) as hook:  # on stderr: stdout keeps the result alone
        report = evaluate_split(loaded, split_name, data, rows, corpus, hook, splits_of)
    # a word text may write <unk> itself (Penn Treebank does): those are no lack of the vocabulary's
    lacking = "" if loaded.checkpoint.config.data.token == "word" else "not in the vocabulary, "
    result = report.result
    unknown = f" ({plural(result.unknown, 'token')} {lacking}scored as <unk>)" if result.unknown else ""
    known = result.tokens - result.unknown
    # a model that never saw <unk> spends many bits on each: the rest's figure beside the whole's
    over_known = (
        f"; {format_perplexity(result.known_perplexity, 4)} over the {known:,} other than <unk>"
        if known and result.unknown
        else ""
    )
    print_line(
        out,
        f"{report.source}{unknown}: perplexity {format_perplexity(result.perplexity, 4)}, {result.bits_per_token:.4f} bits/token "
        # the split's tokens after its first: its 1,000 tokens are 999 predictions (own40)
        f"over {plural(result.tokens, 'predicted token')}{over_known} (checkpoint {loaded.path}, "
        f"{training_position(report.epoch, report.step_in_epoch, report.step)})",
    )
    for note in report.notes:  # on stderr, as predict's: a script reading the result gets that line alone
        print_note(notes, note)
    if json_out:
        emit_json(report.summary())


# ---------------------------------------------------------------------------------------------
# drnn inspect


@app.command("inspect", short_help="See what the network learned, character by character.")
def inspect_command(
    text: Annotated[
        str | None,
        typer.Argument(
            help="Text to read (preprocessed like a predict prefix).", show_default=False, metavar="TEXT"
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            metavar="FILE",
            help="Read this text file instead (preprocessed like eval --data); - reads standard input.",
        ),
    ] = None,
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    layer: Annotated[
        int | None,
        typer.Option("--layer", metavar="L", help="Layer to show, 1 = bottom (default: the top one)."),
    ] = None,
    units: Annotated[
        str | None,
        typer.Option(
            "--units", metavar="U,U,...", help="Units to show, e.g. 3,17 (0-based; instead of --top)."
        ),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            metavar="K",
            help="Show the K units that follow a text property best (|Pearson r|): position in word, "
            "at a space, position in line, inside quotes, inside brackets; the best unit of each property "
            "in turn (|r| ≥ 0.2), then by variance. Default 5.",
        ),
    ] = None,
    signal: Annotated[
        Signal, typer.Option("--signal", help="hidden, or cell (LSTM cell state).")
    ] = Signal.hidden,
    html_out: Annotated[
        Path | None, typer.Option("--html", metavar="OUT.html", help="Write a self-contained page here.")
    ] = None,
    png_out: Annotated[
        Path | None,
        typer.Option(
            "--png",
            metavar="OUT.png",
            help="Write surprisal and the units as a heatmap, and gate-saturation histograms (needs matplotlib).",
        ),
    ] = None,
    device: DeviceOption = Device.auto,
    json_out: JsonOption = False,
) -> None:
    """See what the network learned: per-character activations, gates, surprisal and next-character guesses.

    Example: drnn inspect "the time traveller" --top 5 --html inspect.html --png inspect.png
    """
    from drnn_cli.commands import InspectOutputs, inspect, load_model
    from drnn_cli.introspect import NOT_ABOVE_UNTRAINED, InspectRequest, follows_label, parse_units

    outputs = InspectOutputs.checked(html_out, png_out)
    request = InspectRequest(text, file, layer, parse_units(units), top, signal.value)
    out, notes = consoles(json_out)  # notes on stderr, as predict and eval say theirs
    loaded = load_model(run, checkpoint, device.value)
    report = inspect(loaded, request, outputs)
    result = report.inspection
    unknown = result.scored_unknown
    scored_as_unk = f" ({unknown:,} not in the vocabulary, scored as <unk>)" if unknown else ""
    print_line(
        out,
        f"{plural(result.tokens, 'predicted character')}{scored_as_unk}: perplexity {format_perplexity(result.perplexity, 4)}, "
        f"{result.bits_per_char:.4f} bits/char (checkpoint {loaded.path}, layer {result.layer} {result.signal})",
    )
    # a unit no closer to its property than the untrained layer's best is marked between the two figures
    marked = [result.above_untrained(score) is False for score in result.units]
    columns = ("unit", "follows", "r", *([""] if any(marked) else []), "untrained")
    table = Table(show_header=True)
    for column in columns:
        table.add_column(column, justify="left" if column in ("follows", "") else "right")
    for score, not_above in zip(result.units, marked, strict=True):
        untrained = result.untrained.get(score.feature or "")
        table.add_row(
            str(score.unit),
            follows_label(score),
            f"{score.correlation:+.3f}",
            *([NOT_ABOVE_UNTRAINED if not_above else ""] if any(marked) else []),
            "" if untrained is None else f"{abs(untrained):.3f}",
        )
    out.print(table)
    if result.untrained:
        print_line(
            out,
            "untrained: the largest |r| any unit of the layer has with the property in a network of this "
            f"shape before any training (as train.seed {loaded.checkpoint.config.train.seed} initialises it): "
            "an |r| well above it was learned",
        )
    if result.untrained_verdict is not None:
        print_line(out, result.untrained_verdict)
    for index, gates in enumerate(result.saturation, start=1):
        if gates:
            shares = ", ".join(
                f"{name} {sat.left.mean():.0%} < 0.1 / {sat.right.mean():.0%} > 0.9"
                for name, sat in gates.items()
            )
            out.print(f"layer {index} gates saturated: {shares}", soft_wrap=True)
    for written in report.written:
        print_line(out, f"wrote {written}")
    if html_out is None and png_out is None and not json_out:  # the table is a summary of the page
        gated = " gates," if any(result.saturation) else ""  # an RNN has none
        print_line(
            out, f"each character's activations,{gated} surprisal and next-character guesses: --html FILE"
        )
    for note in report.notes:
        print_note(notes, note)
    missing_glyphs = report.missing_glyphs
    if missing_glyphs:
        shown = " ".join(missing_glyphs[:20]) + (" …" if len(missing_glyphs) > 20 else "")
        print_note(
            notes,
            f"the PNG's font has no glyph for {plural(len(missing_glyphs), 'character')} of the text "
            f"(drawn as boxes on its axis; the --html page shows them): {shown}",
        )
    if json_out:
        emit_json(result.summary())


# ---------------------------------------------------------------------------------------------
# Entry point


# How long a torchrun worker whose peer is gone waits for a signal of its own before it says so: a
# SIGTERM to the whole job reached one rank a moment before the other, which then blamed a failure
PEER_SIGNAL_WAIT_S = 0.5


def _await_own_signal() -> None:
    """Give a signal on its way to this process the time to arrive (its handler raises)."""
    time.sleep(PEER_SIGNAL_WAIT_S)


def _await_local_rank_0() -> None:
    """Give the node's local rank 0 the time to say the same error and exit: torchrun's signal then
    arrives (its handler raises) (:mod:`drnn_cli.rank_errors`)."""
    time.sleep(PEER_ERROR_WAIT_S)


def _interrupted_line(signalled: Signalled) -> str:
    """The line for a signal outside the training loop; torchrun ends every process with SIGTERM when one
    of them fails, whose own line then says why."""
    launcher = TORCHRUN_ENV in os.environ and signalled.name == "SIGTERM"
    return (
        f"drnn: interrupted ({signalled.name})"
        + (" (torchrun's, if another process of the job failed)" if launcher else "")
        + (f": {signalled.after}" if signalled.after else "")
    )


# The options that take a path, and what each takes: an empty one ("--html ''") reaches drnn as Path(""),
# the current directory
PATH_OPTIONS = {
    "--run": "a run directory, e.g. --run runs/NAME",
    "--checkpoint": "a checkpoint file, e.g. --checkpoint runs/NAME/best.safetensors",
    "--data": "a text file",
    "--corpus": "a text file",
    "--splits-of": "a run directory or checkpoint",
    "--init-from": "a run directory or checkpoint",
    "--file": "a text file, or - for standard input",
    "--html": "a file to write, e.g. --html inspect.html",
    "--png": "a file to write, e.g. --png inspect.png",
    "--zipf": "a file to write, e.g. --zipf zipf.png",
}


def _refuse_empty_paths(args: list[str]) -> None:
    """Refuse a path option given an empty value, which the parser reads as "." (red41: "--html . is a
    directory", for a name the user had left empty)."""
    for index, arg in enumerate(args):
        if arg == "--":  # what follows is positional
            return
        flag, equals, value = arg.partition("=")
        empty = not value if equals else index + 1 < len(args) and args[index + 1] == ""
        if flag in PATH_OPTIONS and empty:
            raise UsageError(
                f"{flag} is empty; give it {PATH_OPTIONS[flag]} (an empty one would read as the current directory)"
            )


def main(argv: list[str] | None = None) -> None:
    """Run the app; turn every failure into one line on stderr and an exit code.

    SIGINT/SIGTERM are handled from the first line (the torch import included): outside the training
    loop, which checkpoints first, they end the command with one line and exit 130 / 143. A closed
    stdout (``drnn train | head -1``) is a SIGPIPE: training checkpoints and stops, others exit 141.
    """
    _, errors = consoles(json_mode=False)
    args = sys.argv[1:] if argv is None else argv
    # the README's DRNN_DEBUG=1, or --debug among the options before the command: read here too, since a
    # failure while Typer builds or parses the command comes before its callback sets it
    leading = itertools.takewhile(lambda arg: arg.startswith("-"), args)
    session = Session(debug=bool(os.environ.get("DRNN_DEBUG")) or "--debug" in leading)
    with exit_on_signals() as signals, guard_output():
        try:
            _refuse_empty_paths(args)
            app(args=argv, prog_name="drnn", standalone_mode=False, obj=session)
            if signals.first is not None:  # a stop signal a library swallowed: the command was asked to stop
                raise signals.first
        except DrnnError as error:
            if session.debug and error.__cause__ is not None:  # a library failure drnn put in one line
                traceback.print_exception(error.__cause__)
            # every torchrun process stops at the same step with the same line: rank 0 says it
            if not (isinstance(error, TrainingInterrupted) and launched_rank() != 0):
                _say_error(errors, f"drnn: {error.heading}{rank_origin()}{error}")
            sys.exit(error.exit_code)
        except typer.Exit as done:
            sys.exit(done.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            _say(errors, "drnn: interrupted (SIGINT)")
            sys.exit(130)
        except Signalled as signalled:
            if not (signalled.quiet and signalled.after is None):  # a closed stdout: silent, unless a
                _say_signal(errors, signalled)  # training says what its run directory holds
            sys.exit(signalled.exit_code)
        except OSError as error:
            # An OS refusal the user can fix (permissions, full disk, a path that is a file): one line.
            if error.filename:
                said = f"cannot access {error.filename}: {error.strerror or error}"
            # drnn's own writes name their files (files.py, checkpoints, caches), so a full disk that names
            # none is the output it prints: true of every write path today, to keep true of new ones
            elif error.errno in OUTPUT_ERRNOS:
                said = (
                    f"cannot write the command's output (standard output or error): {error.strerror or error}; "
                    "send it where there is room"
                )
            else:
                said = str(error.strerror or error)
            _say_error(errors, f"drnn: error: {rank_origin()}{said}")
            sys.exit(1)
        except Exception as error:
            if signals.first is not None:  # a failure after a stop signal is that signal's doing (red42:
                if session.debug:  # numpy's import cut short, imported again: ImportError)
                    traceback.print_exc()
                if isinstance(error, PeerGone):
                    signals.first.after = signals.first.after or error.after
                _say_signal(errors, signals.first)
                sys.exit(signals.first.exit_code)
            # A library failure that is the user's to fix, as its one line, and whether this process's
            # own signal may be on its way: torchrun signals every process of a job, and this one's may
            # come just after its peer left. A size computed wrongly is a bug that reads as one too:
            # --debug shows the traceback of either.
            for line, signal_may_follow in (
                (peer_gone_message(error, in_process_group()), True),
                (out_of_memory_message(error), False),
            ):
                if line is None:
                    continue
                if session.debug:
                    traceback.print_exc()
                after = error.after if isinstance(error, PeerGone) else None  # where the run stands
                if signal_may_follow:
                    try:
                        _await_own_signal()
                    except Signalled as signalled:
                        signalled.after = signalled.after or after
                        _say_signal(errors, signalled)
                        sys.exit(signalled.exit_code)
                _say_error(errors, f"drnn: error: {rank_origin()}{line}" + (f"; {after}" if after else ""))
                sys.exit(1)
            if _is_usage_error(error):
                _report_usage_error(error, errors, args)
            # anything else is a bug: still one line, unless asked for the traceback
            if session.debug:
                traceback.print_exc()
            _say_error(
                errors,
                f"drnn: internal error: {rank_origin()}{type(error).__name__}: "
                f"{' '.join(str(error).split())[:500]} (rerun with drnn --debug ... for the traceback)",
            )
            sys.exit(1)


def program() -> None:
    """The ``drnn`` command and ``python -m drnn_cli``: :func:`main`, then the process exit
    (:func:`~drnn_cli.signals.exit_process`: a torchrun worker must not wait for the interpreter's)."""
    exit_process(main)


def _say(errors: Console, line: str) -> None:
    """The one stderr line; a closed stderr (``drnn ... 2>&1 | head -1``) must not turn it into a traceback."""
    with contextlib.suppress(OSError, Signalled):
        errors.print(line, soft_wrap=True)


def _say_signal(errors: Console, signalled: Signalled) -> None:
    """The line of a signal that ended the command outside the training loop, but from a torchrun
    worker other than its node's local rank 0: the same signal reached that one (a Ctrl-C, a scheduler's
    SIGTERM), which says it, or that one failed first, torchrun signalled the rest, and its error is the
    line that says why (:mod:`drnn_cli.rank_errors`). A training's own news (``after``) is said."""
    if waits_before_saying() and signalled.after is None:
        return
    _say(errors, _interrupted_line(signalled))


def _say_error(errors: Console, line: str) -> None:
    """An error's one line, once for a torchrun job whose processes all meet it: a worker other than its
    node's local rank 0 waits for torchrun's signal first, and stays quiet when it comes (local rank 0
    said the line and exited); else says it, the line naming its rank (:mod:`drnn_cli.rank_errors`)."""
    if waits_before_saying():
        try:
            _await_local_rank_0()
        except Signalled:
            return  # its exit code still says it failed
    _say(errors, line)


def _is_usage_error(error: Exception) -> bool:
    """Typer's (vendored or external) click usage errors: they carry a message and an exit code."""
    return hasattr(error, "format_message") and hasattr(error, "exit_code")


def _set_split_in_two(argv: list[str]) -> str | None:
    """``KEY=VALUE`` for the first ``--set KEY VALUE`` (or ``--set=KEY VALUE``: a space for the ``=``)
    in ``argv``, if any; a VALUE may be a negative number (``data.max_tokens -1``), not an option."""
    for index, arg in enumerate(argv):
        if arg in ("--set", "-s"):
            key, after = (argv[index + 1] if index + 1 < len(argv) else "="), index + 2
        elif arg.startswith("--set="):
            key, after = arg.partition("=")[2], index + 1
        else:
            continue
        value = argv[after] if after < len(argv) else "-"
        if "=" not in key and (not value.startswith("-") or _is_number(value)):
            return f"{key}={value}"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _report_usage_error(error: Any, errors: Console, argv: list[str]) -> None:
    if type(error).__name__ == "NoArgsIsHelpError":
        sys.stdout.write(error.format_message().rstrip() + "\n")
        sys.exit(0)
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        command = ctx.command_path
    else:  # the parser refused an option before the command's context existed: the command is in argv
        names = {info.name for info in app.registered_commands}
        command = " ".join(["drnn", *[arg for arg in argv if arg in names][:1]])
    # Typer validates enum choices through pydantic-style messages: drop their "Value error, " prefix.
    message = " ".join(error.format_message().split()).replace(": Value error, ", ": ")
    if (
        type(error).__name__ == "MissingParameter"
        and getattr(getattr(error, "param", None), "name", "") == "config"
    ):
        message = (
            message.rstrip(".") + ": a preset (drnn presets lists them: quick, lstm2, ...) or a YAML file"
        )
    split = _set_split_in_two(argv)
    if type(error).__name__ in ("UsageError", "NoSuchOption") and split is not None:  # extra argument, -1
        message = message.rstrip(".") + f": --set takes KEY=VALUE as one argument, e.g. --set {split}"
    _say_error(errors, f"drnn: error: {rank_origin()}{message} (see {command} --help)")
    sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
