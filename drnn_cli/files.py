"""Files in and out: user-named inputs must be regular files; outputs are written atomically.

A FIFO, ``/dev/zero`` or a directory given where a file is expected would block, grow without end or
fail with an unrelated message; they are refused by what they are before a byte is read. Every file
drnn writes (run files, caches, pages; checkpoints piece by piece) goes through :func:`atomic_write_bytes`
or :func:`atomic_write_stream`, so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from drnn_cli.errors import DrnnError, UsageError

TEMPORARY_SUFFIX = ".tmp"


def _in_current_directory() -> str:
    """`` in DIR (...)`` for the current directory, or nothing where it is gone (deleted under the
    process): a name in a config file is not read from the file's folder, which one would expect."""
    try:
        return f" in {Path.cwd()} (the current directory, where relative names are read from)"
    except OSError:
        return ""


# What the user can do about a write the OS refused for want of room (red41: the OS's reason alone named
# no fix; a full disk's left the user to find that the checkpoint before it was whole)
_ROOM_FIXES = {
    errno.ENOSPC: "free space on that filesystem",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "the shell's file-size limit is below the file's size: raise it (ulimit -f unlimited)",
}
_ELSEWHERE = {
    errno.ENOSPC: ", or write elsewhere (drnn's files are written whole or not at all: the one there before is intact)",
    errno.EDQUOT: ", or write elsewhere (the file there before is intact)",
}
# ... and for the other refusals a fix implies
_WRITE_FIXES = {
    **{number: fix + _ELSEWHERE.get(number, "") for number, fix in _ROOM_FIXES.items()},
    errno.EROFS: "that filesystem is mounted read-only: write elsewhere",
    errno.EACCES: "this user may not write there: change its permissions or write elsewhere",
    errno.EPERM: "this user may not write there: change its permissions or write elsewhere",
}


# A write refused for want of room (> /dev/full, a quota, ulimit -f), not a file's name or rights
OUTPUT_ERRNOS = frozenset(_ROOM_FIXES)


def write_refused(what: str, exc: OSError) -> str:
    """``cannot write WHAT: REASON; FIX``, the fix where the OS's reason implies one."""
    fix = _WRITE_FIXES.get(exc.errno or 0)
    return f"cannot write {what}: {exc.strerror or exc}" + (f"; {fix}" if fix else "")


class WriteRefused(DrnnError):
    """A write the OS refused, in :func:`write_refused`'s words. ``room_fix``: where more room would let
    the same write succeed (a full disk, a quota, ``ulimit -f``), how to make it, for a caller that can
    be continued in place, such as a training run at a checkpoint, to say with how to continue;
    ``refusal``: the path and the OS's reason alone."""

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(write_refused(what, exc))
        self.refusal = f"cannot write {what}: {exc.strerror or exc}"
        self.room_fix = _ROOM_FIXES.get(exc.errno or 0)


def require_regular_file(path: Path, what: str, fix: str) -> int:
    """``path``'s size if it is a readable regular file; otherwise a DrnnError naming what it is."""
    try:
        info = path.stat()
    except FileNotFoundError:
        # a relative name is looked up from the current directory, not from a config file's folder
        where = "" if path.is_absolute() else _in_current_directory()
        raise DrnnError(f"{what} {path} does not exist{where}; {fix}") from None
    except OSError as exc:
        raise DrnnError(f"cannot read {what} {path}: {exc.strerror or exc}; {fix}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DrnnError(f"{what} {path} is a directory, not a file; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise DrnnError(f"{what} {path} is {_special_kind(info)}, not a regular file; {fix}")
    return info.st_size


_UNICODE_BYTE_ORDER_MARKS = (  # UTF-32's marks first: UTF-32LE's starts with UTF-16LE's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


NOT_UTF8_HEAD = 8192  # bytes of a file's start that :func:`not_utf8` looks at for a mark or a NUL
_SNIFF_BYTES = 1 << 16  # bytes either side of an undecodable one that tell which encoding it is
CJK_HIGH_SHARE = 0.3  # bytes ≥ 0x80 among a text's: more, and it reads as Shift_JIS, GBK, Big5 or EUC-KR
# bytes copied at a time to look for non-ASCII ones (bytes.isascii is C-fast; re is 50x slower)
_ASCII_BLOCK = 1 << 20


# Non-ASCII characters that must have decoded before an undecodable byte to call a file UTF-8: one or
# two can be a legacy text's luck (GBK's 时 is CA B1, a valid UTF-8 pair; so is cp1252's É” C9 94), eight
# in a row almost never are (about one GBK text in a million)
UTF8_EVIDENCE = 8
_UTF8_LEAD_BYTES = bytes(range(0xC2, 0xF5))  # each non-ASCII character of valid UTF-8 starts with one


def _utf8_characters_before(data: bytes | bytearray, end: int) -> bool:
    """Whether ``data[:end]``, valid UTF-8, holds ``UTF8_EVIDENCE`` non-ASCII characters, counted by their
    lead bytes a MiB at a time: a 100 MB file is never copied whole, and an ASCII block costs one
    ``isascii``."""
    found = 0
    with memoryview(data) as view:
        for start in range(0, end, _ASCII_BLOCK):
            block = bytes(view[start : min(start + _ASCII_BLOCK, end)])
            if not block.isascii():
                found += len(block) - len(block.translate(None, _UTF8_LEAD_BYTES))
                if found >= UTF8_EVIDENCE:
                    return True
    return False


def not_utf8(
    what: str, path: Path, data: bytes | bytearray, error: UnicodeDecodeError, offset: int
) -> DrnnError:
    """The error for a file that is not UTF-8, with the ``iconv`` that converts it: ``data`` is the
    file's bytes, ``error`` what decoding them raised at ``offset``.

    A UTF-16 or UTF-32 file announces itself with a byte order mark (Windows PowerShell's ``>``
    writes UTF-16): its encoding is named, as Latin-1 would turn it into a text of NULs and mojibake.
    A UTF-8 text cut inside a character (``head -c``), or with a stray byte in it, is said to be one:
    re-encoded from Latin-1 its every non-ASCII character becomes two or three wrong ones. It is one
    where the bytes before ``offset``, which decoded, hold ``UTF8_EVIDENCE`` non-ASCII characters (a
    Latin-1 or CJK text fails at its first or second), or where most of what surrounds the byte is valid
    multi-byte UTF-8. Bytes
    0x80-0x9F are Windows-1252's quotes and dashes, which Latin-1 makes invisible control characters.
    """
    head = bytes(data[:NOT_UTF8_HEAD])
    for mark, encoding in _UNICODE_BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return DrnnError(
                f"{what} {path} is {encoding.upper()} (it starts with that byte order mark), not UTF-8; "
                f"convert it, e.g. iconv -f {encoding} -t utf-8"
            )
    if b"\0" in head:  # as git and grep tell a binary file: text in any 8-bit encoding has no NUL
        return DrnnError(
            f"{what} {path} is not text: it holds NUL bytes and an undecodable byte at offset {offset}, as "
            "a binary file (an image, a checkpoint) does; name a text file (a UTF-16 text without a byte "
            "order mark converts with iconv -f utf-16le -t utf-8)"
        )
    window = bytes(data[max(0, offset - _SNIFF_BYTES) : offset + _SNIFF_BYTES])
    around = window.decode("utf-8", "replace")
    undecodable = around.count("\ufffd") - window.count("\ufffd".encode())  # a text's own "�" decodes
    keep_utf8 = f"drop them, e.g. iconv -c -f utf-8 -t utf-8 {shlex.quote(str(path))} > fixed.txt"
    # A character cut short at the end: its lead byte and continuation bytes (one lone lead byte is as
    # likely a Latin-1 text's last "é").
    cut = error.reason == "unexpected end of data" and len(data) - offset > 1
    # Valid multi-byte characters before the bad byte (however far: a stray byte 15 MB into a file whose
    # Greek lines are all in its first MB), or mostly such characters around it: UTF-8.
    utf8 = _utf8_characters_before(data, offset) or (
        sum(not character.isascii() for character in around) - undecodable > undecodable
    )
    if cut or utf8:
        if error.reason == "unexpected end of data":
            return DrnnError(
                f"{what} {path} is UTF-8 cut short: it ends inside a character (bytes from offset {offset}), "
                f"as a copy or head -c that stopped mid-character leaves it; {keep_utf8}"
            )
        return DrnnError(
            f"{what} {path} is UTF-8 but for an undecodable byte at offset {offset} (a stray byte, or a "
            f"text in another encoding pasted in); {keep_utf8}"
        )
    after = bytes(data[offset : offset + _SNIFF_BYTES])
    # Most bytes high: a double-byte encoding's text (a CJK character is two; a European text in Latin-1
    # has a few accented letters among ASCII ones, "ção" and all, a tenth of its bytes or so)
    if len(re.findall(rb"[\x80-\xff]", window)) > CJK_HIGH_SHARE * len(window):
        return DrnnError(
            f"{what} {path} is not UTF-8 (undecodable byte at offset {offset}); most of its bytes are ≥ 0x80, "
            "as a CJK encoding's are: convert it from its own, e.g. iconv -f SHIFT_JIS -t utf-8 (Japanese), -f GBK "
            "(Chinese), -f BIG5 (traditional Chinese) or -f EUC-KR (Korean)"
        )
    try:  # bytes 0x80-0x9F that Windows-1252 defines all: its quotes and dashes (Latin-1's are controls)
        windows = re.search(rb"[\x80-\x9f]", after) is not None and bool(after.decode("cp1252"))
    except UnicodeDecodeError:
        windows = False
    advice = (
        "iconv -f cp1252 -t utf-8 (bytes 0x80-0x9F: Windows-1252's quotes and dashes)"
        if windows
        else "iconv -f latin1 -t utf-8"
    )
    lone_end = error.reason == "unexpected end of data"  # its last byte alone: Latin-1, or UTF-8 cut
    return DrnnError(
        f"{what} {path} is not UTF-8 (undecodable byte at offset {offset}); convert it, e.g. {advice}"
        + (
            " (or, if it is UTF-8 cut inside its last character, drop that byte: head -c -1)"
            if lone_end
            else ""
        )
    )


def partial_path(path: Path) -> Path:
    """Where this process streams ``path`` before renaming it into place: ``.NAME.HOST@PID.part``. The
    host too, since a data folder shared by several machines holds their process ids side by side."""
    return path.with_name(f".{path.name}.{socket.gethostname()}@{os.getpid()}.part")


def remove_dead_partials(directory: Path, pattern: str) -> None:
    """Delete the :func:`partial_path` files in ``directory`` matching ``pattern`` that this machine's
    processes were writing and no longer are (killed mid-write, they would stay for good). A live
    writer's is left alone, so is another machine's (its process ids mean nothing here), and one that
    cannot be deleted (a read-only folder) waits for a later run."""
    try:
        partials = list(directory.glob(pattern))
    except OSError:
        return
    host = socket.gethostname()
    for partial in partials:
        stem = partial.name.removesuffix(".part")
        writer, at, pid_text = stem.rpartition("@")
        if not at:  # ``.NAME.PID.part``, from before the host was in the name: a writer on this machine
            writer, pid_text = f".{host}", stem.rpartition(".")[2]
        if (
            writer.endswith(f".{host}")
            and re.fullmatch(r"[0-9]{1,10}", pid_text)
            and not process_alive(int(pid_text))
        ):
            with contextlib.suppress(OSError):
                partial.unlink()


def remove_abandoned_temporaries(directory: Path, pattern: str, older_than_s: float) -> None:
    """Delete the temporaries in ``directory`` matching ``pattern`` left unmodified for ``older_than_s``:
    for files written in milliseconds (``atomic_write_bytes``'s), one that old was a killed writer's."""
    try:
        temporaries = list(directory.glob(pattern))
    except OSError:
        return
    for temporary in temporaries:
        with contextlib.suppress(OSError):
            if time.time() - temporary.stat().st_mtime > older_than_s:
                temporary.unlink()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def read_utf8_text(
    path: Path, what: str, max_bytes: int | None = None, excerpt_bytes: int | None = None
) -> str:
    """The file decoded as UTF-8; one line naming it as ``what`` when it cannot be read, is not UTF-8
    (with the conversion that fixes it), or holds NUL bytes.

    ``max_bytes``: refuse a file longer than this, judged by what is read (``max_bytes`` and one byte
    more), not by its size on disk: a file still being written grows past any size it had when looked at;
    the refusal suggests an excerpt of ``excerpt_bytes`` (default ``max_bytes``) where the command uses
    less than it reads (drnn inspect: 20,000 characters of up to 16 MiB).
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(-1 if max_bytes is None else max_bytes + 1)
    except OSError as exc:
        raise DrnnError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise DrnnError(
            f"{what} {path} holds more than {max_bytes:,} bytes, the most this command reads; give it an "
            f"excerpt, e.g. head -c {excerpt_bytes or max_bytes} {shlex.quote(str(path))} | iconv -c -f utf-8 -t utf-8 > "
            "excerpt.txt (iconv drops a character head cut in half)"
        )
    return decode_utf8_text(raw, what, path)


def decode_utf8_text(raw: bytes, what: str, path: Path) -> str:
    """Bytes already read (a file's, or standard input's) decoded as :func:`read_utf8_text` decodes a
    file's, with its errors naming them as ``what`` ``path``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(what, path, raw, exc, exc.start) from None
    refuse_nul_bytes(what, path, raw[:NOT_UTF8_HEAD])
    return text


def refuse_nul_bytes(what: str, path: Path, head: bytes) -> None:
    """Refuse a file that decodes as UTF-8 but starts with NUL bytes, as no text does: most likely
    UTF-16 without a byte order mark, whose ASCII letters are each followed by a NUL (every token
    would be trained beside a NUL), or a binary file. ``head`` is its first few KiB."""
    offset = head.find(b"\0")
    if offset >= 0:
        order = "le" if offset % 2 else "be"  # "T\0h\0" (little-endian) or "\0T\0h" (big-endian)
        raise DrnnError(
            f"{what} {path} holds NUL bytes (the first at offset {offset}), which text does not: convert "
            f"a UTF-16 text without a byte order mark with iconv -f utf-16{order} -t utf-8, or name a text file"
        )


def _special_kind(info: os.stat_result) -> str:
    """What a path that is neither a regular file nor a directory is, in words."""
    return "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or special file"


def output_file(path: Path, flag: str, example: str) -> Path:
    """Where a user-named output (``--html``, ``--png``) is written: ``path``, or the file a symlink
    there points at. An atomic write renames over its target, so a FIFO, a device (``/dev/null``) or
    a directory there is refused rather than replaced, as is a folder that does not exist (a typo
    would otherwise leave a new tree of folders). ``example``: a file name a refusal proposes."""
    target = path.resolve() if path.is_symlink() else path
    try:
        info = target.stat()
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise DrnnError(
                f"{flag} {path}: the folder {target.parent} does not exist; create it first"
            ) from None
        return target
    except OSError as exc:
        raise DrnnError(f"{flag} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DrnnError(f"{flag} {path} is a directory; name a file in it, e.g. {path / example}")
    if not stat.S_ISREG(info.st_mode):
        raise DrnnError(
            f"{flag} {path} is {_special_kind(info)}, which drnn would replace by a file; name a regular file"
        )
    return target


def refuse_overwriting(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """Refuse an output (keyed by its flag) that is one of the command's inputs (keyed by what they
    are, "the checkpoint this command reads"), or another output's file.

    The write would replace the checkpoint being read or the text given to ``--file`` (one flag's
    value typed for another), and two outputs on one path keep only the last one written. Files
    are compared as the OS sees them (through symlinks and hard links).
    """
    claimed: list[tuple[str, tuple[int, int] | str]] = [
        (what, _identity(path)) for what, path in inputs.items() if path is not None
    ]
    for flag, path in outputs.items():
        if path is None:
            continue
        identity = _identity(path)
        for what, other in claimed:
            if identity == other:
                raise UsageError(f"{flag} {path} is {what}; give {flag} a file of its own")
        claimed.append((f"the file {flag} writes", identity))


def _identity(path: Path) -> tuple[int, int] | str:
    """The file ``path`` names: its device and inode when it exists, else its absolute path."""
    try:
        info = path.stat()
    except OSError:
        return os.path.abspath(path)
    return (info.st_dev, info.st_ino)


def read_own_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a small file drnn writes for itself (a token-cache entry's JSON, a hash stamp),
    read without following a symlink, waiting on a FIFO or reading more than ``max_bytes``: anything
    else in its place (a link to ``/dev/zero``, a FIFO, a huge file) raises OSError, which every caller
    takes as "no such file" and writes its own file again."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        pieces, wanted = [], max_bytes + 1  # one byte more: a file that grew past its limit shows it
        while wanted > 0 and (piece := os.read(descriptor, min(wanted, 1 << 20))):
            pieces.append(piece)
            wanted -= len(piece)
    finally:
        os.close(descriptor)
    if wanted <= 0:
        raise OSError(errno.EFBIG, f"larger than {max_bytes:,} bytes", str(path))
    return b"".join(pieces)


def read_tail(path: Path, max_bytes: int) -> tuple[bytes, bool]:
    """A file's last ``max_bytes`` and whether they begin a line (the file's start, or just after a
    line break), read without waiting on a FIFO or reading a device: anything but a regular file
    raises OSError."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        start = max(0, info.st_size - max_bytes)
        os.lseek(descriptor, max(0, start - 1), os.SEEK_SET)  # the byte before: does a line begin at start?
        pieces, wanted = [], max_bytes + (start > 0)
        while wanted > 0 and (piece := os.read(descriptor, min(wanted, 1 << 20))):
            pieces.append(piece)
            wanted -= len(piece)
    finally:
        os.close(descriptor)
    data = b"".join(pieces)
    if start == 0:
        return data, True
    return data[1:], data[:1] == b"\n"


FileIdentity = dict[str, int]


def file_identity(path: Path) -> FileIdentity:
    """What tells one version of a file from another: a file swapped in (``mv``, ``rsync``) has another
    inode, one rewritten in place another size or modification time, and one whose old time was put
    back (``touch -r``) another change time."""
    info = path.stat()
    return {
        "inode": info.st_ino,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
    }


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A crash at any point leaves either the old file or the new one, never a mixture (a process
    killed mid-write can leave a ``.NAME.*.tmp`` beside it: :func:`remove_stale_temporaries`).
    An OS error (full disk, read-only folder) becomes a one-line DrnnError naming the path.
    """
    atomic_write_stream(path, lambda stream: stream.write(payload))


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """:func:`atomic_write_bytes` for a file written piece by piece (``write`` gets the open
    temporary file): a large file need never be whole in memory. Whatever ``write`` raises leaves
    ``path`` as it was."""
    try:
        _atomic_write(path, write)
    except OSError as exc:
        raise WriteRefused(str(path), exc) from None


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new ``.NAME.RANDOM.tmp`` beside ``path``, opened for writing. Created with mode 0666 less the
    umask, as ``open()`` makes files (``mkstemp``'s 0600 would hide runs from the rest of a shared
    team); reading the umask instead would mean setting it, for an instant, for every thread. 64
    random bits make a clash with another writer's name negligible; ``O_EXCL`` makes one harmless."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}{TEMPORARY_SUFFIX}"
    return os.open(temporary, flags, 0o666), temporary


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _new_temporary(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def atomic_link(source: Path, path: Path) -> None:
    """Make ``path`` a second name of ``source`` (a hard link), in place of whatever ``path`` was, as
    :func:`atomic_write_bytes` would: linked under a temporary name, renamed over ``path``, the folder
    fsynced. Where the filesystem has no hard links (FAT, some network shares) the bytes are copied
    through :func:`atomic_write_stream` instead. Safe for files drnn only ever replaces, never edits:
    a later write of either name is a new file, and leaves the other as it was."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}{TEMPORARY_SUFFIX}"
        os.link(source, temporary)
    except OSError:
        try:
            original = source.open("rb")
        except OSError as exc:
            raise DrnnError(f"cannot read {source}: {exc.strerror or exc}") from None
        with original:
            atomic_write_stream(path, lambda stream: shutil.copyfileobj(original, stream, 1 << 20))
        return
    try:
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise WriteRefused(str(path), exc) from None
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the ``.NAME.*.tmp`` files a killed writer left; call it only while holding the run's lock."""
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
