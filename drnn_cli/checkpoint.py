"""The checkpoint file format: one safetensors file that can be loaded without running code.

Tensors (weights, optimizer buffers, RNG states, the carried hidden state) are stored as tensors;
everything else (config, vocabulary, counters, optimizer hyper-parameters) is JSON in the header's
metadata. Nothing is ever unpickled, so a crafted file cannot run code; ``torch.save`` / pickle files
are recognised and refused before any parsing. drnn writes the format itself, one tensor at a time
(:func:`write_safetensors`), so that writing a checkpoint holds no copy of it in memory; safetensors
reads it. Where checkpoints live in a run directory, and which one stands for a run, is rundir.py's
business.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import itertools
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from drnn_cli.config import Config, ConfigError, DataConfig, build_config
from drnn_cli.errors import DrnnError
from drnn_cli.files import atomic_write_stream, require_regular_file
from drnn_cli.strict_json import escape_surrogates, is_number
from drnn_cli.trainer_state import SavedCounters, TrainerState, UnusableTrainerState
from drnn_cli.vocab import Vocab, VocabError, check_char_tokens

FORMAT = "drnn-checkpoint"
FORMAT_VERSION = 1
# A checkpoint header is JSON: its config, vocabulary and optimizer hyper-parameters. A word vocabulary
# of a million 20-letter words fits in about 30 MiB; drnn refuses, before training, a vocabulary that
# would not fit (check_header_room), and never writes a header it would not read back.
MAX_HEADER_BYTES = 64 << 20
HEADER_ROOM_KEPT = 4 << 20  # for the config, counters and the optimizer's hyper-parameters
# The most untrained token ids a header records (Checkpoint.untrained_ids), within HEADER_ROOM_KEPT: at
# 9 bytes an id, 1.8 MB; a word vocabulary near the cap with more is recorded as not known (review
# rev41b: 1.2 M ids took a 57 MiB vocabulary's header past the cap, refused at the first checkpoint)
MAX_UNTRAINED_IDS = 200_000
MAX_HEADER_DEPTH = 64
# A header's lists and objects: a few hundred in a real one (each torchrun rank's state adds a few
# dozen); parsing 60 MiB of ``[]`` built 21 million lists (1.9 GB, 7-13 s), so more are refused unparsed
MAX_HEADER_CONTAINERS = 1_000_000
# What _too_many_containers strips before it counts again, once no escaped quote is left to hide an end:
# every string. One repeat, linear in the text (strings matched with their escapes inside were retried from
# every quote of an unclosed one, quadratic, and kept state for each escape: gigabytes over 60 MiB)
JSON_STRING = re.compile(r'"[^"]*"')
# How many fine-tunings back a run records its bases (and drnn eval follows an older run's)
BASES_FOLLOWED = 8
FINITE_CHECK_ELEMENTS = 1 << 22  # the NaN/infinity check's slice on the CPU (16 MiB of fp32)


# ---------------------------------------------------------------------------------------------
# Nested state ↔ (tensors, JSON)


def pack_tree(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}`` and collect it (the
    tensor itself, not a copy: :func:`write_safetensors` copies one at a time where it must)."""
    if isinstance(tree, torch.Tensor):
        key = prefix
        tensors[key] = tree.detach()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__dict__": [[pack_key(k), pack_tree(v, f"{prefix}.{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, list | tuple):
        kind = "__tuple__" if isinstance(tree, tuple) else "__list__"
        return {kind: [pack_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"cannot store {type(tree).__name__} in a checkpoint")


def pack_key(key: Any) -> Any:
    if isinstance(key, bool | int | float | str):
        return key
    raise TypeError(f"cannot store a {type(key).__name__} key in a checkpoint")


def unpack_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {key: unpack_tree(value, tensors) for key, value in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(unpack_tree(value, tensors) for value in tree["__tuple__"])
        if "__list__" in tree:
            return [unpack_tree(value, tensors) for value in tree["__list__"]]
    return tree


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class BaseRecord:
    """A base a fine-tuned run started from (or one before it) as it stood then: which checkpoint, and how
    it cut and spelt its text, so that which of a text's tokens it trained on is known without its file,
    which may since be resumed, replaced (with other splits), moved or deleted (review rev39c: a base
    resumed since made its overlap unknowable, though a resume keeps the splits)."""

    label: str  # its checkpoint's absolute path then
    at: str  # which checkpoint that was (trained_point)
    data: DataConfig  # its data settings: the splits of its text
    corpus_sha1: str | None
    text_sha1: str | None

    @classmethod
    def of(cls, label: str, checkpoint: Checkpoint | CheckpointInfo, at: str) -> BaseRecord:
        """What a run fine-tuned from ``checkpoint`` (at ``label``; which one: ``at``) keeps of it."""
        return cls(label, at, checkpoint.config.data, checkpoint.corpus_sha1, checkpoint.text_sha1)

    def to_header(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "at": self.at,
            "data": self.data.model_dump(mode="json"),
            "corpus_sha1": self.corpus_sha1,
            "text_sha1": self.text_sha1,
        }

    @classmethod
    def from_header(cls, value: Any) -> BaseRecord:
        """One record as :meth:`to_header` wrote it; TypeError or ValueError for anything else (a data
        section without the settings that cut the splits would read as their defaults: review rev40)."""
        if not isinstance(value, dict) or set(value) != {"label", "at", "data", "corpus_sha1", "text_sha1"}:
            raise TypeError("a base record")
        if not isinstance(value["label"], str) or not isinstance(value["at"], str):
            raise TypeError("a base record's label")
        if not isinstance(value["data"], dict) or not set(value["data"]) >= SPLIT_SETTINGS:
            raise TypeError("a base record's data settings")
        return cls(
            label=value["label"],
            at=value["at"],
            data=DataConfig.model_validate(value["data"]),  # pydantic's ValidationError is a ValueError
            corpus_sha1=_optional(value["corpus_sha1"], str),
            text_sha1=_optional(value["text_sha1"], str),
        )


# The data settings that decide a run's splits of its text, which a base record must hold
SPLIT_SETTINGS = frozenset({"preprocess", "token", "max_tokens", "val_fraction", "test_fraction"})


@dataclass(frozen=True)
class ChainCut:
    """Where reading a chain of bases from their files (a checkpoint that recorded none) stopped at a
    base resumed or replaced at its path since: its label, the model fine-tuned from it (None: the
    chain's own), and where the base stood then and stands now (trained_point)."""

    label: str
    whose: str | None
    then: str
    now: str


@dataclass(frozen=True)
class BaseChain:
    """A fine-tuned model's bases, nearest first (up to BASES_FOLLOWED), as far as their splits are known,
    and where that knowledge ends at a base replaced since (``cut``) rather than at the first model."""

    records: tuple[BaseRecord, ...] = ()
    cut: ChainCut | None = None

    def to_header(self) -> dict[str, Any]:
        cut = None if self.cut is None else vars(self.cut)
        return {"records": [record.to_header() for record in self.records], "cut": cut}

    @classmethod
    def from_header(cls, value: Any) -> BaseChain | None:
        """The chain :meth:`to_header` wrote; None where the header has none (drnn recorded none before
        2026-11-29); TypeError or ValueError for anything else."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {"records", "cut"}:
            raise TypeError("bases")
        records, cut = value["records"], value["cut"]
        if not isinstance(records, list) or len(records) > BASES_FOLLOWED:
            raise TypeError("bases")
        if cut is not None:
            if not isinstance(cut, dict) or set(cut) != {"label", "whose", "then", "now"}:
                raise TypeError("bases")
            if not all(isinstance(cut[key], str) for key in ("label", "then", "now")):
                raise TypeError("bases")
            cut = ChainCut(cut["label"], _optional(cut["whose"], str), cut["then"], cut["now"])
        return cls(tuple(BaseRecord.from_header(record) for record in records), cut)


@dataclass
class Checkpoint:
    """Everything needed to decode with a model, evaluate it, or resume its training exactly."""

    config: Config
    vocab: Vocab
    model_state: dict[str, torch.Tensor]
    epoch: int  # completed epochs
    step_in_epoch: int = (
        0  # > 0: written mid-epoch (a signal, a step cadence, a budget); resume skips these minibatches
    )
    best_val_ppl: float | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)  # optimizer, RNG, carried state…
    init_from: str | None = None
    # where init_from's checkpoint stood when this run started from it (trained_point): the file at that
    # path may be another since (the base resumed or replaced), whose training split says nothing of this
    init_from_at: str | None = None
    corpus_sha1: str | None = None  # of the corpus file the splits were cut from
    text_sha1: str | None = None  # of that text as drnn reads it (CorpusSha1s.text), whatever its line breaks
    # a fine-tuned run's bases as they stood when it started (None: a checkpoint written before drnn
    # recorded them, whose bases are read from their files)
    bases: BaseChain | None = None
    # the ids (<unk> aside) that no training split of this model held, its bases' included: their input
    # weights no gradient moved (None: not known, in a checkpoint written before drnn recorded them or
    # fine-tuned from one)
    untrained_ids: tuple[int, ...] | None = None
    read_at: str = ""  # which checkpoint this is (trained_point), as read from its file; "" for one to write

    def trainer(self) -> TrainerState:
        """The trainer state, typed; :class:`~drnn_cli.trainer_state.UnusableTrainerState` names
        the part of a tampered or foreign tree that cannot be continued from."""
        return TrainerState.from_tree(self.trainer_state, self.step_in_epoch)

    def stored(self) -> tuple[bytes, dict[str, torch.Tensor]]:
        """The file's header and the tensors it describes, in order (the live tensors: nothing is
        copied), checked: no NaN or infinity, no header larger than drnn reads back."""
        tensors = {f"model.{name}": value.detach() for name, value in self.model_state.items()}
        packed_state = pack_tree(self.trainer_state, "trainer", tensors)
        bad = first_non_finite(tensors)
        if bad is not None:
            raise NonFiniteCheckpoint(f"{bad} holds NaN or infinite values")
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_val_ppl": self.best_val_ppl,
            "init_from": self.init_from,
            "init_from_at": self.init_from_at,
            "corpus_sha1": self.corpus_sha1,
            "text_sha1": self.text_sha1,
            "bases": None if self.bases is None else self.bases.to_header(),
            "untrained_ids": None if self.untrained_ids is None else list(self.untrained_ids),
            "config": self.config.to_dict(),
            "vocab": self.vocab.tokens_dict(),
            "trainer_state": packed_state,
        }
        tensors = in_stored_order(tensors)
        # a path that is not UTF-8 (a lone surrogate in Python) is written escaped, and read back as it was
        head = safetensors_header(
            tensors, {"drnn": escape_surrogates(json.dumps(header, ensure_ascii=False))}
        )
        header_bytes = len(head) - 8
        if header_bytes > MAX_HEADER_BYTES:  # what the reader would refuse is never written
            raise DrnnError(f"the checkpoint's header would be {_mib(header_bytes)}, {_over_the_cap()}")
        return head, tensors


def in_stored_order(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` in the order safetensors' own writer stores them: wider elements first (so every
    tensor's bytes start aligned to its element size), then by name."""

    def rank(dtype: torch.dtype) -> int:  # one drnn cannot store goes last: the header names it
        return _STORED_ORDER.index(dtype) if dtype in _STORED_ORDER else len(_STORED_ORDER)

    return dict(sorted(tensors.items(), key=lambda item: (rank(item[1].dtype), item[0])))


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's first bytes for ``tensors`` stored back to back in this order: the
    header's length (8 bytes, little-endian), then its JSON — each tensor's dtype, shape and byte
    range, and ``metadata`` — padded with spaces to a multiple of 8 bytes, as the format asks."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"cannot store a {tensor.dtype} tensor in a checkpoint")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(stream: BinaryIO, head: bytes, tensors: dict[str, torch.Tensor]) -> None:
    """``head`` (:func:`safetensors_header`), then each tensor's bytes in its order. A tensor on the
    CPU is written from its own memory; one elsewhere (a GPU) or strided is copied, one at a time."""
    stream.write(head)
    for tensor in tensors.values():
        flat = tensor.to("cpu").resolve_neg().contiguous().reshape(-1)
        size = flat.numel() * flat.element_size()
        if size:
            # raw bytes in memory order: little-endian on every platform PyTorch ships for, as the
            # format asks; read in place through ctypes, as NumPy is not one of drnn's dependencies
            stream.write((ctypes.c_ubyte * size).from_address(flat.data_ptr()))


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _over_the_cap() -> str:
    return f"more than the {_mib(MAX_HEADER_BYTES)} drnn reads back; raise data.min_freq to keep fewer tokens"


def check_header_room(vocab: Vocab) -> None:
    """Refuse, before training, a vocabulary too large for a checkpoint header (a word text with
    millions of distinct words): the run would train, then write checkpoints nothing can load."""
    # the vocabulary as the header holds it: JSON inside the JSON string of safetensors' metadata
    size = len(json.dumps(json.dumps(vocab.tokens_dict(), ensure_ascii=False), ensure_ascii=False).encode())
    if size > MAX_HEADER_BYTES - HEADER_ROOM_KEPT:
        raise DrnnError(
            f"the vocabulary of {len(vocab):,} tokens would make a checkpoint header of {_mib(size)}, "
            f"{_over_the_cap()}"
        )


class NonFiniteCheckpoint(DrnnError):
    """A checkpoint would hold a NaN or infinite tensor: it is never written, and never loaded."""


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinity, or None. On the CPU a
    slice at a time (``isfinite`` makes temporaries several times its input's size); elsewhere whole,
    one read back per tensor."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.reshape(-1)
        step = FINITE_CHECK_ELEMENTS if flat.device.type == "cpu" else max(flat.numel(), 1)
        for start in range(0, flat.numel(), step):
            if not bool(torch.isfinite(flat[start : start + step]).all()):
                return name
    return None


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically, tensor by tensor; a refusal (NonFiniteCheckpoint, a header
    too large) leaves whatever ``path`` held untouched."""
    try:
        head, tensors = checkpoint.stored()
    except NonFiniteCheckpoint as exc:
        raise NonFiniteCheckpoint(f"refused to write {path}: {exc}") from None
    atomic_write_stream(path, lambda stream: write_safetensors(stream, head, tensors))


def _looks_like_pickle(head: bytes) -> bool:
    """torch.save writes a zip archive; raw pickles (protocol 2+) start with PROTO."""
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in {b"\x02", b"\x03", b"\x04", b"\x05"}
    )


class CorruptCheckpoint(DrnnError):
    """A checkpoint file drnn cannot read as one of its own. ``problem`` says what is wrong; the message
    adds the way on that suits most commands, which ``--resume`` (no other file to pick) replaces."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; retrain or pick another file")
        self.problem = problem


def _corrupt(path: Path, why: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {path} is corrupt ({why})")


def _not_a_checkpoint(path: Path, opened: bool = False) -> CorruptCheckpoint:
    """``opened``: safetensors opened the file, which it does only when the file holds every byte its
    header announces, so the header need not be read again to tell whether the file was cut short."""
    cut = None if opened else _cut_short(path)
    return cut or CorruptCheckpoint(f"checkpoint {path} is corrupt or not a drnn checkpoint")


def _cut_short(path: Path) -> CorruptCheckpoint | None:
    """A file shorter than its own header says (a copy or a write that did not finish, a full disk
    under another tool): named as such, with both sizes. None when the header cannot tell."""
    try:
        with path.open("rb") as stream:
            (header_bytes,) = struct.unpack("<Q", stream.read(8))
            text = stream.read(min(header_bytes, MAX_HEADER_BYTES)).decode("utf-8")
        if _too_many_containers(text):
            return None
        entries = json.loads(text)
        end = (
            8
            + header_bytes
            + max(entry["data_offsets"][1] for name, entry in entries.items() if name != "__metadata__")
        )
        size = path.stat().st_size
    except Exception:  # no readable header: not a drnn checkpoint, or cut inside its header
        return None
    if not isinstance(end, int) or size >= end:
        return None
    return CorruptCheckpoint(
        f"checkpoint {path} is cut short: it holds {size:,} of the {end:,} bytes its header announces"
    )


def _check_leading_bytes(path: Path) -> None:
    """Refuse pickles, and headers above drnn's cap, from the first 8 bytes alone.

    safetensors itself accepts headers up to 100 MB and parses them in full when the file is opened,
    so drnn's smaller cap has to be checked on the header length before ``safe_open`` runs.
    """
    try:
        with path.open("rb") as stream:
            head = stream.read(8)
    except OSError as exc:
        raise DrnnError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if _looks_like_pickle(head):
        raise DrnnError(
            f"{path} is a pickle/torch.save file, which can execute code when loaded; drnn refuses it "
            f"and loads only its own safetensors checkpoints"
        )
    # A header's length fills 8 bytes little-endian, its last ones zero: printable bytes there are text
    # (and fewer than 8 of them, a note of a word or two: no checkpoint is that short).
    if head and all((byte >= 0x20 and byte != 0x7F) or byte in b"\t\n\r" for byte in head):
        raise DrnnError(
            f"{path} is a text file, not a drnn checkpoint (.safetensors): --checkpoint and --init-from take "
            "a run directory or a checkpoint in one; a text to train on goes to data.path, one to evaluate "
            "to drnn eval --data"
        )
    if len(head) < 8:
        raise _not_a_checkpoint(path)
    header_bytes = struct.unpack("<Q", head)[0]
    if header_bytes > MAX_HEADER_BYTES:
        raise DrnnError(
            f"checkpoint {path} declares a header of {_mib(header_bytes)}, more than the {_mib(MAX_HEADER_BYTES)} "
            "drnn reads (drnn writes none that large); it is corrupt or not a drnn checkpoint"
        )


@contextlib.contextmanager
def _open_checkpoint(path: Path) -> Iterator[Any]:
    """A ``safe_open`` handle on ``path`` (memory-mapped: tensors are read only when asked for)."""
    require_regular_file(path, "checkpoint", "train first or pass --run DIR / --checkpoint FILE")
    _check_leading_bytes(path)
    try:
        name = os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:  # safetensors takes a Rust string: its open refused the file as "corrupt"
        raise DrnnError(
            f"cannot read checkpoint {path}: safetensors opens only files whose path is UTF-8; rename it, "
            "or point to it through a symlink with a UTF-8 path"
        ) from None
    try:
        handle = safe_open(name, framework="pt", device="cpu")
    except OSError as exc:
        raise DrnnError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    except Exception:  # safetensors raises its own error types for every malformation of the header
        raise _not_a_checkpoint(path) from None
    with handle:
        yield handle


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's header: everything but the tensors, read without materialising any of them."""

    config: Config
    vocab: Vocab
    epoch: int
    step_in_epoch: int
    best_val_ppl: float | None
    init_from: str | None
    init_from_at: str | None  # None in a checkpoint written before drnn recorded it, or trained from scratch
    corpus_sha1: str | None
    text_sha1: str | None  # None in a checkpoint written before drnn recorded it
    bases: BaseChain | None  # Checkpoint.bases
    untrained_ids: tuple[int, ...] | None  # Checkpoint.untrained_ids
    packed_trainer_state: Any  # JSON, its tensors as {"__tensor__": name} (unpack_tree)
    shapes: dict[str, tuple[int, ...]]  # every tensor's shape, as the safetensors header claims
    header_sha1: str = ""  # of drnn's metadata as stored: which checkpoint this is, exactly

    def counters(self) -> SavedCounters:
        """The trainer state's counters (steps, patience, training time), its tensors left unread;
        :class:`UnusableTrainerState` where the header's tree is not one drnn wrote."""
        try:
            tree = unpack_tree(self.packed_trainer_state, _UnreadTensors())
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
            raise UnusableTrainerState("the trainer state is not a tree drnn packs") from None
        return SavedCounters.from_tree(tree, self.step_in_epoch)


class _UnreadTensors(dict):
    """Stands in for a header's tensors: every ``{"__tensor__": name}`` unpacks to None."""

    def __missing__(self, key: str) -> None:
        return None


def trained_point(info: CheckpointInfo) -> str:
    """Which checkpoint this is, as a fine-tuned run records its base: its step and training seconds, to
    read, and its header's SHA-1, to compare exactly ("step 721 after 312.408 s, header 3f0c9a1b2c4d"; two
    1-step runs shared their milliseconds: review rev39c). A base resumed or replaced at the same path
    has another header; one that kept training without a better validation kept its best's."""
    try:
        counters = info.counters()
        at = f"step {counters.global_step:,}" if counters.global_step is not None else f"epoch {info.epoch}"
        point = f"{at} after {counters.elapsed:.3f} s, "
    except UnusableTrainerState:
        point = ""
    return f"{point}header {info.header_sha1[:12]}"


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """The header of the checkpoint at ``path``, with every refusal :func:`load_checkpoint` makes on it."""
    with _open_checkpoint(path) as handle, _collector_paused():
        return _read_info(path, handle)


def _read_info(path: Path, handle: Any) -> CheckpointInfo:
    """The drnn metadata of an open safetensors file, parsed as JSON and never executed."""
    try:
        text = (handle.metadata() or {})["drnn"]
        if _too_many_containers(text):
            raise ValueError("more lists and objects than a drnn header holds")
        drnn = json.loads(text)
        names: list[str] = handle.keys()  # a safe_open handle is not iterable itself
        shapes = {name: tuple(int(size) for size in handle.get_slice(name).get_shape()) for name in names}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's stack
        raise _not_a_checkpoint(path, opened=True) from None
    if not isinstance(drnn, dict) or drnn.get("format") != FORMAT or _too_deep(drnn, MAX_HEADER_DEPTH):
        raise _not_a_checkpoint(path, opened=True)
    if drnn.get("version") != FORMAT_VERSION:
        raise DrnnError(
            f"checkpoint {path} has format version {drnn.get('version')}; this drnn reads {FORMAT_VERSION}"
        )
    try:
        config = build_config(drnn["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise DrnnError(f"checkpoint {path} holds an invalid config ({exc})") from None
    try:
        vocab = Vocab.from_dict(drnn["vocab"])
        if config.data.token == "char":
            check_char_tokens(vocab.idx_to_token)
    except VocabError as exc:
        raise _corrupt(path, f"its vocabulary: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _corrupt(path, "unreadable vocabulary") from None
    try:
        return CheckpointInfo(
            config=config,
            vocab=vocab,
            epoch=_header_count(drnn["epoch"]),
            step_in_epoch=_header_count(drnn.get("step_in_epoch", 0)),
            best_val_ppl=_optional(drnn.get("best_val_ppl"), float),
            init_from=_optional(drnn.get("init_from"), str),
            init_from_at=_optional(drnn.get("init_from_at"), str),
            corpus_sha1=_optional(drnn.get("corpus_sha1"), str),
            text_sha1=_optional(drnn.get("text_sha1"), str),
            bases=BaseChain.from_header(drnn.get("bases")),
            untrained_ids=_token_ids(drnn.get("untrained_ids"), len(vocab)),
            packed_trainer_state=drnn.get("trainer_state", {}),
            shapes=shapes,
            header_sha1=hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest(),
        )
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, "a header field missing or of the wrong type") from None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while a header is parsed and read: a hostile header's
    millions of small lists made it scan them again and again (seconds, where the parse takes one);
    they are freed by reference counting as the read ends."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _header_count(value: Any) -> int:
    """A header's count of epochs or steps: a whole number ≥ 0 (int() would also take 2.7, "3" or -3)."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is no count")
    return value


def _token_ids(value: Any, vocab_size: int) -> tuple[int, ...] | None:
    """A header's list of token ids, <unk> (0) aside: increasing whole numbers below ``vocab_size``."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise TypeError("token ids")
    if any(not 0 < i < vocab_size for i in value) or any(a >= b for a, b in itertools.pairwise(value)):
        raise ValueError("token ids")
    return tuple(value)


def _optional(value: Any, kind: type[float] | type[str]) -> Any:
    """``value`` as ``kind`` (an int stands for a float), or None; any other type is a corrupt header."""
    if value is None:
        return None
    if kind is float and is_number(value):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(f"{type(value).__name__} where a {kind.__name__} belongs")


def _too_many_containers(text: str) -> bool:
    """Whether the JSON ``text`` opens more lists and objects than :data:`MAX_HEADER_CONTAINERS`, judged
    before it is parsed: a hostile header's millions of ``[]`` cost gigabytes once built. Brackets inside
    strings (a vocabulary's tokens) are not containers: they are stripped before a second count, which
    only a text with that many brackets pays for."""
    if text.count("[") + text.count("{") <= MAX_HEADER_CONTAINERS:
        return False
    # an escaped backslash first, left to right as JSON reads them (in ``\\"`` the quote ends the
    # string; in ``\\\"`` it is escaped), then an escaped quote: no quote left inside a string
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    outside_strings = JSON_STRING.sub("", unescaped)
    return outside_strings.count("[") + outside_strings.count("{") > MAX_HEADER_CONTAINERS


def _too_deep(tree: Any, limit: int) -> bool:
    """Whether ``tree`` (parsed JSON: plain dicts and lists) nests more than ``limit`` levels, checked a
    level at a time without recursion: one pass over a hostile header's millions of ``[]``."""
    level = [tree] if type(tree) in (dict, list) else []
    depth = 0
    while level:
        if depth > limit:
            return True
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in (dict, list)
        ]
        depth += 1
    return False


def expected_model_shapes(config: Config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes ``config`` implies, from a model built on the meta device (no memory)."""
    return {name: tuple(value.shape) for name, value in _meta_model_state(config, vocab_size).items()}


def _meta_model_state(config: Config, vocab_size: int) -> dict[str, torch.Tensor]:
    """The state ``config``'s model has, its tensors on the meta device (shapes and dtypes, no memory)."""
    from drnn_cli.models import build_model  # models imports config only; kept local to stay light

    with torch.device("meta"):
        return build_model(vocab_size, config.model).state_dict()


# safetensors' dtype names, for the shapes a weights-only read stands in for the trainer's tensors
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # what the writer calls them
# safetensors' order of the dtypes in a file (its Dtype enum, descending): alignment, widest first
_STORED_ORDER = [
    _DTYPES[name] for name in ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
]
# Smaller trainer tensors (counters, a scaler's scale) are read even then: some are read as numbers.
STAND_IN_ELEMENTS = 4096


def _stand_ins(handle: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The trainer's large tensors as shapes on the meta device, for a read that needs the model alone."""
    stand_ins = {}
    for name, shape in shapes.items():
        dtype = _DTYPES.get(handle.get_slice(name).get_dtype())
        if not name.startswith("model.") and math.prod(shape) > STAND_IN_ELEMENTS and dtype is not None:
            stand_ins[name] = torch.empty(shape, dtype=dtype, device="meta")
    return stand_ins


def load_checkpoint(path: Path, device: torch.device | str = "cpu", weights_only: bool = False) -> Checkpoint:
    """Read a checkpoint onto ``device`` (a GPU-trained one loads fine on a CPU-only machine).

    Before any tensor is materialised, the model shapes the header's config implies are compared
    with the shapes the file holds, so a small file claiming a huge model is refused without
    allocating it; a tensor holding NaN or infinity is refused after reading. ``weights_only``
    (predict, eval, inspect) reads the model's tensors and the trainer's small ones; its large ones
    (an optimizer's moments are twice the model) stand in as shapes on the meta device.
    """
    with _open_checkpoint(path) as handle:
        with _collector_paused():
            info = _read_info(path, handle)
        stored = {
            name: handle.get_slice(name).get_dtype() for name in info.shapes if name.startswith("model.")
        }
        _check_model_tensors(path, info.config, len(info.vocab), info.shapes, stored)
        try:
            stand_ins = _stand_ins(handle, info.shapes) if weights_only else {}
            tensors = {name: handle.get_tensor(name) for name in info.shapes if name not in stand_ins}
        except Exception:  # safetensors raises its own error types for every malformation
            raise _cut_short(path) or _corrupt(path, "tensor data unreadable") from None
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteCheckpoint(
            f"checkpoint {path} holds NaN or infinite values ({bad}); it cannot be used: retrain, or use "
            f"another checkpoint"
        )
    tied = ("model.embedding.weight", "model.decoder.weight")
    if info.config.model.tie_weights and not torch.equal(tensors[tied[0]], tensors[tied[1]]):
        # one matrix the file stores twice: two that differ would load as whichever came last
        raise _corrupt(path, "model.tie_weights, yet its embedding and output weights differ")
    tensors = {key: value.to(device) for key, value in tensors.items()} | stand_ins
    model_state = {key[len("model.") :]: value for key, value in tensors.items() if key.startswith("model.")}
    try:
        trainer_state = unpack_tree(info.packed_trainer_state, tensors)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _corrupt(path, "a header field missing or of the wrong type") from None
    return Checkpoint(
        config=info.config,
        vocab=info.vocab,
        model_state=model_state,
        epoch=info.epoch,
        step_in_epoch=info.step_in_epoch,
        best_val_ppl=info.best_val_ppl,
        trainer_state=trainer_state,
        init_from=info.init_from,
        init_from_at=info.init_from_at,
        corpus_sha1=info.corpus_sha1,
        text_sha1=info.text_sha1,
        bases=info.bases,
        untrained_ids=info.untrained_ids,
        read_at=trained_point(info),
    )


def _check_model_tensors(
    path: Path, config: Config, vocab_size: int, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]
) -> None:
    """The model's tensors as its config builds them: each shape (before any is read: a small file that
    claims a huge model allocates nothing), and each dtype as safetensors names it (an F32 weight relabelled
    I32 loaded its bit patterns, about 10⁹, cast into the parameter without a word: red41)."""
    state = _meta_model_state(config, vocab_size)
    expected = {name: tuple(value.shape) for name, value in state.items()}
    held = {key[len("model.") :]: shape for key, shape in shapes.items() if key.startswith("model.")}
    for name in sorted(set(expected) | set(held)):
        if expected.get(name) != held.get(name):
            raise CorruptCheckpoint(
                f"checkpoint {path} does not match its own model config: {name} should have shape "
                f"{expected.get(name)} but the file holds {held.get(name)}; it is corrupt"
            )
    for name, value in state.items():
        written = _DTYPE_NAMES.get(value.dtype)
        if dtypes[f"model.{name}"] != written:
            raise _corrupt(path, f"model.{name} is stored as {dtypes[f'model.{name}']}, not {written}")
