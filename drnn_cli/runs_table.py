"""``drnn runs``'s table: each run's name, model and text, progress and state, best validation and
when it last wrote, laid out to fit the terminal: 80 columns, or a column each on a wide one."""

from __future__ import annotations

import itertools
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from drnn_cli.render import format_perplexity
from drnn_cli.run_list import RunSummary, as_set, star_elsewhere
from drnn_cli.shown_text import terminal_safe

FOLD_FLOOR = 10  # the narrowest a folding column (a long name or text) is made, in cells
DIFFERENCES_SHOWN = 3  # drnn runs: at most this many settings the runs differ in are shown (--json: all)


def runs_table(
    runs: list[RunSummary], folder: Path, differing: list[str], order: str, console: Console, wide: bool
) -> Table:
    """The first layout that fits ``console``: names and texts whole; a long text's name folded; names
    folded too; at each, on a wide terminal, a column each first, then the 80-column table (whole
    names in it read better than folded ones in more columns). Where none fits, the last is left to
    rich (which narrows every column alike, cropping some)."""
    layouts = [
        (own_columns, names, texts)
        for names, texts in ((True, True), (True, False), (False, False))
        for own_columns in ((True, False) if wide else (False,))
    ]
    for own_columns, names_whole, texts_whole in layouts:
        table, rows = _table(runs, folder, own_columns, differing, order, names_whole, texts_whole)
        if _fit(table, rows, console.width):
            break
    return table


def _latest_caption(folder: Path) -> str:
    """What the star says: the run predict and eval use here, or where another folder's marker names it."""
    marker = star_elsewhere(folder)
    if marker is None:
        return "★ latest: the run predict and eval use without --run"
    shown = terminal_safe(str(marker), keep="")
    return (
        f"★ latest: the run {shown} names; predict and eval without --run read runs/latest where they start"
    )


def _fit(table: Table, rows: list[list[str]], width: int) -> bool:
    """Sets each column's width so that the table is at most ``width`` cells wide, or says it cannot be.
    A column kept whole needs its widest line, one that folds FOLD_FLOOR cells (or its widest line), any
    other its longest word; from their widest lines, the widest column above its need gives a cell at a
    time. (rich's own narrowing measures a whole column by its longest word and takes from every column
    alike: a name folded mid-token where a layout fitted, and a state column shrank to nothing.)"""
    columns = [
        [str(column.header), *(row[index] for row in rows)] for index, column in enumerate(table.columns)
    ]
    lines = [[line for cell in cells for line in cell.splitlines()] or [""] for cells in columns]
    widest = [max(cell_len(line) for line in column_lines) for column_lines in lines]
    needs = []
    for column, column_lines, most in zip(table.columns, lines, widest, strict=True):
        if column.no_wrap:
            needs.append(most)
        elif column.overflow == "fold":
            needs.append(min(most, FOLD_FLOOR))
        else:
            needs.append(max((cell_len(word) for line in column_lines for word in line.split()), default=1))
    room = width - (3 * len(table.columns) + 1)  # each column's padding and border, and the last border
    if sum(needs) > room:
        return False
    widths = list(widest)
    while sum(widths) > room:
        give = max(
            (index for index in range(len(widths)) if widths[index] > needs[index]), key=widths.__getitem__
        )
        widths[give] -= 1
    for column, cells in zip(table.columns, widths, strict=True):
        column.width = cells
    return True


def _table(
    runs: list[RunSummary],
    folder: Path,
    wide: bool,
    differing: list[str],
    order: str,
    names_whole: bool,
    texts_whole: bool,
) -> tuple[Table, list[list[str]]]:
    """``drnn runs``'s table. 80 columns hold the run, its model over its text, its progress over its
    state, its best validation and when it last wrote; on a wide terminal (the caller's ``wide``)
    each has its own column, with the training time and the holder of a training's lock.
    Where the runs differ in at most DIFFERENCES_SHOWN other settings (a sweep's), each run's are written
    under its name, or in their own column, as ``--set`` takes them; where in more, a caption counts them.
    ``names_whole`` keeps names (and the settings under them) whole; ``texts_whole`` keeps
    each line of the text (and the wide table's settings) whole: rich narrows the widest columns alike,
    and "timemachine.txt" folded beside a whole name. The caller drops them where the table cannot fit."""
    # a sweep's few varied settings say what each run is; two presets' dozens would bury the table
    shown = differing if len(differing) <= DIFFERENCES_SHOWN else []
    captions = [_latest_caption(folder)] if any(r.latest for r in runs) else []
    if differing and not shown:
        captions.append(f"the runs differ in {len(differing)} other settings (drnn runs --json: differs)")
    # --sort best: list_runs keeps each text's runs together (those that cannot be read last, of no text);
    # a rule under each text's last
    texts_end = [
        order == "best" and later.scored_on is not None and later.scored_on != run.scored_on
        for run, later in itertools.pairwise(runs)
    ] + [False]
    if any(texts_end):
        captions.append(
            f"ranked apart: {texts_end.count(True) + 1} texts or splits, whose perplexities do not compare"
        )
    if order == "best" and any(run.best_val_ppl is None and run.train_ppl is not None for run in runs):
        # d2l's recipes validate on nothing: their order is how well each memorised (learner41)
        captions.append(
            "runs without a validation split rank by training perplexity: how well each memorised its "
            "text, not how it reads text it never saw (data.val_fraction holds some out)"
        )
    ordered = {"updated": "the newest first", "best": "the best first", "name": "by name"}[order]
    title = f"runs in {terminal_safe(str(folder), keep='')}, {ordered}"
    table = Table(title=title, caption="\n".join(captions) or None)
    # names stay whole where the table fits with them; a long one (an absolute path) folds. At 80
    # columns a run's settings are written under its name, which they name too ("train.lr=0.5"), and
    # stay whole with it: under its text, beside a name kept whole, "train.max_time=600" folded mid-token
    table.add_column("run", overflow="fold", no_wrap=names_whole)
    if wide:
        # a column each, each figure on its line: a wrapped "lstm 3×256 emb 64" or "300/300 steps" read
        # worse than the 80-column table, which is taken where these do not fit (prac39)
        table.add_column("model", no_wrap=True)
        table.add_column("text", overflow="fold", no_wrap=texts_whole)
        table.add_column("trained", justify="right", no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
    else:
        table.add_column("model, text", overflow="fold", no_wrap=texts_whole)  # settings: under names
        table.add_column("trained, state", justify="right", overflow="fold")
    table.add_column("best val", justify="right", no_wrap=True)
    if wide:
        table.add_column("state", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    if wide and shown:
        table.add_column("settings", overflow="fold", no_wrap=texts_whole)
    rows: list[list[str]] = []
    for run in runs:
        best = run.best_val_ppl
        # one line each (a newline in a name must not forge a row's "★ latest" line)
        text = terminal_safe(run.text(), keep="")
        tuned = terminal_safe(run.tuned_from(), keep="")  # a fine-tuned run's base, under its text
        differs = [terminal_safe(as_set(key, value), keep="") for key, value in run.differs(shown).items()]
        # the mark under the name, in the row's second line: beside it, it made the column wider
        name = terminal_safe(str(run.run_dir), keep="")
        if not names_whole and "/" in name.strip("/"):  # folded at its last folder, not mid-word (learner41)
            parent, _, base = name.rstrip("/").rpartition("/")
            name = f"{parent}/\n{base}"
        name += (" ★" if wide else "\n★ latest") if run.latest else ""
        if not wide:
            name = "\n".join([name, *differs])
        shown_best = format_perplexity(best, 4) if best is not None else _no_best(run)
        sample = run.sampled_validation()
        if best is not None and sample is not None:  # not the figure drnn eval --split val prints
            shown_best += f"\nfirst {sample:,}"
        if wide:
            cells = [
                name,
                run.model(),
                "\n".join(filter(None, [text, tuned])),
                run.trained(),
                run.training_time(),
                shown_best,
                run.shown_state(),
            ]
        else:
            model = "\n".join(filter(None, [run.model(), text, tuned]))
            cells = [
                name,
                model,
                "\n".join(filter(None, [run.trained(), run.shown_state(holder=False)])),
                shown_best,
            ]
        cells.append(run.updated_at(short=not wide))
        rows.append([*cells, *(["\n".join(differs)] if wide and shown else [])])
    for row, text_ends in zip(rows, texts_end, strict=True):
        table.add_row(*row, end_section=text_ends)
    return table, rows


def _no_best(run: RunSummary) -> str:
    """What the best column says of a run without a figure: ``—`` where it has no validation split
    (over its last training perplexity, the figure d2l's recipes end at: learner39 found a folder of
    them all ``—``), ``not yet`` where it has one that has not been read, blank where nothing is known
    (a note says why)."""
    if run.info is None or run.problem is not None:
        return ""
    if run.info.config.data.val_fraction > 0:
        return "not yet"
    if run.train_ppl is None:
        return "—"
    return f"—\ntrain {format_perplexity(run.train_ppl, 3 if run.train_ppl < 100 else 1)}"
