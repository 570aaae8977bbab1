"""Where computation runs: device choice, autocast precision, and the distributed process group."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from drnn_cli.errors import DrnnError
from drnn_cli.rank_errors import waits_before_saying
from drnn_cli.signals import TORCHRUN_ENV, launched_rank

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice: str, local_rank: int = 0, source: str = "--device") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is a clear error.

    ``source``: where the choice came from (``--device``, or the config's ``train.device``), named in
    the error so that it points at what the user wrote.
    """
    if choice not in {"auto", "cpu", "cuda"}:  # the CLI's and the config's choices are these three
        raise DrnnError(f"{source} {choice!r} is no device; use auto, cpu or cuda")
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if choice == "auto":
            return torch.device("cpu")
        raise DrnnError(
            f"{source} {choice}: CUDA is not available here (torch {torch.__version__}); "
            + (
                "use --device cpu or auto"
                if source == "--device"
                else f"set {source} to cpu or auto, or pass --device cpu"
            )
        )
    return torch.device("cuda", local_rank)


def autocast(
    device: torch.device, precision: str, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16/fp16 autocast, or nothing for fp32.

    ``cache_enabled=False`` inside a CUDA graph capture: cached weight casts must not outlive it.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(
        device_type=device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=cache_enabled
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def device_description(device: torch.device) -> str:
    """The device as a run's first line names it: on a CPU with its thread count, which decides the
    speed of a small model on a busy machine (OMP_NUM_THREADS: README Quickstart)."""
    if device.type != "cpu":
        return device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group (and DDP) even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched


def init_distributed(device_choice: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU).

    ``torchrun --nproc_per_node 1`` joins one too (torchrun sets TORCHELASTIC_RUN_ID), so a single
    GPU runs the very path a multi-GPU job takes: NCCL, DistributedDataParallel, the stop votes.
    """
    world_size = _whole_number("WORLD_SIZE", "1")
    launched = TORCHRUN_ENV in os.environ
    if world_size <= 1 and not launched:
        return DistContext()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # a WORLD_SIZE left in the environment, not a launcher's: torch's error read as drnn's bug
        raise DrnnError(
            f"WORLD_SIZE is {world_size}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            'set: start several processes with torchrun (README "Several processes, GPUs or nodes"), or '
            "unset WORLD_SIZE to train in one"
        )
    _whole_number("RANK", "0")
    rank = launched_rank()
    local_rank = _whole_number("LOCAL_RANK", "0")
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if not torch_dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, launched=launched)


def _whole_number(name: str, default: str) -> int:
    """An environment variable torchrun sets (WORLD_SIZE=, or a word, left by a job script otherwise)."""
    value = os.environ.get(name) or default
    try:
        return int(value)
    except ValueError:
        raise DrnnError(
            f"{name} is {value!r}, not a whole number: torchrun sets it for the processes it starts; unset it "
            "to train in one process"
        ) from None


LEAVE_WAIT = timedelta(seconds=60)  # how long rank 0 waits for the others to leave the group


def shutdown_distributed(context: DistContext, finished: bool = False) -> None:
    """Leave the process group. After a finished run, first wait for every rank (rank 0 still writes
    samples and the summary when the others are done), then leave one side at a time: a rank that
    tears down its gloo pairs while a peer is tearing down its own can abort at exit ("terminate called
    without an active exception", and torchrun fails a finished run: seen once in a CI run of six
    two-process runs sharing 2 cores, with the barrier alone). The others leave first and say so in
    the rendezvous store, which outlives the group; rank 0 leaves once all have (or after
    ``LEAVE_WAIT``). After a failure, at once, but for a worker that waits before saying its error."""
    if not (context.enabled and torch_dist.is_initialized()):
        return
    if not finished:
        if not waits_before_saying():
            torch_dist.destroy_process_group()
        # else the group is kept until this worker exits: it waits to learn whether local rank 0 meets
        # its error too (drnn_cli.rank_errors), and leaving the group would end a collective local rank 0
        # waits in, whose one line ("another process ... is gone") was all the job said
        return
    torch_dist.barrier()
    store = torch_dist.distributed_c10d._get_default_store()
    if context.rank != 0:
        torch_dist.destroy_process_group()
        store.set(f"drnn/left/{context.rank}", "1")
        return
    with contextlib.suppress(RuntimeError):  # a rank that never says so: leave after the wait anyway
        store.wait([f"drnn/left/{rank}" for rank in range(1, context.world_size)], LEAVE_WAIT)
    torch_dist.destroy_process_group()


def wait_for_every_rank(context: DistContext) -> None:
    """Under torchrun, return once every rank has called this (a barrier); alone, at once."""
    if context.enabled and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """``tensor`` summed over every rank, in place (each rank's own without torchrun): one collective,
    whose result every rank holds to the bit."""
    if context.enabled:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def votable_digest(data: bytes) -> float:
    """48 bits of a digest of ``data``: exact as the float64 a vote carries, so ranks compare contents."""
    return float(int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "big"))


# What names_that_differ reports where the ranks compare other names (another drnn on some node)
OTHER_NAMES = "the settings drnn knows"


def names_that_differ(values: dict[str, str], context: DistContext, device: torch.device) -> list[str]:
    """The names in ``values`` whose value is not the same on every rank of a torchrun job (none without
    one): each value's 48-bit digest (exact in float64), its largest and smallest over the ranks. The
    names are compared first, in collectives of one size on every rank: ranks of other drnn versions
    pass other lists, and collectives of other sizes abort in gloo ("Received data size doesn't match")
    or hang in NCCL; there ``[OTHER_NAMES]``."""
    if not context.enabled:
        return []
    ((lowest, highest),) = rank_extremes([votable_digest("\n".join(values).encode())], context, device)
    if lowest != highest:
        return [OTHER_NAMES]
    extremes = rank_extremes([votable_digest(value.encode()) for value in values.values()], context, device)
    return [name for name, (low, high) in zip(values, extremes, strict=True) if low != high]


def rank_extremes(
    values: list[float], context: DistContext, device: torch.device
) -> list[tuple[float, float]]:
    """Each of ``values``' smallest and largest over the ranks (each rank's own without torchrun): where
    the two differ, the ranks disagree. Two collectives for them all; every rank passes as many values,
    in float64 (a step count, a 48-bit digest: exact)."""
    if not context.enabled:
        return [(value, value) for value in values]
    highest = torch.tensor(values, dtype=torch.float64, device=device)
    lowest = -highest
    torch_dist.all_reduce(highest, op=torch_dist.ReduceOp.MAX)
    torch_dist.all_reduce(lowest, op=torch_dist.ReduceOp.MAX)  # minus the smallest
    return [(-low, high) for low, high in zip(lowest.tolist(), highest.tolist(), strict=True)]


def vote_max(value: float, context: DistContext, device: torch.device) -> float:
    """The largest ``value`` any rank holds (each rank's own without torchrun): how ranks agree on a
    stop, so that all of them stop after the same step (else the next all-reduce would hang), or on a
    validation perplexity. One collective and one host read; float64, so a perplexity keeps its digits."""
    if not context.enabled:
        return value
    votes = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(votes, op=torch_dist.ReduceOp.MAX)
    return votes.item()
