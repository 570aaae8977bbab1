"""Which process of a ``torchrun`` job says an error, and how its line names that process.

The processes of a job meet an error made by the command line, the config or the files of their node
alike, and each printed it: a config error showed once per process. Under torchrun a node's local
rank 0 says an error at once; every other process waits up to :data:`PEER_ERROR_WAIT_S` for a signal
first. torchrun sends one (SIGTERM) to every process left as soon as one exits: when local rank 0 met
the error too, it says it and exits, the signal comes, and the waiting process ends without a word.
When it does not come, local rank 0 is past the point where this process failed (waiting for it to
join the process group, or in a collective): the error is this process's own (its node's missing
file, its GPU's memory), and it says it, naming its rank and host.

No collective decides it: a process that failed before the process group exists cannot take part in
one, and one that failed after it cannot know which collective the others are in. Nor does a process
that stays quiet exit before local rank 0 has said the line: the exit would make torchrun end local
rank 0 (SIGTERM) before it prints, and the error would be said by no one.
"""

from __future__ import annotations

import os
import socket

from drnn_cli.signals import TORCHRUN_ENV, launched_local_rank, launched_rank

# How long a torchrun worker other than its node's local rank 0 waits for torchrun's signal before it
# says its error: the ranks of one node meet the same error within a fraction of a second (each
# imports torch and reads the config alike; after the process group exists they move together), and
# torchrun looks at its workers every 0.1 s. An error of this process alone is said this much later.
PEER_ERROR_WAIT_S = 5.0


def waits_before_saying() -> bool:
    """Whether this process waits for torchrun's signal before it says an error: a torchrun worker that
    is not its node's local rank 0 (alone, or a process group started by hand, every process says it)."""
    return TORCHRUN_ENV in os.environ and launched_local_rank() != 0


def rank_origin() -> str:
    """What an error line says of the process it comes from: nothing alone or from rank 0 (the process
    that speaks for a torchrun job), else ``rank 1 of 2 on host gpu7: ``."""
    rank = launched_rank()
    if rank == 0:
        return ""
    world = os.environ.get("WORLD_SIZE", "")
    of = f" of {world}" if world.isdigit() else ""
    return f"rank {rank}{of} on host {socket.gethostname()}: "
