"""Where a corpus comes from: the registry of known corpora, the local cache, and the download.

A registered corpus (``data.corpus``) is read from the cache (``DRNN_DATA_DIR``, default ``data/``)
when its SHA-1 matches, else downloaded from its mirror (``DRNN_DATA_URL``) with a size cap, a deadline
and retries, checked against that SHA-1 before it takes the cached file's name.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drnn_cli.corpus import CorpusSha1s, hash_corpus
from drnn_cli.errors import ConfigError, DrnnError, first_line
from drnn_cli.files import (
    FileIdentity,
    file_identity,
    partial_path,
    remove_dead_partials,
)

if TYPE_CHECKING:
    import requests

DEFAULT_DATA_DIR = "data"
DATA_DIR_ENV = "DRNN_DATA_DIR"
DATA_URL_ENV = "DRNN_DATA_URL"


@dataclass(frozen=True)
class CorpusSpec:
    """A downloadable corpus: the file name on the hub and its SHA-1."""

    name: str
    filename: str
    base_url: str
    sha1: str
    size: int


REGISTRY: dict[str, CorpusSpec] = {
    "timemachine": CorpusSpec(
        name="timemachine",
        filename="timemachine.txt",
        base_url="http://d2l-data.s3-accelerate.amazonaws.com/",
        sha1="090b5e7e70c295757f55df93cb0a180b9691891a",
        size=178_979,
    ),
}


@dataclass(frozen=True)
class CorpusFile:
    """A corpus on local disk, ready to read; ``downloaded_from``: the URL, where this call fetched it."""

    path: Path
    sha1s: CorpusSha1s  # of its bytes (the registry's, checked) and of its text, from one read
    identity: FileIdentity  # the file's when it was hashed, read before: a change during the hash shows
    downloaded_from: str | None = None

    @property
    def sha1(self) -> str:
        return self.sha1s.file

    @property
    def download_note(self) -> str | None:
        """Said where a download happened: a log keeps it (piped, no download bar shows at all)."""
        if self.downloaded_from is None:
            return None
        return f"downloaded {self.downloaded_from} into {self.path} (SHA-1 {self.sha1} checked)"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_url(spec: CorpusSpec) -> str:
    base = os.environ.get(DATA_URL_ENV) or spec.base_url
    if not base.lower().startswith(("http://", "https://")):  # not the network's fault: the setting's (red41)
        raise DrnnError(
            f"{DATA_URL_ENV} must be an http:// or https:// URL of a folder holding {spec.filename} (it is "
            f"{base!r}); fix it, or unset it to download from {spec.base_url}"
        )
    return base.rstrip("/") + "/" + spec.filename


ProgressHook = Callable[[int, int | None], None]


def cached_corpus(name: str, cache_dir: Path | None = None) -> CorpusFile | None:
    """The registered corpus if the cache already holds it, verified; None otherwise (never downloads)."""
    spec = REGISTRY.get(name)
    if spec is None:
        return None
    target = (cache_dir or data_dir()) / spec.filename
    if not target.is_file():
        return None
    identity = file_identity(target)  # before hashing (data.check_unchanged)
    sha1s = hash_corpus(target)  # both SHA-1s in one read: the caller needs the text's too
    return CorpusFile(target, sha1s, identity) if sha1s.file == spec.sha1 else None


def fetch_corpus(
    name: str,
    *,
    cache_dir: Path | None = None,
    progress: ProgressHook | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 1.0,
    deadline: float = 600.0,
) -> CorpusFile:
    """Return the cached, verified corpus file, downloading it first if needed.

    A cached file whose SHA-1 matches means no network at all. Downloads stream into a temporary file
    beside the target, are verified, then renamed into place, so the cache never holds a partial file.
    A download is bounded: no more bytes than the registry's size (more could not match its SHA-1),
    ``timeout`` seconds per read and ``deadline`` seconds in all (a server trickling a byte at a time).
    """
    spec = REGISTRY.get(name)
    if spec is None:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(
            f"config error: data.corpus: unknown corpus {name!r}; one of: {known} (or set data.path)"
        )
    cache_dir = cache_dir or data_dir()
    target = cache_dir / spec.filename
    remove_dead_partials(target.parent, f".{target.name}.*.part")  # a dead download's, even when cached
    cached = cached_corpus(name, cache_dir)
    if cached is not None:
        return cached
    url = corpus_url(spec)
    if target.is_dir():  # the download would fail at its rename, naming only its temporary file
        raise DrnnError(
            f"{target} is a folder, where the {name} corpus goes; remove it, or set {DATA_DIR_ENV} to another folder"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "is a file, not a directory" if cache_dir.is_file() else f"cannot be created ({exc.strerror})"
        raise DrnnError(
            f"the corpus cache {cache_dir} {what}; set {DATA_DIR_ENV} to a directory drnn may write"
        ) from None
    partial = partial_path(target)
    limits = _Limits(spec.size, timeout, time.monotonic() + deadline)
    try:
        try:
            actual = _download_with_retries(url, partial, progress, retries, limits, backoff)
        except DrnnError as error:
            if not target.is_file():
                raise
            raise DrnnError(  # a file at the corpus's place that cached_corpus found is not the corpus
                f"{target} is not the {name} corpus (its SHA-1 is {file_sha1(target)}, expected {spec.sha1}), "
                f"and {error}"
            ) from None
        if actual != spec.sha1:
            raise DrnnError(
                f"checksum mismatch for {url}: expected SHA-1 {spec.sha1}, got {actual}; the download was "
                f"discarded. Check {DATA_URL_ENV} or copy the right file into {cache_dir}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    # the text's SHA-1 too (the file's was checked as it streamed in): one more read, once a download
    identity = file_identity(target)
    return CorpusFile(target, CorpusSha1s(spec.sha1, hash_corpus(target).text), identity, url)


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    read_timeout: float
    deadline: float  # time.monotonic() by which the whole download must be done


class _TooMuch(DrnnError):
    """The server sent more than the corpus can be, or took longer than the deadline: not retried."""


def _download_with_retries(
    url: str, partial: Path, progress: ProgressHook | None, retries: int, limits: _Limits, backoff: float
) -> str:
    # imported where a download happens: every command finds a cached corpus, and requests takes 60 ms
    import requests
    import urllib3

    last_problem = ""
    for attempt in range(retries):
        try:
            return _download(url, partial, progress, limits)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            last_problem = f"HTTP {status}"
            if status and status < 500 and status != 429:
                break  # a 404 will not fix itself
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            last_problem = type(exc).__name__  # raw reads raise urllib3's errors, not requests'
            partial.unlink(missing_ok=True)
        except ValueError as exc:  # a redirect to a URL that does not parse (urllib's, not requests')
            last_problem = f"an invalid response: {first_line(exc, 200)}"
            partial.unlink(missing_ok=True)
        if attempt + 1 < retries:
            if time.monotonic() + backoff * 2**attempt >= limits.deadline:
                break
            time.sleep(backoff * 2**attempt)
    raise DrnnError(
        f"cannot download {url} ({last_problem}); check the network, set {DATA_URL_ENV} to a mirror, "
        f"or copy the file into {partial.parent.absolute()} (the corpus cache: data/ where drnn runs, or "
        f"${DATA_DIR_ENV}, which any directory can share)"
    )


def _response_headers(url: str, limits: _Limits, folder: Path) -> requests.Response:
    """The response to a GET of ``url``, its body not yet read, within the deadline. ``timeout`` bounds
    each read of the socket, not their sum: a server that trickles its headers a byte at a time would
    keep ``requests.get`` waiting for weeks. So the request runs in a worker thread, which is left
    behind (a daemon: it ends with the process) when the deadline passes first."""
    import requests

    outcome: list[requests.Response | BaseException] = []
    abandoned = False
    lock = threading.Lock()  # the outcome reaches the waiting thread, or is closed once it has left

    def get() -> None:
        response: requests.Response | BaseException
        try:
            response = requests.get(url, stream=True, timeout=limits.read_timeout)
        except BaseException as error:  # handed to the waiting thread, which raises it
            response = error
        with lock:
            if not abandoned:
                outcome.append(response)
                return
        if isinstance(response, requests.Response):
            response.close()  # too late: its connection is closed, not left open

    worker = threading.Thread(target=get, name="drnn-download", daemon=True)
    worker.start()
    worker.join(max(0.0, limits.deadline - time.monotonic()))
    with lock:
        abandoned = not outcome
    if abandoned:
        raise _TooMuch(
            f"{url} sent no complete response within the time allowed; the download was abandoned. Retry, "
            f"set {DATA_URL_ENV} to another mirror, or copy the file into {folder}"
        )
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _announced_length(response: requests.Response) -> int | None:
    """The Content-Length a server announced, None when it announced none or nonsense (the body's own
    length is what the limits then hold to)."""
    try:
        return int(response.headers.get("Content-Length") or 0) or None
    except ValueError:
        return None


def _download(url: str, partial: Path, progress: ProgressHook | None, limits: _Limits) -> str:
    digest = hashlib.sha1()
    with _response_headers(url, limits, partial.parent) as response:
        response.raise_for_status()
        total = _announced_length(response)
        if total is not None and total > limits.max_bytes:
            raise _TooMuch(
                f"{url} announces {total:,} bytes but the corpus is {limits.max_bytes:,}; refusing it. Check "
                f"{DATA_URL_ENV}, or copy the right file into {partial.parent}"
            )
        received = 0
        with partial.open("wb") as handle:
            # read1 returns what has arrived (up to 64 KiB), so the deadline is checked between reads
            # even when a server trickles a byte at a time.
            while block := response.raw.read1(1 << 16, decode_content=True):
                received += len(block)
                if received > limits.max_bytes:
                    raise _TooMuch(
                        f"{url} sent more than the corpus's {limits.max_bytes:,} bytes; the download was "
                        f"discarded. Check {DATA_URL_ENV}, or copy the right file into {partial.parent}"
                    )
                if time.monotonic() > limits.deadline:
                    raise _TooMuch(
                        f"downloading {url} took longer than allowed ({received:,} of {total or '?'} bytes "
                        f"received); the download was discarded. Retry, set {DATA_URL_ENV} to a faster "
                        f"mirror, or copy the file into {partial.parent}"
                    )
                handle.write(block)
                digest.update(block)
                if progress is not None:
                    progress(received, total)
            handle.flush()
            os.fsync(handle.fileno())
    return digest.hexdigest()
