"""One exit path for signals and a closed stdout, installed before anything heavy is imported.

Outside the training loop (which installs its own handlers so that it can write a checkpoint first),
SIGINT and SIGTERM raise :class:`Signalled`, which the CLI turns into one line and exit 128 + signal.
Writing to a closed stdout or stderr (``drnn train ... | head -1``) sends further output to /dev/null and, once,
raises SIGPIPE for the training loop's handler (training stops like on SIGTERM, with a checkpoint) or,
outside it, :class:`Signalled` (other commands exit 141 without a word, as Unix tools do; a training
that had not reached its loop says what its run directory holds).

A SIGPIPE counts only when drnn's own output lost its reader. The kernel raises one in any thread that
writes to a pipe or socket whose reader left (a server thread, a process group's socket): Python
ignores those by default, and so does drnn while its handlers are installed.

SIGHUP (the terminal closed, an ssh connection dropped) is handled as SIGTERM is (exit 129), unless it
was ignored when drnn started (``nohup drnn train ...``: the user asked the process to outlive its
terminal). The terminal that hung up fails every later write with EIO: the guard sends what follows to
/dev/null, as for a reader that left, so that neither the checkpoint nor the stop's exit code is lost.

A stop must reach its checkpoint whatever stdout is doing: a write that blocks because its reader does
not read (``drnn train | less``, a stalled ``tee``) is retried by Python after the handler has only
noted the signal (PEP 475), and the loop never got to its checkpoint. Once a stop is noted, a guarded
write the main thread is blocked in, whose reader has taken nothing for a tick of a timer
(:data:`CUT_AFTER_S`), is cut short (:class:`_WriteCut`), and that stream discards what follows; a reader
that is slow but reading gets everything. The training's progress bar is redrawn by the main thread
alone (render.py), so no other thread's write can hold the run at its end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # imported here before anything heavy: the type alone
    from drnn_cli.errors import StoppedRun

HANDLED = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE") if hasattr(signal, name)
)
# the stops drnn ignores once its outcome stands (Ctrl-C, a scheduler's SIGTERM, a terminal's SIGHUP)
_STOPS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# once a stop is noted, how long a guarded write may stay blocked before it is cut (checked this often)
CUT_AFTER_S = 1.0
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def in_process_group() -> bool:
    """Whether this process was started as one of a job's (torchrun, or WORLD_SIZE > 1 by hand)."""
    try:
        return TORCHRUN_ENV in os.environ or int(os.environ.get("WORLD_SIZE") or "1") > 1
    except ValueError:  # not a launcher's: init_distributed names the variable in its one line
        return False


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it in the environment (0 when run alone, whatever a stray
    ``RANK`` says: a plain ``RANK=1 drnn train`` trained in silence, taking itself for a worker)."""
    return _launcher_number("RANK") if in_process_group() else 0


def launched_local_rank() -> int:
    """This process's rank on its node as ``torchrun`` set it (0 when run alone)."""
    return _launcher_number("LOCAL_RANK") if in_process_group() else 0


def _launcher_number(name: str) -> int:
    """A count torchrun sets in the environment, read where a wrong one must not fail (0 for a word)."""
    try:
        return int(os.environ.get(name) or "0")
    except ValueError:  # as above
        return 0


def leave_at_once_on_signals() -> None:
    """Until the command's own handlers are in place (:func:`exit_on_signals`, once its modules are
    imported), a stop signal ends the process at once with drnn's one line and 128 + its number: nothing
    has been read or written yet, and Python's own handler printed a KeyboardInterrupt traceback through
    pydantic's import (red42). An ignored SIGHUP (nohup) stays ignored."""

    def leave(signum: int, _frame: object) -> None:
        if launched_local_rank() == 0:  # a torchrun node's other workers got the same signal: one line
            with contextlib.suppress(OSError):
                os.write(2, f"drnn: interrupted ({signal.Signals(signum).name})\n".encode())
        os._exit(128 + signum)

    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for signum in _STOPS:
            if signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) == signal.SIG_IGN:
                continue
            signal.signal(signum, leave)


def exit_process(run: Callable[[], None]) -> None:
    """Run the program, then end the process with its exit code.

    A process torchrun started leaves with ``os._exit`` once its output is flushed: at interpreter exit
    the gloo process group that DistributedDataParallel still holds is torn down by destructors, and a
    worker thread of it destroyed unjoined aborts the process ("terminate called without an active
    exception"), so torchrun failed runs that had finished and written everything (twice in CI here,
    after the ranks had met at a barrier and left the group one side at a time). Nothing of drnn's
    waits for the interpreter's exit: checkpoints are written and the run's lock released before.
    """
    try:
        run()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    if TORCHRUN_ENV not in os.environ:
        # done: a Ctrl-C now is ignored (Python's handler cut the interpreter's finalisers short with a
        # KeyboardInterrupt traceback, torch's, after drnn's one line: red42; a handler of drnn's is
        # reset as the interpreter ends, and a press then killed it by SIGINT), and SIGTERM or SIGHUP
        # end the process at once with the code decided: a hung finaliser stays killable
        _leave_with(code)
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(code)
    # done: torchrun's SIGTERM, which follows another worker's exit, must not cut the last flush short
    ignore_further_signals()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush
            stream.flush()
    os._exit(code)


class Signalled(BaseException):
    """A signal arrived outside the training loop. A BaseException: no ``except Exception`` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.quiet = signum == getattr(signal, "SIGPIPE", None)
        self.after: str | None = None  # what the interrupted command leaves, where it knows (a training's)
        # a training pressed twice: where its run stands, its last checkpoint on disk (drnn train --json)
        self.stopped: StoppedRun | None = None


def output_closed_by_reader() -> bool:
    """Whether drnn's stdout or stderr found its reader gone (its pipe guard turned that into SIGPIPE)."""
    return any(
        isinstance(stream, _PipeGuard) and stream.closed_by_reader for stream in (sys.stdout, sys.stderr)
    )


def _reader_gone_now() -> bool:
    """Whether drnn's stdout or stderr is a pipe whose reader has gone, though no write has raised
    BrokenPipeError: the rest of a large write (``drnn predict -n 100000 | head -c 10``) meets the
    kernel's SIGPIPE first, and Python then reports the write as done (the command exited 0, its text
    cut). The guard of each such stream discards what follows."""
    gone = False
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _PipeGuard) and stream.reader_gone():
            stream.discard()
            gone = True
    return gone


@contextlib.contextmanager
def _handling(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for the HANDLED signals inside the block, the previous handlers after it; a SIGPIPE
    reaches it only when drnn's own output lost its reader."""

    def handle(signum: int, frame: object) -> None:
        sigpipe = signum == getattr(signal, "SIGPIPE", None)
        if sigpipe and not output_closed_by_reader() and not _reader_gone_now():
            return  # another writer's pipe or socket: as Python's default (ignored), not a stop
        handler(signum, frame)

    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for signum in HANDLED:
            if signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: asked to outlive the terminal
            previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _leave_with(code: int) -> None:
    """Stop signals from now on end the process at once with ``code``, the one its command decided."""

    def leave(_signum: int, _frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush
                stream.flush()
        os._exit(code)

    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for signum in _STOPS:
            if signal.getsignal(signum) != signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                signal.signal(signum, leave)


# A stop signal this soon after the one raised is its echo, not a new request: a terminal's Ctrl-C
# reaches a torchrun worker from the terminal and again from torchrun, and a double press comes within
# milliseconds; raised while the first unwound, it ended in a traceback or an abort (red42)
ECHO_S = 2.0


class SignalExits:
    """What :func:`exit_on_signals` yields: the first :class:`Signalled` its handler raised, if any."""

    def __init__(self) -> None:
        self.first: Signalled | None = None
        self.first_at = 0.0  # time.monotonic() when it was raised


@contextlib.contextmanager
def exit_on_signals() -> Iterator[SignalExits]:
    """Raise :class:`Signalled` on SIGINT/SIGTERM inside the block (main thread only); one within
    :data:`ECHO_S` of the last raised changes nothing. A first that a library swallowed (an import's
    broad ``except``) leaves the command going: a later signal raises again, and a command that ends
    after a swallowed one still ends as stopped (``cli.main``)."""
    exits = SignalExits()

    def handler(signum: int, _frame: object) -> None:
        now = time.monotonic()
        if exits.first is not None and now - exits.first_at < ECHO_S:
            return
        # a stop already being handled (the training loop's second press, as train_session records it):
        # torchrun's SIGTERM or a third press must not replace it and what it says (review rev42)
        if isinstance(sys.exc_info()[1], Signalled):
            return
        exits.first, exits.first_at = Signalled(signum), now
        raise exits.first

    with _handling(handler):
        yield exits


def ignore_further_signals() -> dict[int, Any]:
    """SIGINT, SIGTERM and SIGHUP ignored from now on: a training's stop stands and only its report is left to
    say (a press of Ctrl-C more cut the ``--json`` object and the stop line short, leaving a bare
    "interrupted"). :func:`exit_on_signals` puts its handlers' predecessors back as the command ends.
    Returns the handlers it replaced."""
    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for signum in _STOPS:
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
    return previous


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored inside the block, the handlers before it after: for the moves that end
    a session whose outcome stands (an --overwrite's swap of two renames: a press between them cut the
    report short, and one during the old run's deletion left half of it behind)."""
    previous = ignore_further_signals()
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class StopRequests:
    """The training loop's handlers: a signal is noted, not raised, so that the loop stops at the
    next step boundary with a checkpoint of that step. ``signum`` is the first one that arrived: the
    reason the run stopped (a Ctrl-C that torchrun follows with its SIGTERM stopped by SIGINT).

    The same signal a second time (Ctrl-C pressed again while a long step, validation or checkpoint
    runs) raises :class:`Signalled` at once, without that checkpoint: the last one written stays.
    A different signal does not: a launcher may pass a Ctrl-C on as a SIGTERM (torchrun forwards the
    signal it got, and starts its workers in sessions of their own, so each receives the one Ctrl-C
    once; a launcher that left them in the terminal's process group would deliver it twice, which
    stops at once), and a reader that goes away after a Ctrl-C (``drnn train | head``) raises
    SIGPIPE; neither is asking twice. Nor is a second SIGTERM under torchrun: a scheduler signals every
    process of the job, and torchrun then forwards its own. A torchrun worker stops at once only on
    a second SIGINT sent to it directly (a second Ctrl-C reaches it as torchrun's SIGTERM).

    Once the stop's checkpoint is written (:meth:`settle`), later signals are ignored: the process only
    says where it stopped and exits. Under torchrun one arrives then as a rule: a worker that exits
    130/143 makes torchrun send SIGTERM to the others, and rank 0, still printing (or swapping in an
    ``--overwrite`` run), took it for a second SIGTERM and ended without its stop line."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._seen: set[int] = set()
        self._settled = False
        # under torchrun, the agent that started this process: see note_launcher_gone
        self._launcher = os.getppid() if TORCHRUN_ENV in os.environ else None

    def note_launcher_gone(self) -> bool:
        """Under torchrun, a launcher that died (this process was handed to another parent) counts as
        its SIGTERM: a ``kill -9`` of torchrun left its workers training unseen to the end of their
        budget, holding the run's lock. Asked where the ranks vote on stopping; True when noted now."""
        if self._launcher is None or self.signum is not None or os.getppid() == self._launcher:
            return False
        self.signum = signal.SIGTERM
        return True

    def settle(self) -> None:
        """The stop's checkpoint is written: from now on a signal changes nothing."""
        self._settled = True

    @contextlib.contextmanager
    def noted(self) -> Iterator[StopRequests]:
        def note(signum: int, _frame: object) -> None:
            if self._settled:
                return
            # Under torchrun a second SIGTERM is the launcher's copy of the first: a scheduler (Slurm's
            # scancel, systemd's stop, pkill) signals every process of the job, and torchrun passes the
            # one it got on a few milliseconds later (the stop's checkpoint was lost 4 times in 5)
            forwarded = self._launcher is not None and signum == signal.SIGTERM
            if signum in self._seen and signum != getattr(signal, "SIGPIPE", None) and not forwarded:
                raise Signalled(signum)
            self._seen.add(signum)
            if self.signum is None:
                self.signum = signum
            _cut_blocked_write()  # the stop's checkpoint must not wait for stdout's reader

        try:
            with _handling(note):
                yield self
        finally:
            if not _Cutting.guarded:  # in-process (a test, a library use): no stop state left behind
                _end_cutting()
            if self._settled and self._launcher is not None:
                # torchrun's SIGTERM may still come while this process reports its stop and exits (it
                # exits soon after: exit_process); only a torchrun worker, never a test's own process
                ignore_further_signals()

    @property
    def pending(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        """128 + the signal, as a shell reports a process it ended (SIGINT, if none arrived)."""
        return 128 + (self.signum or signal.SIGINT)


class _Once:
    """Whether SIGPIPE was raised already: stdout and stderr often close together (``2>&1 | head``),
    and a second signal would read as a second Ctrl-C, which stops without a checkpoint."""

    raised = False


class _WriteCut(BaseException):
    """Raised by a stop's handler (or its timer) out of a guarded write that blocks, and caught by that
    guard alone: raised only while :attr:`_Cutting.writing` is set, which the guard sets and clears
    inside the ``try`` that catches it. A BaseException: nothing in between eats it."""


class _Cutting:
    """Where a noted stop may cut a blocked write short (main thread only: handlers run there)."""

    writing: _PipeGuard | None = None  # the guard whose write the main thread is in
    stopping = False  # a stop is noted: a write that blocks from now on is cut (the timer's)
    armed = False  # the timer runs (only while a guarded write lasts)
    # the SIGALRM handler the timer's replaced, put back as the command ends (not after each write: an
    # alarm already raised would then meet the default action, which ends the process)
    replaced: Any = None
    installed = False
    # the bytes the main thread had written at the last look at a blocked write (None: not blocked then,
    # or not measurable): a write is cut when its reader took nothing for a whole tick, not because the
    # pipe is full at one instant (review rev41b: a reader slow but reading lost 24 of a stop's 40 lines)
    written: int | None = None
    guarded = False  # guard_output is in force, and ends the cutting as the command ends


def _cut_blocked_write() -> None:
    """A stop was noted (its handler runs this): the write the main thread is in, if any, is watched from
    now on, and cut once its reader has taken nothing for a tick (:func:`_stalled`)."""
    _Cutting.stopping = True
    guard = _Cutting.writing
    if guard is None:
        return
    _Cutting.written = _written_by_this_thread() if guard.blocked() else None
    _arm_cut()


def _on_alarm(_signum: int, _frame: object) -> None:
    guard = _Cutting.writing
    if guard is not None and _stalled(guard):
        raise _WriteCut


def _stalled(guard: _PipeGuard) -> bool:
    """Whether ``guard``'s write is blocked and wrote nothing since the last look: its reader takes
    nothing (a first look at a blocked write only notes the count, unless it cannot be had)."""
    if not guard.blocked():
        _Cutting.written = None
        return False
    now, before = _written_by_this_thread(), _Cutting.written
    _Cutting.written = now
    return now is None or (before is not None and now == before)


def _written_by_this_thread() -> int | None:
    """The bytes this thread has passed to write calls (Linux's /proc/thread-self/io ``wchar``): a
    blocked write that goes on, a little at a time, raises it. None where the system does not say."""
    try:
        with open("/proc/thread-self/io", "rb") as counters:
            for line in counters:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _arm_cut() -> None:
    """Check the guarded write every CUT_AFTER_S while it lasts (no timer of someone else's replaced)."""
    if _Cutting.armed or not hasattr(signal, "setitimer"):
        return
    with contextlib.suppress(ValueError, OSError):
        if signal.getitimer(signal.ITIMER_REAL)[0]:
            return
        if not _Cutting.installed:
            _Cutting.replaced = signal.signal(signal.SIGALRM, _on_alarm)
            _Cutting.installed = True
        _Cutting.armed = True
        signal.setitimer(signal.ITIMER_REAL, CUT_AFTER_S, CUT_AFTER_S)


def _disarm_cut() -> None:
    if _Cutting.armed:
        _Cutting.armed = False
        with contextlib.suppress(ValueError, OSError):
            signal.setitimer(signal.ITIMER_REAL, 0)


def _end_cutting() -> None:
    """The command ends: no stop, no timer, the SIGALRM handler before it back."""
    _disarm_cut()
    _Cutting.stopping = False
    if _Cutting.installed:
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(signal.SIGALRM, _Cutting.replaced)
        _Cutting.installed = False


class _PipeGuard:
    """An output stream that turns the first BrokenPipeError into SIGPIPE and then discards output; that
    discards output after its terminal hung up (EIO), and after a stop cut a write blocked in it."""

    def __init__(self, stream: TextIO, once: _Once) -> None:
        self._stream = stream
        self._broken = False  # its reader left
        self._dropped = False  # what follows goes to /dev/null: its reader left, its terminal hung up, a cut
        self._once = once
        try:
            self._terminal = stream.isatty()
        except (OSError, ValueError, AttributeError):
            self._terminal = False

    @property
    def closed_by_reader(self) -> bool:
        return self._broken

    def write(self, text: str) -> int:
        if not self._dropped:
            try:
                written = self._cuttable(self._stream.write, text)
                if written is not None:
                    return int(written)
            except BrokenPipeError:
                self._closed_by_reader()
            except OSError as error:
                if not self._hung_up(error):
                    raise
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._dropped:
            try:
                self._cuttable(self._stream.flush)
            except BrokenPipeError:
                self._closed_by_reader()
            except OSError as error:
                if not self._hung_up(error):
                    raise
                self._drop()

    def _cuttable(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, which a noted stop cuts short where it blocks (None then: the stream is
        dropped). Only the main thread's: a handler runs there, and must never raise into another write."""
        if threading.current_thread() is not threading.main_thread():
            return call(*args)
        outer = _Cutting.writing
        try:
            try:
                _Cutting.writing = self  # from here to the finally a handler may raise _WriteCut
                _Cutting.written = None  # this write's reader is judged from its own first look
                if _Cutting.stopping:
                    _arm_cut()
                return call(*args)
            finally:
                _Cutting.writing = outer
                if outer is None:
                    _disarm_cut()
        except _WriteCut:
            self._drop()
            return None

    def blocked(self) -> bool:
        """Whether a write to this stream would block now (a pipe or terminal whose reader does not
        read); False where it cannot tell."""
        try:
            poller = select.poll()
            poller.register(self._stream.fileno(), select.POLLOUT)
            return not any(events & (select.POLLOUT | select.POLLERR) for _, events in poller.poll(0))
        except (OSError, ValueError, AttributeError):
            return False

    def _hung_up(self, error: OSError) -> bool:
        """Whether a failed write means the terminal is gone (a hung-up tty fails writes with EIO)."""
        return self._terminal and error.errno == errno.EIO

    def reader_gone(self) -> bool:
        """Whether this stream is a pipe whose reader closed it: poll reports an error on its writing
        end (a hung-up terminal reports one too, and is no pipe; False where it cannot tell)."""
        try:
            descriptor = self._stream.fileno()
            if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
                return False
            poller = select.poll()
            poller.register(descriptor, select.POLLOUT)
            return any(events & select.POLLERR for _, events in poller.poll(0))
        except (OSError, ValueError, AttributeError):  # no fileno, a closed stream, no poll (Windows)
            return False

    def discard(self) -> None:
        """Send what follows to /dev/null: later flushes (rich, the interpreter at exit) then succeed.
        The signal that found the reader gone is the one raised: no second one."""
        self._broken = True
        self._once.raised = True
        self._drop()

    def _drop(self) -> None:
        """What follows goes to /dev/null, what the stream still buffers included (at exit too)."""
        self._dropped = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def _closed_by_reader(self) -> None:
        raised = self._once.raised
        self.discard()
        if not hasattr(signal, "SIGPIPE") or raised:
            return
        self._once.raised = True
        if callable(signal.getsignal(signal.SIGPIPE)):
            signal.raise_signal(signal.SIGPIPE)  # the training loop's handler: checkpoint, then stop
        else:
            raise Signalled(signal.SIGPIPE)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def guard_output() -> Iterator[None]:
    """stdout and stderr behind pipe guards: the run log goes to stderr under ``--json``, and rich,
    left to itself, answers a closed stderr with exit 1 and no checkpoint."""
    originals = sys.stdout, sys.stderr
    once = _Once()
    with contextlib.ExitStack() as closing:
        # A stream closed before drnn started (`>&-`, `2>&-`: a daemon, a cron job) is None in Python:
        # what would go there goes to /dev/null, as no output was asked for, and the command runs.
        stdout, stderr = (
            stream if stream is not None else closing.enter_context(open(os.devnull, "w", encoding="utf-8"))
            for stream in originals
        )
        guards = _PipeGuard(stdout, once), _PipeGuard(stderr, once)
        sys.stdout, sys.stderr = guards  # type: ignore[assignment]
        _Cutting.stopping, _Cutting.guarded = False, True
        try:
            yield
        finally:
            _Cutting.guarded = False
            if _Cutting.stopping:  # what a stop left buffered: cut too if it blocks, not at the exit's flush
                for guard in guards:
                    with contextlib.suppress(Exception):
                        guard.flush()
            _end_cutting()
            sys.stdout, sys.stderr = originals
