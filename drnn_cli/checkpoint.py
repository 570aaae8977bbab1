"""Checkpoints and run directories: atomic writes, loads that cannot execute code, the latest run.

A checkpoint is one safetensors file. Tensors (weights, optimizer buffers, RNG states, the carried
hidden state) are stored as tensors; everything else (config, vocabulary, counters, optimizer
hyper-parameters) is JSON in the header's metadata. Nothing is ever unpickled, so a crafted file
cannot run code; ``torch.save`` / pickle files are recognised and refused before any parsing.

Run directory layout::

    runs/<name>/
      config.yaml        resolved config of the run
      vocab.json         the vocabulary
      last.safetensors   the newest consistent state (resumable)
      best.safetensors   the best validation perplexity so far (only with a validation split)
      metrics.jsonl      one JSON line per epoch
      perplexity.png     train/validation perplexity against epoch
      train.lock         present while a training process owns the directory
    runs/latest          the path of the most recently started run
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from drnn_cli.config import Config, ConfigError, build_config
from drnn_cli.errors import DrnnError
from drnn_cli.vocab import Vocab

FORMAT = "drnn-checkpoint"
FORMAT_VERSION = 1
LAST = "last.safetensors"
BEST = "best.safetensors"
RUNS_ROOT = Path("runs")
LATEST_MARKER = "latest"


# ---------------------------------------------------------------------------------------------
# Atomic files


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A crash at any point leaves either the old file or the new one, never a mixture.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(handle, 0o666 & ~umask)  # mkstemp's 0600 would hide runs from the rest of a shared team
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Nested state ↔ (tensors, JSON)


def pack_tree(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}`` and collect it."""
    if isinstance(tree, torch.Tensor):
        key = prefix
        tensors[key] = tree.detach().to("cpu", copy=True).contiguous()
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


@dataclass
class Checkpoint:
    """Everything needed to decode with a model, evaluate it, or resume its training exactly."""

    config: Config
    vocab: Vocab
    model_state: dict[str, torch.Tensor]
    epoch: int  # completed epochs
    step_in_epoch: int = 0  # > 0: written mid-epoch (signal); resume skips these minibatches
    best_val_ppl: float | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)  # optimizer, RNG, carried state…
    init_from: str | None = None
    corpus_sha1: str | None = None  # of the corpus file the splits were cut from

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name, value in self.model_state.items():
            tensors[f"model.{name}"] = value.detach().to("cpu", copy=True).contiguous()
        packed_state = pack_tree(self.trainer_state, "trainer", tensors)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_val_ppl": self.best_val_ppl,
            "init_from": self.init_from,
            "corpus_sha1": self.corpus_sha1,
            "config": self.config.to_dict(),
            "vocab": self.vocab.to_dict(),
            "trainer_state": packed_state,
        }
        return save_safetensors(tensors, metadata={"drnn": json.dumps(header, ensure_ascii=False)})


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    atomic_write_bytes(path, checkpoint.to_bytes())


def _looks_like_pickle(head: bytes) -> bool:
    """torch.save writes a zip archive; raw pickles (protocol 2+) start with PROTO."""
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in {b"\x02", b"\x03", b"\x04", b"\x05"}
    )


def _read_header(path: Path, payload: bytes) -> dict[str, Any]:
    """The drnn metadata of a safetensors file, parsed as JSON and never executed.

    Files that are not drnn checkpoints are refused; pickles (which could run code when loaded)
    are named as such, and nothing in them is ever interpreted.
    """
    drnn = _parse_metadata(payload)
    if drnn is None:
        if _looks_like_pickle(payload[:8]):
            raise DrnnError(
                f"{path} is a pickle/torch.save file, which can execute code when loaded; drnn refuses it "
                f"and loads only its own safetensors checkpoints"
            )
        raise DrnnError(
            f"checkpoint {path} is corrupt or not a drnn checkpoint; retrain or pick another file"
        )
    if drnn.get("version") != FORMAT_VERSION:
        raise DrnnError(
            f"checkpoint {path} has format version {drnn.get('version')}; this drnn reads {FORMAT_VERSION}"
        )
    return drnn


def _parse_metadata(payload: bytes) -> dict[str, Any] | None:
    if len(payload) < 8:
        return None
    (length,) = struct.unpack("<Q", payload[:8])
    if length > len(payload) - 8:
        return None
    try:
        header = json.loads(payload[8 : 8 + length])
        drnn = json.loads(header["__metadata__"]["drnn"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(drnn, dict) or drnn.get("format") != FORMAT:
        return None
    return drnn


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint onto ``device`` (a GPU-trained one loads fine on a CPU-only machine)."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise DrnnError(f"checkpoint {path} does not exist; train first or pass --run/--checkpoint") from None
    except IsADirectoryError:
        raise DrnnError(f"{path} is a directory; pass it with --run, or name a .safetensors file") from None
    except OSError as exc:
        raise DrnnError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    header = _read_header(path, payload)
    try:
        tensors = load_safetensors(payload)
    except Exception:  # safetensors raises its own error types for every malformation
        raise DrnnError(
            f"checkpoint {path} is corrupt (tensor data unreadable); retrain or pick another"
        ) from None
    tensors = {key: value.to(device) for key, value in tensors.items()}
    try:
        config = build_config(header["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise DrnnError(f"checkpoint {path} holds an invalid config ({exc})") from None
    model_state = {key[len("model.") :]: value for key, value in tensors.items() if key.startswith("model.")}
    try:
        return Checkpoint(
            config=config,
            vocab=Vocab.from_dict(header["vocab"]),
            model_state=model_state,
            epoch=int(header["epoch"]),
            step_in_epoch=int(header.get("step_in_epoch", 0)),
            best_val_ppl=header.get("best_val_ppl"),
            trainer_state=unpack_tree(header.get("trainer_state", {}), tensors),
            init_from=header.get("init_from"),
            corpus_sha1=header.get("corpus_sha1"),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DrnnError(
            f"checkpoint {path} is corrupt (incomplete header); retrain or pick another file"
        ) from None


# ---------------------------------------------------------------------------------------------
# Run directories


def default_run_dir(config_path: Path) -> Path:
    return RUNS_ROOT / config_path.stem


def mark_latest(run_dir: Path) -> None:
    atomic_write_text(RUNS_ROOT / LATEST_MARKER, str(run_dir.resolve()) + "\n")


def latest_run() -> Path:
    marker = RUNS_ROOT / LATEST_MARKER
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except OSError:
        raise DrnnError(
            f"no run to use: {marker} does not exist; train one first (drnn train --config configs/quick.yaml) "
            f"or pass --run DIR / --checkpoint FILE"
        ) from None
    return Path(text)


def run_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that stands for a run: best by validation if there is one, else the last."""
    if not run_dir.is_dir():
        raise DrnnError(f"run directory {run_dir} does not exist; pass an existing --run DIR")
    for name in (BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    raise DrnnError(f"run directory {run_dir} holds no checkpoint ({BEST} or {LAST}); train it first")


def resolve_checkpoint(run: Path | None, checkpoint: Path | None) -> Path:
    if run is not None and checkpoint is not None:
        raise DrnnError("pass either --run or --checkpoint, not both")
    if checkpoint is not None:
        return checkpoint
    return run_checkpoint(run if run is not None else latest_run())


class RunLock:
    """Exclusive ownership of a run directory by one training process.

    The lock file holds ``host pid``; a lock left by a process that no longer runs on this host is
    stale and taken over, so a crash never leaves a run stuck.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "train.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._owner_alive():
                    owner = self.path.read_text(encoding="utf-8", errors="replace").strip()
                    raise DrnnError(
                        f"run directory {self.path.parent} is in use by another training ({owner}); wait for "
                        f"it to finish or choose another --run DIR"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(descriptor, "w") as stream:
                stream.write(me + "\n")
            self.held = True
            return
        raise DrnnError(f"cannot take the lock {self.path}; remove it if no training is running")

    def _owner_alive(self) -> bool:
        try:
            host, pid_text = self.path.read_text(encoding="utf-8").split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return True  # another machine's process: assume alive, it is not ours to judge
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
