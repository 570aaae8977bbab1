"""``model.impl: fused`` — the LSTM, GRU and RNN recurrences as Triton kernels that run many timesteps
per launch.

Why: at batch 32 a GPU step is bound by kernel launches, not arithmetic. cuDNN launches a few kernels
per timestep and layer; even as one CUDA graph the step is hundreds of dependent nodes. Here the input
projection of all timesteps stays one matrix product (``F.linear``), and the recurrence runs inside a
single *persistent* kernel per layer: the hidden units are split across programs (one per streaming
multiprocessor at most), each program keeps its slice of the cell state and reads only its rows of
``W_hh``, and the programs exchange ``h_t`` through global memory, meeting at a grid-wide barrier once
per timestep (Diamos et al., 2016, "Persistent RNNs"). The backward pass does the same in reverse for
``dh``; the weight gradient is then one matrix product over all timesteps. Where its grid fits, one
launch runs the whole stack as a wavefront: layer l at timestep t during super-step t + l, the upper
layers' input products inside the kernel, so the layers overlap and meet at T + L - 1 barriers.

Where the grid would not fit on the device at once (a persistent grid needs every program resident,
or the barrier never opens), the same kernel body is launched once per timestep instead: the launch
boundary is the barrier. Tests run both modes through Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``) against ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``; the barrier itself can only be
exercised on a GPU, and it gives up after ``spin_limit`` polls and raises a flag rather than hang.

One kernel pair serves the three cells (:class:`KernelCell`; ``fused_kernels``): the tiles, barriers and
wavefront are the LSTM's, measured on an H200; the GRU's and the RNN's gate arithmetic after the
products is their own, proven in the interpreter and compiled for sm_90, not yet timed on a GPU.

The plan (:func:`plan_launch`) takes by default the variants measured fastest in whole training steps
on an H200 (``TUNED_WORDS``: the stack as one wavefront, a one-counter barrier, ``W_hh`` resident in
shared memory) wherever they fit; ``DRNN_FUSED_LAUNCH`` replaces them for measuring others.

Numerics: the matrix products multiply in the recurrent weights' dtype — fp32, or bf16/fp16 under
autocast — and accumulate in fp32; gates, cell state, stored activations and gradients are fp32. fp32
products run on TF32 tensor cores where cuDNN's fp32 LSTM would (:func:`products_for`), in IEEE
arithmetic elsewhere. Parameters keep PyTorch's names and gate orders (``[i | f | g | o]``, ``[r | z |
n]``), so checkpoints move freely between ``impl: torch``, ``scratch`` and ``fused``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Literal

import torch

from drnn_cli.errors import DrnnError
from drnn_cli.model_size import GATES

Mode = Literal["persistent", "stepwise"]
# How the recurrent products multiply: fp32 in IEEE arithmetic, fp32 on TF32 tensor cores, bf16/fp16
Products = Literal["ieee", "tf32", "half"]
SPIN_LIMIT = 2_000_000  # polls of the arrival flags before a program gives up (~1 s, not a hang)
LAUNCH_ENV = "DRNN_FUSED_LAUNCH"  # the plan's variants, for measuring them end to end (README "Environment")
# its words, each the Launch field it turns on ("wavefront": the whole stack in one launch, see Launch.layers)
LAUNCH_WORDS = {
    "resident": "resident",
    "counter": "counter_barrier",
    "tf32": "tf32",
    "wavefront": "layers",
    "grads": "gradient_products",
}
PLAIN_WORD = "plain"  # DRNN_FUSED_LAUNCH's word for the plan without any variant (what the sweeps compare)
# The variants the plan takes where they fit, each faster in whole seed training steps on an H200
# (docs/measurements/2026-11-27-h200): the two-layer stack forward + backward as a graph, bf16, went
# from 1,110 µs layer by layer to 722 µs with all three (cuDNN: 580), fp32 with TF32 from 1,174 to 779
# (cuDNN: 1,073). resident only where the products are not IEEE fp32: there it took 11 ms, not 1.
TUNED_WORDS = ("wavefront", "counter", "resident")
# A tile's sides as the plan and the sweep cut them: tl.arange takes powers of two only, and past 64
# the kernel's registers and shared memory were never sized (32 × 128 overflows shared memory in fp32).
LAUNCH_TILE_SIDES = {"16": 16, "32": 32, "64": 64}
TILE_PATTERN = re.compile(r"(\d+)x(\d+)")  # DRNN_FUSED_LAUNCH's ROWSxUNITS
RESIDENT_BYTES = 128 << 10  # a resident W_hh's share of a Hopper multiprocessor's 227 KiB (fp32: 160 KiB
# in all at hidden 512, 16 units, compiled for sm_90; 320 KiB at 1024 does not fit)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), as the tests do."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def can_run(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` now: CUDA with Triton, or Triton's CPU
    interpreter — but not under a bf16 autocast there, whose products the interpreter gets wrong
    (outputs off by ~1 from the second timestep; fp16's agree to 2e-4): the scratch cells step then."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting() and _product_dtype(device) != torch.bfloat16


def _kernels() -> ModuleType:
    """The kernel module, imported on first use so that drnn imports without Triton."""
    from drnn_cli import fused_kernels

    return fused_kernels


@dataclass(frozen=True)
class Launch:
    """How one layer's recurrence is cut into programs, and whether they run persistently."""

    block_b: int  # batch rows per program
    block_h: int  # hidden units per program (all four of their gates)
    block_k: int  # width of the reduction tiles
    grid: tuple[int, int]  # (hidden blocks, batch blocks)
    persistent: bool
    num_warps: int = 4
    # Variants (scripts/fused_bench.py --sweep-tiles times them against the plain plan; the plan takes
    # them where they fit: with_tuned_variants):
    resident: bool = False  # W_hh's tiles read once before the time loop (needs block_k = hidden)
    counter_barrier: bool = False  # the grid meets at one counter, not at one flag per program
    tf32: bool = False  # fp32 products on TF32 tensor cores, as cuDNN's fp32 LSTM runs them
    # The backward pass's weight-gradient products (Σ_t dz_tᵀ h_{t-1}, outside the kernels) multiplied as
    # the recurrent ones are, as cuDNN computes its own: half operands under autocast, TF32 where ``tf32``;
    # else IEEE fp32 (cuBLAS's FFMA kernels: about 110 of the fp32 step's 851 busy µs on an H200). Not
    # yet timed: only DRNN_FUSED_LAUNCH's ``grads`` asks for it.
    gradient_products: bool = False
    # Layers run by one launch as a wavefront (layer l at timestep t during super-step t + l): each
    # has a grid of its own, the barriers are shared, and layers > 1 computes the input products of
    # the layers above the first inside the kernel. 1: one launch per layer.
    layers: int = 1
    gates: int = 4  # the cell's gate blocks (model_size.GATES): what its weight tiles and K loops hold

    @property
    def kernel_grid(self) -> tuple[int, int, int]:
        return (*self.grid, self.layers)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.layers


def device_slots(device: torch.device) -> int:
    """How many programs of a persistent grid can be resident at once: one per multiprocessor on a
    GPU; one on the CPU, where the interpreter runs the programs of a grid one after another."""
    if device.type != "cuda":
        return 1
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DDP all-reduces gradients while the backward pass runs: NCCL's kernels occupy
        # multiprocessors of their own beside ours, so leave half of them free.
        return multiprocessors // 2
    return multiprocessors


def device_shared_bytes(device: torch.device) -> int | None:
    """Shared memory one program may take on ``device`` (opted in: Triton asks for it), or None on a
    CPU, where the interpreter has no such limit, or where the device does not say."""
    if device.type != "cuda":
        return None
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return int(shared) or None


def plan_for(device: torch.device, batch: int, hidden: int, layers: int = 1, cell: str = "lstm") -> Launch:
    """The launch for ``layers`` layers of ``cell`` on ``device`` now: its multiprocessors and shared
    memory, and the products the current autocast makes (:func:`plan_launch`, with the tuned variants)."""
    return plan_launch(
        batch,
        hidden,
        device_slots(device),
        layers=layers,
        products=products_for(device),
        shared_bytes=device_shared_bytes(device),
        gates=GATES[cell],
    )


def plan_launch(
    batch: int,
    hidden: int,
    slots: int,
    mode: Mode | None = None,
    layers: int = 1,
    products: Products | None = None,
    shared_bytes: int | None = None,
    gates: int = 4,
) -> Launch:
    """Tiles of 16–64 rows by 16–64 hidden units (``tl.dot`` needs 16 or more on each side).

    The smallest tiles spread a timestep's work over the most multiprocessors; for a persistent grid
    they grow (hidden units first, then rows) until every program fits on the device at once, one
    per multiprocessor. If even 64 × 64 tiles do not fit, one launch per timestep of 16 × 16 tiles.
    ``mode`` forces either (tests). Given ``products`` (:func:`products_for`), the plan takes the
    variants ``TUNED_WORDS`` where they fit (:func:`with_tuned_variants`; ``shared_bytes``: the device's
    shared memory per program, :func:`device_shared_bytes`); without, the plain plan the sweeps compare
    against. ``DRNN_FUSED_LAUNCH`` replaces either (:func:`launch_from_environment`).
    A stack of ``layers`` layers runs as one wavefront, whose grid is one layer's times ``layers`` —
    where that grid is persistent, or one layer's would not be either: a wavefront of one launch per
    super-step is no gain over persistent layers one at a time.
    """
    if hidden % 16:
        raise ValueError(f"model.impl fused needs hidden_size divisible by 16, not {hidden}")
    asked = os.environ.get(LAUNCH_ENV, "").strip() if mode is None else ""  # blank: unset
    block_b, block_h, persistent = _tiles(batch, hidden, slots, mode, 1)
    tuned = not asked and mode is None and products is not None
    words = list(TUNED_WORDS) if tuned else launch_words(asked)
    if layers > 1 and "wavefront" in words:
        stack_b, stack_h, stack_persistent = _tiles(batch, hidden, slots, mode, layers)
        if tuned:
            # measured faster only where the whole stack fits at one layer's own tiles (the seed
            # shape); larger tiles spill registers (64 × 64 at batch 1024 trained no faster)
            take_stack = stack_persistent and (stack_b, stack_h) == (block_b, block_h)
        else:
            # a tile asked for is the stack's, fitting or refused (launch_from_environment)
            take_stack = stack_persistent or not persistent or any(TILE_PATTERN.fullmatch(w) for w in words)
        if take_stack:
            block_b, block_h, persistent = stack_b, stack_h, stack_persistent
        else:
            layers = 1  # the layers one at a time, each grid resident
    else:
        layers = 1
    block_k = widest_k_tile(hidden, block_b, block_h, shared_bytes, gates)
    launch = Launch(block_b, block_h, block_k, (0, 0), persistent, gates=gates)
    launch = with_tile(launch, batch, hidden, block_b, block_h)
    if asked:
        return launch_from_environment(asked, launch, batch, hidden, slots, layers, shared_bytes)
    if tuned and products:
        return with_tuned_variants(launch, hidden, layers, products, shared_bytes)
    return launch


def products_for(device: torch.device) -> Products:
    """How the recurrent products will multiply on ``device`` now: ``half`` under a bf16/fp16 autocast;
    fp32 on TF32 tensor cores where cuDNN's fp32 LSTM would use them (a GPU that has them, compute
    capability 8.0 on, and ``torch.backends.cudnn.allow_tf32``, on by default), else ``ieee``."""
    if _product_dtype(device) != torch.float32:
        return "half"
    tf32 = (
        device.type == "cuda"
        and torch.backends.cudnn.allow_tf32
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )
    return "tf32" if tf32 else "ieee"


def with_tuned_variants(
    launch: Launch, hidden: int, layers: int, products: Products, shared_bytes: int | None
) -> Launch:
    """``launch`` with the variants ``TUNED_WORDS`` where they fit, silently left out where not (unlike
    ``DRNN_FUSED_LAUNCH``'s, which are refused): the stack as one wavefront of ``layers`` (where the
    plan found it fits at one layer's tiles), the counter barrier, TF32 products for ``tf32``, and
    ``W_hh`` resident where the grid is persistent, the products are not IEEE fp32, and its tiles fit
    the device's known shared memory (:func:`resident_refusal`)."""
    launch = replace(launch, layers=layers, counter_barrier=True, tf32=products == "tf32")
    resident = (
        launch.persistent
        and products != "ieee"
        and shared_bytes is not None
        and resident_refusal(launch, hidden, shared_bytes) is None
    )
    return replace(launch, resident=True, block_k=hidden) if resident else launch


def resident_bytes(launch: Launch, hidden: int) -> int:
    """Shared memory one program's resident weights take: the gates' fp32 tiles of W_hh, and of W_ih
    in a wavefront's upper layers."""
    return launch.gates * hidden * launch.block_h * 4 * (2 if launch.layers > 1 else 1)


def widest_k_tile(hidden: int, block_b: int, block_h: int, shared_bytes: int | None, gates: int = 4) -> int:
    """The K loops' tile (they step over H and 4H): the widest of 64, 32, 16 that divides ``hidden`` and
    whose pipelined loads fit the device's ``shared_bytes`` (:func:`loop_shared_bytes`); 64 × 64 tiles
    at K 64 need 160–240 KiB, more than any GPU but a Hopper or an A100 holds (Triton refuses the launch)."""
    widths = [k for k in (64, 32, 16) if hidden % k == 0]
    if shared_bytes is None:
        return widths[0]
    fitting = (k for k in widths if loop_shared_bytes(block_b, block_h, k, gates) <= shared_bytes)
    return next(fitting, widths[-1])


def loop_shared_bytes(block_b: int, block_h: int, block_k: int, gates: int = 4) -> int:
    """Shared memory the forward kernel's K loop may take as Triton pipelines it: three stages of the
    fp32 tiles of x (rows × K) and of the gates' W (K × units). Compiled, the LSTM's 16 × 64 tiles at K
    64 took two stages (139,264 bytes) on sm_86 and sm_90; 64 × 64 with TF32 on sm_90, three (245,760)."""
    return 3 * 4 * (block_b * block_k + gates * block_k * block_h)


def resident_beside_bytes(launch: Launch, hidden: int) -> int:
    """Shared memory a resident kernel takes beside its weights, as compiled (for sm_80–sm_90, fp32):
    the fp32 tile of all of h_{t-1} (rows × hidden) and the output tile (rows × units), and 1 KiB."""
    return 4 * launch.block_b * (hidden + launch.block_h) + 1024


def resident_refusal(launch: Launch, hidden: int, shared_bytes: int | None) -> str | None:
    """Why ``launch`` cannot keep its weights resident, in words that follow "resident", or None:
    the hidden size must be a power of two (one K tile as wide as the layer), the weights must fit
    drnn's cap, and with what the kernel keeps beside them the device's ``shared_bytes`` if known (99
    KiB on an RTX 4090 or L4, 64 on a T4, 163 on an A100, 227 on an H100: Triton refuses a launch
    that needs more, in the first training step)."""
    if hidden & (hidden - 1):
        return f"needs model.hidden_size a power of two, not {hidden}"
    weights = resident_bytes(launch, hidden)
    leave_out = f"leave out resident{' or wavefront' if launch.layers > 1 else ''}"
    if weights > RESIDENT_BYTES:
        return (
            f"keeps {weights >> 10} KiB of weights per program at hidden {hidden} and {launch.block_h} units a "
            f"program, more than a multiprocessor's shared memory holds beside the rest; use a tile of fewer "
            f"units, or {leave_out}"
        )
    needed = weights + resident_beside_bytes(launch, hidden)
    if shared_bytes is not None and needed > shared_bytes:
        return (
            f"needs {needed >> 10} KiB of shared memory per program at hidden {hidden} in "
            f"{launch.block_b}x{launch.block_h} tiles, more than this device's {shared_bytes >> 10} KiB; use a "
            f"smaller tile, or {leave_out}"
        )
    return None


def _tiles(batch: int, hidden: int, slots: int, mode: Mode | None, grids: int) -> tuple[int, int, bool]:
    """(rows, units, persistent) of the smallest tile whose ``grids`` grids fit ``slots`` at once."""
    block_b = block_h = 16

    def programs() -> int:
        return (hidden // block_h) * -(-batch // block_b) * grids

    while mode != "stepwise" and programs() > slots:
        if block_h < 64 and hidden % (2 * block_h) == 0:
            block_h *= 2
        elif block_b < 64:
            block_b *= 2
        else:
            break
    persistent = programs() <= slots if mode is None else mode == "persistent"
    return (block_b, block_h, True) if persistent else (16, 16, False)


def launch_words(asked: str) -> list[str]:
    """``DRNN_FUSED_LAUNCH``'s comma-separated words, trimmed and in lower case."""
    return [part.strip().lower() for part in asked.split(",") if part.strip()]


def with_tile(
    launch: Launch, batch: int, hidden: int, block_b: int, block_h: int, warps: int | None = None
) -> Launch:
    """``launch`` cut into ``block_b`` rows × ``block_h`` units per program: its grid, and (unless
    given) 8 warps for tiles of 2,048 elements or more, 4 below."""
    grid = (hidden // block_h, -(-batch // block_b))
    warps = warps or (8 if block_b * block_h >= 2048 else 4)
    return replace(launch, block_b=block_b, block_h=block_h, grid=grid, num_warps=warps)


def launch_from_environment(
    asked: str,
    launch: Launch,
    batch: int,
    hidden: int,
    slots: int,
    layers: int = 1,
    shared_bytes: int | None = None,
) -> Launch:
    """``launch`` as ``DRNN_FUSED_LAUNCH`` asks: a comma-separated list of ``resident`` (W_hh read once
    for all timesteps), ``counter`` (the grid barrier through one counter), ``tf32`` (fp32 products on
    TF32 tensor cores), ``wavefront`` (a stack of ``layers`` in one launch), ``grads`` (the weight
    gradients multiplied as the recurrent products are: ``Launch.gradient_products``) and a tile ``ROWSxUNITS``.
    The variants scripts/fused_bench.py --sweep-tiles times, for measuring one in whole training
    steps; a word it does not know, or a variant this stack cannot take, is a one-line error."""
    fields: dict[str, Any] = {}
    tile_word: str | None = None
    for word in launch_words(asked):
        tile = TILE_PATTERN.fullmatch(word)
        if word == PLAIN_WORD:
            continue
        if word in LAUNCH_WORDS:
            fields[LAUNCH_WORDS[word]] = layers if word == "wavefront" else True
        elif tile:
            if tile_word is not None:
                raise DrnnError(f"{LAUNCH_ENV}: two tiles, {tile_word} and {word}; give one")
            tile_word = word
            # looked up, not int(): that reads "１６" as 16, and 5,000 digits raise a ValueError
            block_b, block_h = (LAUNCH_TILE_SIDES.get(side, 0) for side in tile.groups())
            if not block_b or not block_h or hidden % block_h:
                raise DrnnError(
                    f"{LAUNCH_ENV} tile {word}: rows and units must each be 16, 32 or 64, and the units "
                    f"must divide model.hidden_size {hidden}"
                )
            launch = with_tile(launch, batch, hidden, block_b, block_h)
            launch = replace(
                launch, block_k=widest_k_tile(hidden, block_b, block_h, shared_bytes, launch.gates)
            )
        else:
            raise DrnnError(
                f"{LAUNCH_ENV}: unknown word {word!r}; use a comma-separated list of "
                f"{', '.join(LAUNCH_WORDS)} and a tile such as 16x32, or {PLAIN_WORD}"
            )
    launch = replace(launch, **fields)
    if launch.resident:
        refusal = resident_refusal(launch, hidden, shared_bytes)
        if refusal:
            raise DrnnError(f"{LAUNCH_ENV} resident {refusal}")
        launch = replace(launch, block_k=hidden)
    if launch.persistent and launch.programs > slots:
        raise DrnnError(
            f"{LAUNCH_ENV}: {launch.programs} programs of {launch.block_b}x{launch.block_h}"
            f"{f' ({launch.layers} layers)' if launch.layers > 1 else ''} do not fit this device's {slots} "
            "at once; use a larger tile"
        )
    return launch


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _product_dtype(device: torch.device) -> torch.dtype:
    """bf16/fp16 products under autocast (as cuDNN's LSTM would run), else fp32."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return torch.float32


def precision_for(fp32: bool, tf32: bool = False) -> str:
    """fp32 products in IEEE arithmetic unless ``tf32`` (TF32 rounds them to 10-bit mantissas); for
    half precision operands the setting does not apply."""
    return "ieee" if fp32 and not tf32 else "tf32"


@dataclass(frozen=True)
class KernelCell:
    """Which recurrence the kernels run (``fused_kernels``' ``CELL``): ``lstm``, ``gru`` (PyTorch's form:
    the reset gate after the recurrent product), or ``rnn`` with its nonlinearity."""

    name: str = "lstm"  # a key of model_size.GATES
    nonlinearity: str = "tanh"  # the rnn's: tanh or relu

    @property
    def code(self) -> int:
        """The kernels' CELL: 0 LSTM, 1 GRU, 2 tanh RNN, 3 ReLU RNN (``fused_kernels``' constants)."""
        return {"lstm": 0, "gru": 1}.get(self.name, 2 if self.nonlinearity == "tanh" else 3)

    @property
    def gates(self) -> int:
        return GATES[self.name]

    @property
    def slots(self) -> int:
        """H-wide slots in a row of the backward pass's gate gradients (``fused_kernels`` docstring)."""
        return 1 if self.name == "rnn" else 4

    @property
    def input_slot_2(self) -> int:
        """The slot of gate 2's gradient as the input product received it: the GRU's ∂n (slot 3; its
        slot 2 holds ∂n·r, what the recurrent product received), gate 2's own slot for the LSTM."""
        return 3 if self.name == "gru" else 2

    @property
    def keeps_activations(self) -> bool:
        """Whether the forward pass stores gate activations for the backward pass (not the RNN's)."""
        return self.name != "rnn"


def kernel_constants(
    launch: Launch, fp32_products: bool, masked: bool = False, cell: KernelCell = KernelCell()
) -> dict[str, Any]:
    """The kernels' compile-time parameters for ``launch`` (scripts/fused_compile.py compiles the same);
    ``masked``: dropout between a wavefront's layers."""
    if launch.gates != cell.gates:
        raise ValueError(
            f"a launch planned for {launch.gates} gates cannot run the {cell.name}'s {cell.gates}"
        )
    return {
        "BLOCK_B": launch.block_b,
        "BLOCK_H": launch.block_h,
        "BLOCK_K": launch.block_k,
        "PERSISTENT": launch.persistent,
        "NUM_PROGRAMS": launch.programs,
        "FLAGS": triton_next_power_of_2(launch.programs),
        "PRECISION": precision_for(fp32_products, launch.tf32),
        "RESIDENT": launch.resident,
        "COUNTER": launch.counter_barrier,
        "LAYERS": launch.layers,
        "MASKED": masked,
        "CELL": cell.code,
        "GATES": cell.gates,
        "SLOTS": cell.slots,
        "INPUT_SLOT_2": cell.input_slot_2,
    }


def _launch_args(
    launch: Launch, spin_limit: int, w: torch.Tensor, masked: bool, cell: KernelCell
) -> dict[str, Any]:
    constants = kernel_constants(launch, w.dtype == torch.float32, masked, cell)
    return {"spin_limit": spin_limit, **constants, "num_warps": launch.num_warps}


class _FusedStack(torch.autograd.Function):
    """A stack of L layers: one kernel pair per layer (``launch.layers`` = 1, L = 1) or one for all of
    them (``launch.layers`` = L). Layer 0's input gates come precomputed; the layers above compute
    theirs in the kernel from the layer below's h_t (times its dropout mask) and their W_ih. The GRU's
    b_hn comes apart (``hbias``), as its reset gate multiplies the recurrent term with it. Returns
    the top layer's outputs and h_n, and for the LSTM c_n."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xg: torch.Tensor,
        w_hh: torch.Tensor,
        w_ih: torch.Tensor,
        bias: torch.Tensor,
        hbias: torch.Tensor,
        mask: torch.Tensor | None,
        h0: torch.Tensor,
        c0: torch.Tensor | None,
        launch: Launch,
        spin_limit: int,
        error: torch.Tensor,
        cell: KernelCell,
    ) -> tuple[torch.Tensor, ...]:
        steps, batch, width = xg.shape
        layers, hidden = w_hh.shape[0], width // cell.gates
        kernels = _kernels()
        xg = xg.float().contiguous()
        hs = torch.empty((layers, steps + 1, batch, hidden), device=xg.device, dtype=torch.float32)
        hs[:, 0].copy_(h0)
        cs = hs  # a pointer the kernel reads only for the LSTM
        if c0 is not None:
            cs = torch.empty_like(hs)
            cs[:, 0].copy_(c0)
        act_shape = (layers, steps, batch, 4 * hidden) if cell.keeps_activations else (1,)
        act = torch.empty(act_shape, device=xg.device, dtype=torch.float32)
        flags = torch.zeros(launch.programs, device=xg.device, dtype=torch.int32)
        args = _launch_args(launch, spin_limit, w_hh, mask is not None, cell)
        scale = hs if mask is None else mask  # a pointer the kernel reads only when masked
        for t_begin, n_steps in _chunks(steps + layers - 1, launch.persistent):
            kernels.forward[launch.kernel_grid](
                xg,
                w_hh,
                w_ih,
                bias,
                hbias,
                scale,
                hs,
                cs,
                act,
                flags,
                error,
                t_begin,
                n_steps,
                steps,
                batch,
                hidden,
                **args,
            )
        ctx.save_for_backward(w_hh, w_ih, mask, hs, cs, act)
        ctx.launch, ctx.spin_limit, ctx.error, ctx.cell = launch, spin_limit, error, cell
        if c0 is None:
            return hs[layers - 1, 1:], hs[:, steps]
        return hs[layers - 1, 1:], hs[:, steps], cs[:, steps]

    @staticmethod
    def backward(
        ctx: Any, d_out: torch.Tensor | None, d_h: torch.Tensor | None, d_c: torch.Tensor | None = None
    ):  # type: ignore[override]
        w_hh, w_ih, mask, hs, cs, act = ctx.saved_tensors
        launch: Launch = ctx.launch
        cell: KernelCell = ctx.cell
        layers, steps, batch, hidden = hs.shape[0], hs.shape[1] - 1, hs.shape[2], hs.shape[3]
        kernels = _kernels()
        dout = torch.zeros((layers, steps, batch, hidden), device=hs.device)
        if d_out is not None:
            dout[layers - 1] += d_out.float()
        if d_h is not None:
            dout[:, steps - 1] += d_h.float()  # h_T is each layer's last output: its two gradients meet
        width = cell.slots * hidden
        dz = torch.empty((layers, steps + 1, batch, width), device=hs.device, dtype=torch.float32)
        dz[:, steps].zero_()
        lstm = cell.name == "lstm"
        # carried back a timestep (the kernel writes over it): the LSTM's ∂c, the GRU's ∂h·z
        dc = (
            d_c.float().clone(memory_format=torch.contiguous_format)
            if lstm and d_c is not None
            else torch.zeros((layers, batch, hidden), device=hs.device)
        )
        flags = torch.zeros(launch.programs, device=hs.device, dtype=torch.int32)
        args = _launch_args(launch, ctx.spin_limit, w_hh, mask is not None, cell)
        scale = hs if mask is None else mask
        for t_begin, n_steps in _chunks(steps + layers - 1, launch.persistent):
            t_last = steps - 1 - t_begin
            kernels.backward[launch.kernel_grid](
                w_hh,
                w_ih,
                scale,
                act,
                cs,  # the LSTM's c; the others' h (cs is hs there)
                dout,
                dz,
                dc,
                flags,
                ctx.error,
                t_last,
                n_steps,
                steps,
                batch,
                hidden,
                **args,
            )
        recurrent_width = cell.gates * hidden  # the GRU's [∂r | ∂z | ∂n·r]: what h W_hhᵀ received
        recurrent = dz[:, :steps, :, :recurrent_width].reshape(layers, -1, recurrent_width)
        if cell.name == "gru":  # [∂r | ∂z | ∂n]: what x W_ihᵀ received
            taken = dz[:, :steps]
            inputs_side = torch.cat((taken[..., : 2 * hidden], taken[..., 3 * hidden :]), -1)
            inputs_side = inputs_side.reshape(layers, -1, recurrent_width)
            d_hbias = recurrent[..., 2 * hidden :].sum(1)
        else:
            inputs_side, d_hbias = recurrent, None
        d_w_hh = gradient_product(
            recurrent.transpose(1, 2), hs[:, :steps].reshape(layers, -1, hidden), launch, w_hh.dtype
        ).to(w_hh.dtype)  # Σ_t dz_tᵀ h_{t-1}
        d_h0 = dz[:, 0, :, :recurrent_width].bmm(w_hh.float())
        if cell.name == "gru":
            d_h0 += dc  # h_0's direct path into h_1
        d_w_ih = d_bias = None
        if layers > 1:  # the upper layers' inputs: the layer below's outputs, dropped out
            inputs = hs[:-1, 1:] if mask is None else hs[:-1, 1:] * mask
            upper = inputs_side[1:]
            d_w_ih = gradient_product(
                upper.transpose(1, 2), inputs.reshape(layers - 1, -1, hidden), launch, w_ih.dtype
            ).to(w_ih.dtype)
            d_bias = upper.sum(1)
        d_xg = inputs_side[0].view(steps, batch, recurrent_width)
        d_c0 = dc if lstm else None
        return d_xg, d_w_hh, d_w_ih, d_bias, d_hbias, None, d_h0, d_c0, None, None, None, None


def gradient_product(a: torch.Tensor, b: torch.Tensor, launch: Launch, dtype: torch.dtype) -> torch.Tensor:
    """``a.bmm(b)`` for a weight gradient, fp32 operands: in IEEE fp32, or under the launch's
    ``gradient_products`` as the recurrent products multiply — ``dtype`` operands where the weights are
    half precision (autocast), TF32 tensor cores for a ``tf32`` launch. cuBLAS accumulates in fp32 (it may
    sum split-K partials in the half dtype: PyTorch's reduced-precision reductions, on by default), and the
    result is rounded to the weights' dtype as before."""
    if not launch.gradient_products:
        return a.bmm(b)
    if dtype != torch.float32:
        return a.to(dtype).bmm(b.to(dtype))
    if not launch.tf32:
        return a.bmm(b)
    matmul = torch.backends.cuda.matmul
    saved, matmul.allow_tf32 = matmul.allow_tf32, True  # cuBLAS's switch: cuDNN's alone is on by default
    try:
        return a.bmm(b)
    finally:
        matmul.allow_tf32 = saved


def _chunks(steps: int, persistent: bool) -> list[tuple[int, int]]:
    """(first super-step, super-steps) per launch: all at once when persistent, else one at a time."""
    return [(0, steps)] if persistent else [(t, 1) for t in range(steps)]


def fused_stack(
    xg: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: list[torch.Tensor],
    w_ih: list[torch.Tensor],
    biases: list[torch.Tensor],
    masks: list[torch.Tensor] | None,
    launch: Launch,
    cell: KernelCell = KernelCell(),
    hbiases: list[torch.Tensor] | None = None,
    spin_limit: int = SPIN_LIMIT,
    error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A stack of layers of ``cell`` in one launch (``launch.layers`` of them, as a wavefront). ``xg``
    (T, B, G·H) holds layer 0's x_t W_ihᵀ + b_ih + b_hh; ``w_ih`` and ``biases`` (b_ih + b_hh) are the
    layers' above it; the GRU's b_hn stays out of both, one per layer in ``hbiases``. ``masks``: the
    dropout scale of each lower layer's output, (T or 1, B, H), or None. Returns ``(top layer's
    outputs (T, B, H), h_n (L, B, H), c_n (the LSTM's, else None))`` in fp32; ``error`` as for
    :func:`fused_layer`."""
    layers, (steps, batch, _), hidden = len(w_hh), xg.shape, w_hh[0].shape[1]
    if launch.layers != layers or layers < 2:
        raise ValueError(f"a wavefront launch of {launch.layers} layers cannot run a stack of {layers}")
    _check_resident(launch, hidden)
    dtype = _product_dtype(xg.device)
    stacked_mask = None
    if masks is not None:  # one contiguous (L - 1, T, B, H) scale: a locked mask repeats over time
        stacked_mask = torch.stack([mask.float().expand(steps, batch, hidden) for mask in masks]).contiguous()
    outputs = _FusedStack.apply(
        xg,
        torch.stack(w_hh).to(dtype),
        torch.stack(w_ih).to(dtype),
        torch.stack(biases).float(),
        _hidden_biases(hbiases, xg),
        stacked_mask,
        h0,
        c0,
        launch,
        spin_limit,
        _error_flag(error, xg.device),
        cell,
    )
    # (L, B, H) slices of (L, T + 1, B, H) buffers
    return outputs[0], outputs[1].contiguous(), outputs[2].contiguous() if c0 is not None else None


def fused_layer(
    xg: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    launch: Launch | None = None,
    cell: KernelCell = KernelCell(),
    hbias: torch.Tensor | None = None,
    spin_limit: int = SPIN_LIMIT,
    error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's recurrence: ``xg`` (T, B, G·H) holds x_t W_ihᵀ + b_ih + b_hh (the GRU's b_hn apart,
    in ``hbias``); returns ``(outputs (T, B, H), h_T, c_T (the LSTM's, else None))`` in fp32.
    ``error`` (an int32 scalar) becomes 1 if a grid barrier gave up waiting; it is never read on the
    host here (that would cost a sync per layer)."""
    batch, hidden = xg.shape[1], w_hh.shape[1]
    launch = launch or plan_for(xg.device, batch, hidden, cell=cell.name)
    if launch.layers != 1:
        launch = replace(launch, layers=1)  # one layer's grid: a wavefront plan seen by one layer
    _check_resident(launch, hidden)
    w = w_hh.to(_product_dtype(xg.device)).unsqueeze(0).contiguous()
    no_bias = xg.new_zeros((1,), dtype=torch.float32)  # a lone layer has no layer above: never read
    outputs = _FusedStack.apply(
        xg,
        w,
        w,
        no_bias,
        _hidden_biases(None if hbias is None else [hbias], xg),
        None,
        h0.unsqueeze(0),
        None if c0 is None else c0.unsqueeze(0),
        launch,
        spin_limit,
        _error_flag(error, xg.device),
        cell,
    )
    return outputs[0], outputs[1][0], outputs[2][0] if c0 is not None else None


def _hidden_biases(hbiases: list[torch.Tensor] | None, xg: torch.Tensor) -> torch.Tensor:
    """The GRU's b_hn of every layer, (L, H) fp32; for the other cells a pointer never read."""
    if hbiases is None:
        return xg.new_zeros((1,), dtype=torch.float32)
    return torch.stack(hbiases).float()


def _check_resident(launch: Launch, hidden: int) -> None:
    if launch.resident and (launch.block_k != hidden or hidden & (hidden - 1)):
        raise ValueError(f"a resident W_hh needs block_k = hidden_size, a power of two (hidden {hidden})")


def _error_flag(error: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device, dtype=torch.int32) if error is None else error
