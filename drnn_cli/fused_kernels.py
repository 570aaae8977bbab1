"""The Triton kernels behind ``model.impl: fused`` (see :mod:`drnn_cli.fused_recurrence` for the design).

Imported only when the fused kernels run, so drnn imports without Triton. ``triton.jit`` decides at
import whether the kernels compile for the GPU or run in the CPU interpreter (``TRITON_INTERPRET=1``).
Index layout: every (L, T, B, X) buffer is contiguous, so element [l, t, b, x] sits at
``((l·T + t)·B + b)·X + x``. One launch runs the recurrence of one layer, or of a whole stack as a
wavefront (``LAYERS`` > 1): the grid's third axis is the layer, and layer l runs timestep t at
super-step t + l, so the layers' timesteps overlap and the stack meets at T + L - 1 barriers, not L·T.

One kernel pair serves every cell (``CELL``, a compile-time constant): the products, tiles, barriers
and the wavefront are the same; what differs is the gate arithmetic after the products. Gates, in
PyTorch's order, ``GATES`` blocks of H columns: LSTM ``[i | f | g | o]``; GRU ``[r | z | n]``; RNN one.
Up to four gate accumulators travel through the helpers; a cell with fewer leaves the rest untouched.

What the forward pass stores for the backward pass, ``act`` (L, T, B, 4H): the LSTM's σ(i), σ(f),
tanh(g), σ(o); the GRU's r, z, n and ``hn`` = h_{t-1} W_hnᵀ + b_hn (which r multiplies); the RNN
nothing (its derivative comes from h_t itself). The backward pass writes ``dz`` (L, T + 1, B, DZ):
the LSTM's four pre-activation gradients; the GRU's ``[∂r | ∂z | ∂n·r | ∂n]`` (pre-activation): the
first three are what the recurrent product ``h_{t-1} W_hhᵀ`` received, the first two and the last what
the input product ``x W_ihᵀ`` received (``SLOT_2`` of the gradient products: 2 for the recurrent
side, 3 for the GRU's input side: ``INPUT_SLOT_2``); the RNN's one.
"""

import triton
import triton.language as tl

# CELL's values (drnn_cli.fused_recurrence.KernelCell.code gives them)
LSTM = tl.constexpr(0)
GRU = tl.constexpr(1)
RNN_TANH = tl.constexpr(2)
RNN_RELU = tl.constexpr(3)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def slowest(flags_ptr, others, valid, arrival):
    """The lowest step any program has announced (the padding lanes count as arrived)."""
    flags = tl.atomic_add(flags_ptr + others, 0, mask=valid, sem="acquire", scope="gpu")
    return tl.min(tl.where(valid, flags, arrival), axis=0)


@triton.jit
def grid_barrier(flags_ptr, error_ptr, arrival, spin_limit, NUM_PROGRAMS: tl.constexpr, FLAGS: tl.constexpr):
    """Every program has finished step ``arrival``: each raises its own flag to ``arrival``
    (idempotent, so it does not matter how many threads issue the store), then polls all flags.
    Release/acquire at GPU scope make the stores before the barrier visible to loads after it."""
    tl.debug_barrier()  # all of this program's threads have issued their stores
    me = tl.program_id(0) + (tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)) * tl.num_programs(0)
    tl.atomic_xchg(flags_ptr + me, arrival, sem="release", scope="gpu")
    others = tl.arange(0, FLAGS)
    valid = others < NUM_PROGRAMS
    seen = slowest(flags_ptr, others, valid, arrival)
    polls = spin_limit * 0  # an int32 like spin_limit: a loop-carried value keeps one type
    # Once one barrier has given up, later ones do not wait again (the results are void anyway).
    # A scalar atomic runs on one thread and is broadcast, so every warp takes the same path through
    # the loop (whose debug barriers must pair up); a plain load could differ from warp to warp.
    waiting = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu") == 0
    while (seen < arrival) & (polls < spin_limit) & waiting:
        seen = slowest(flags_ptr, others, valid, arrival)
        polls += 1
    if seen < arrival:
        tl.store(error_ptr, 1)
    tl.debug_barrier()


@triton.jit
def counter_barrier(counter_ptr, error_ptr, arrival, spin_limit, NUM_PROGRAMS: tl.constexpr):
    """The same meeting through one counter: each program adds one when it has finished step
    ``arrival``, then polls the counter until all have (``arrival · NUM_PROGRAMS``). One scalar atomic
    to announce and one per poll, where ``grid_barrier`` reads every program's flag at each poll."""
    tl.debug_barrier()  # all of this program's threads have issued their stores
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")  # scalar: once per program
    target = arrival * NUM_PROGRAMS
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    polls = spin_limit * 0
    waiting = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu") == 0
    while (seen < target) & (polls < spin_limit) & waiting:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < target:
        tl.store(error_ptr, 1)
    tl.debug_barrier()


@triton.jit
def meet(
    flags_ptr,
    error_ptr,
    arrival,
    spin_limit,
    NUM_PROGRAMS: tl.constexpr,
    FLAGS: tl.constexpr,
    COUNTER: tl.constexpr,
):
    """The grid barrier after step ``arrival``: one counter (``COUNTER``) or one flag per program."""
    if COUNTER:
        counter_barrier(flags_ptr, error_ptr, arrival, spin_limit, NUM_PROGRAMS)
    else:
        grid_barrier(flags_ptr, error_ptr, arrival, spin_limit, NUM_PROGRAMS, FLAGS)


@triton.jit
def program_tile(B, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's batch rows and hidden units, the reduction lanes, which rows exist, and the
    offsets of (row, unit) in a (B, H) slab."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    live = (rows < B)[:, None]
    here = rows[:, None] * H + units[None, :]
    return rows, units, ks, live, here


@triton.jit
def load_past_l1(ptr, live, scale_ptr, SCALED: tl.constexpr):
    """A (rows, K) fp32 block written by other programs; times the dropout scale at ``scale_ptr`` if
    ``SCALED``. Asked to bypass L1 (.cg), which holds where the load stands alone (``resident``); in a
    K loop Triton's software pipelining turns it into an L1-caching ``cp.async``. Either way what makes
    other programs' writes visible is the barrier's GPU-scope release/acquire, and no address is read
    within a launch before it is written, so no stale L1 line can exist."""
    block = tl.load(ptr, mask=live, other=0.0, cache_modifier=".cg")
    if SCALED:
        block = block * tl.load(scale_ptr, mask=live, other=0.0)
    return block


@triton.jit
def product_past_l1(ptr, live, w, PRECISION: tl.constexpr):
    """The (rows, K) block at ``ptr``, written by other programs and so read past L1 (.cg), in the
    product dtype, times a (K, units) tile ``w``."""
    block = tl.load(ptr, mask=live, other=0.0, cache_modifier=".cg").to(w.dtype)
    return tl.dot(block, w, input_precision=PRECISION)


@triton.jit
def weight_blocks(ptrs, H: tl.constexpr, GATES: tl.constexpr):
    """The blocks at ``ptrs + q·H·H`` for the gates q of a (GATES·H, H) weight; places past a cell's
    gates hold gate 0's block, never multiplied."""
    w_0 = tl.load(ptrs)
    w_1 = w_0
    w_2 = w_0
    w_3 = w_0
    if GATES > 1:
        w_1 = tl.load(ptrs + H * H)
        w_2 = tl.load(ptrs + 2 * H * H)
    if GATES > 3:
        w_3 = tl.load(ptrs + 3 * H * H)
    return w_0, w_1, w_2, w_3


@triton.jit
def transposed_tiles(w_ptr, units, ks, H: tl.constexpr, GATES: tl.constexpr):
    """The gates' tiles of Wᵀ over all of K (= H) for this program's units: element [k, j] of gate
    q's is W[q·H + units[j], k], for W (GATES·H, H) at ``w_ptr`` (the forward pass's products)."""
    return weight_blocks(w_ptr + units[None, :] * H + ks[:, None], H, GATES)


@triton.jit
def row_tiles(w_ptr, units, ks, H: tl.constexpr, GATES: tl.constexpr):
    """W[q·H + k, units] for the gates q and all k < H (the backward pass's products)."""
    return weight_blocks(w_ptr + ks[:, None] * H + units[None, :], H, GATES)


@triton.jit
def gate_products(
    acc_0,
    acc_1,
    acc_2,
    acc_3,
    src_ptr,
    scale_ptr,
    w_ptr,
    rows,
    units,
    ks,
    live,
    H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALED: tl.constexpr,
    GATES: tl.constexpr,
):
    """acc_q += x W_qᵀ[:, units] for the gates q < GATES: x is rows of the (B, H) slab at ``src_ptr``
    (times the dropout scale at ``scale_ptr`` if SCALED), W (GATES·H, H) sits at ``w_ptr``; one
    BLOCK_K-wide tile of K at a time, W's tiles read from memory at every call."""
    for k0 in range(0, H, BLOCK_K):
        at = rows[:, None] * H + (k0 + ks)[None, :]
        x = load_past_l1(src_ptr + at, live, scale_ptr + at, SCALED).to(w_ptr.dtype.element_ty)
        # Wᵀ tile of gate q: element [k, j] = W[q·H + units[j], k0 + k]
        w_t = w_ptr + units[None, :] * H + (k0 + ks)[:, None]
        acc_0 += tl.dot(x, tl.load(w_t), input_precision=PRECISION)
        if GATES > 1:
            acc_1 += tl.dot(x, tl.load(w_t + H * H), input_precision=PRECISION)
            acc_2 += tl.dot(x, tl.load(w_t + 2 * H * H), input_precision=PRECISION)
        if GATES > 3:
            acc_3 += tl.dot(x, tl.load(w_t + 3 * H * H), input_precision=PRECISION)
    return acc_0, acc_1, acc_2, acc_3


@triton.jit
def resident_gate_products(
    acc_0,
    acc_1,
    acc_2,
    acc_3,
    src_ptr,
    scale_ptr,
    w_0,
    w_1,
    w_2,
    w_3,
    rows,
    ks,
    live,
    H: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALED: tl.constexpr,
    GATES: tl.constexpr,
):
    """:func:`gate_products` with Wᵀ's tiles held (:func:`transposed_tiles`): all of x in one load,
    one product per gate."""
    at = rows[:, None] * H + ks[None, :]
    x = load_past_l1(src_ptr + at, live, scale_ptr + at, SCALED).to(w_0.dtype)
    acc_0 += tl.dot(x, w_0, input_precision=PRECISION)
    if GATES > 1:
        acc_1 += tl.dot(x, w_1, input_precision=PRECISION)
        acc_2 += tl.dot(x, w_2, input_precision=PRECISION)
    if GATES > 3:
        acc_3 += tl.dot(x, w_3, input_precision=PRECISION)
    return acc_0, acc_1, acc_2, acc_3


@triton.jit
def gradient_products(
    dh,
    dz_ptr,
    w_ptr,
    rows,
    units,
    ks,
    live,
    H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW: tl.constexpr,
    GATES: tl.constexpr,
    SLOT_2: tl.constexpr,
):
    """dh += dz W[:, units]: rows of a slab of gate gradients at ``dz_ptr`` (other programs' writes;
    ``ROW`` wide) times W (GATES·H, H) at ``w_ptr``, summed over the gates a BLOCK_K-wide tile at a
    time. Gate q's gradients sit in slot q of a row, but gate 2's in slot ``SLOT_2`` (the GRU's input
    side: slot 3, ∂n; see the module docstring)."""
    dz_row = dz_ptr + rows[:, None] * ROW
    if SLOT_2 == 2:  # the gates' slots side by side: one loop over all of them
        dh = slab_products(dh, dz_row, w_ptr, 0, 0, GATES * H, units, ks, live, H, BLOCK_K, PRECISION)
    else:  # gates 0 and 1 from slots 0 and 1, gate 2 from slot SLOT_2
        dh = slab_products(dh, dz_row, w_ptr, 0, 0, 2 * H, units, ks, live, H, BLOCK_K, PRECISION)
        dh = slab_products(dh, dz_row, w_ptr, SLOT_2 * H, 2 * H, H, units, ks, live, H, BLOCK_K, PRECISION)
    return dh


@triton.jit
def slab_products(
    dh,
    dz_row,
    w_ptr,
    COLUMN: tl.constexpr,
    W_ROW: tl.constexpr,
    WIDTH: tl.constexpr,
    units,
    ks,
    live,
    H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dh += dz[rows, COLUMN : COLUMN + WIDTH] W[W_ROW : W_ROW + WIDTH, units], a BLOCK_K-wide tile at a
    time; ``dz_row`` points at the rows' starts."""
    for k0 in range(0, WIDTH, BLOCK_K):
        block = load_past_l1(dz_row + (COLUMN + k0 + ks)[None, :], live, dz_row, False)
        w = tl.load(w_ptr + (W_ROW + k0 + ks)[:, None] * H + units[None, :])
        dh += tl.dot(block.to(w_ptr.dtype.element_ty), w, input_precision=PRECISION)
    return dh


@triton.jit
def resident_gradient_products(
    dh,
    dz_ptr,
    w_0,
    w_1,
    w_2,
    w_3,
    rows,
    ks,
    live,
    H: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW: tl.constexpr,
    GATES: tl.constexpr,
    SLOT_2: tl.constexpr,
):
    """:func:`gradient_products` with W's rows held (:func:`row_tiles`): gate by gate, one product each."""
    dz_row = dz_ptr + rows[:, None] * ROW + ks[None, :]
    dh += product_past_l1(dz_row, live, w_0, PRECISION)
    if GATES > 1:
        dh += product_past_l1(dz_row + H, live, w_1, PRECISION)
        dh += product_past_l1(dz_row + SLOT_2 * H, live, w_2, PRECISION)
    if GATES > 3:
        dh += product_past_l1(dz_row + 3 * H, live, w_3, PRECISION)
    return dh


@triton.jit
def gate_tiles(ptr, rows, units, live, H: tl.constexpr, ROW: tl.constexpr, GATES: tl.constexpr):
    """The gates' (rows, units) blocks of a slab ``ROW`` wide at ``ptr`` (gate q at column q·H); places
    past a cell's gates hold gate 0's."""
    at = ptr + rows[:, None] * ROW + units[None, :]
    g_0 = tl.load(at, mask=live, other=0.0)
    g_1 = g_0
    g_2 = g_0
    g_3 = g_0
    if GATES > 1:
        g_1 = tl.load(at + H, mask=live, other=0.0)
        g_2 = tl.load(at + 2 * H, mask=live, other=0.0)
    if GATES > 3:
        g_3 = tl.load(at + 3 * H, mask=live, other=0.0)
    return g_0, g_1, g_2, g_3


@triton.jit
def bias_gates(
    bias_ptr, units, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, H: tl.constexpr, GATES: tl.constexpr
):
    """The gates' biases (a GATES·H vector at ``bias_ptr``) for this program's units, on every row."""
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    b_0 = zero + tl.load(bias_ptr + units)[None, :]
    b_1 = b_0
    b_2 = b_0
    b_3 = b_0
    if GATES > 1:
        b_1 = zero + tl.load(bias_ptr + H + units)[None, :]
        b_2 = zero + tl.load(bias_ptr + 2 * H + units)[None, :]
    if GATES > 3:
        b_3 = zero + tl.load(bias_ptr + 3 * H + units)[None, :]
    return b_0, b_1, b_2, b_3


@triton.jit
def forward(
    xg_ptr,  # (T, B, G·H) fp32: layer 0's x_t W_ihᵀ + b_ih + b_hh for every timestep (GRU: b_hn apart)
    w_ptr,  # (L, G·H, H) every layer's W_hh in the product dtype
    wx_ptr,  # (L - 1, G·H, H) W_ih of layers 1 … L-1 in the product dtype (read only when LAYERS > 1)
    bias_ptr,  # (L - 1, G·H) fp32: b_ih + b_hh of layers 1 … L-1 (GRU: b_hn apart)
    hbias_ptr,  # (L, H) fp32: the GRU's b_hn of every layer (read only by the GRU)
    mask_ptr,  # (L - 1, T, B, H) fp32: the dropout scale of each lower layer's output (MASKED only)
    hs_ptr,  # (L, T + 1, B, H) fp32: hs[l, 0] = h0 (given), hs[l, t + 1] = h_t (written)
    cs_ptr,  # (L, T + 1, B, H) fp32: likewise for the LSTM's c (read only by the LSTM)
    act_ptr,  # (L, T, B, 4H) fp32: what the backward pass needs (the module docstring; not the RNN's)
    flags_ptr,
    error_ptr,
    t_begin,
    n_steps,
    T,
    B,
    H: tl.constexpr,
    spin_limit,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    FLAGS: tl.constexpr,
    PRECISION: tl.constexpr,
    RESIDENT: tl.constexpr,
    COUNTER: tl.constexpr,
    LAYERS: tl.constexpr,
    MASKED: tl.constexpr,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    SLOTS: tl.constexpr,
    INPUT_SLOT_2: tl.constexpr,
):
    """``n_steps`` super-steps from ``t_begin`` of a stack of LAYERS layers: at super-step s, layer l
    runs timestep s - l (a wavefront), its input h_{s-l} of layer l - 1 written one super-step before."""
    rows, units, ks, live, here = program_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    # The grid's last axis counts layers from the top: Triton's interpreter runs the programs of a
    # tile's column (its third axis innermost) top layer first, so were a layer to read what the
    # layer below writes in the same super-step, the tests would see stale values.
    layer = LAYERS - 1 - tl.program_id(2)
    layer64 = layer.to(tl.int64)  # offsets of a (L, T, B, 4H) buffer can pass 2³¹ elements
    below = tl.maximum(layer64 - 1, 0)  # layer 0 reads no W_ih here: its input gates come in xg
    w_layer = w_ptr + layer64 * GATES * H * H
    wx_layer = wx_ptr + below * GATES * H * H
    hs_layer = hs_ptr + layer64 * (T + 1) * B * H
    cs_layer = cs_ptr + layer64 * (T + 1) * B * H
    if RESIDENT:  # BLOCK_K == H: this program's Wᵀ tiles, read once for all timesteps
        w_0, w_1, w_2, w_3 = transposed_tiles(w_layer, units, ks, H, GATES)
        if LAYERS > 1:
            x_0, x_1, x_2, x_3 = transposed_tiles(wx_layer, units, ks, H, GATES)
    if CELL == GRU:  # b_hn for this program's units, read once for all timesteps
        b_hn = tl.load(hbias_ptr + layer64 * H + units)
    for s in range(n_steps):
        step = t_begin + s - layer
        if (step >= 0) & (step < T):
            t = step.to(tl.int64)
            xg = xg_ptr + t * B * GATES * H
            if LAYERS > 1:
                if layer > 0:  # the input gates: b + dropout(h_t of the layer below) W_ihᵀ
                    acc_0, acc_1, acc_2, acc_3 = bias_gates(
                        bias_ptr + below * GATES * H, units, BLOCK_B, BLOCK_H, H, GATES
                    )
                    h_below = hs_ptr + below * (T + 1) * B * H + (t + 1) * B * H
                    scale = mask_ptr + (below * T + t) * B * H
                    if RESIDENT:
                        acc_0, acc_1, acc_2, acc_3 = resident_gate_products(
                            acc_0,
                            acc_1,
                            acc_2,
                            acc_3,
                            h_below,
                            scale,
                            x_0,
                            x_1,
                            x_2,
                            x_3,
                            rows,
                            ks,
                            live,
                            H,
                            PRECISION,
                            MASKED,
                            GATES,
                        )
                    else:
                        acc_0, acc_1, acc_2, acc_3 = gate_products(
                            acc_0,
                            acc_1,
                            acc_2,
                            acc_3,
                            h_below,
                            scale,
                            wx_layer,
                            rows,
                            units,
                            ks,
                            live,
                            H,
                            BLOCK_K,
                            PRECISION,
                            MASKED,
                            GATES,
                        )
                else:
                    acc_0, acc_1, acc_2, acc_3 = gate_tiles(xg, rows, units, live, H, GATES * H, GATES)
            else:
                acc_0, acc_1, acc_2, acc_3 = gate_tiles(xg, rows, units, live, H, GATES * H, GATES)
            # + h_{t-1} W_hhᵀ, h_{t-1} written by other programs one super-step before. The GRU's n
            # gate keeps its recurrent term apart (r multiplies it): the product adds into place 2, which
            # holds b_hn for it meanwhile, and n's input term waits in place 3; then they swap back.
            h_prev = hs_layer + t * B * H
            if CELL == GRU:
                acc_2, acc_3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32) + b_hn[None, :], acc_2
            if RESIDENT:
                acc_0, acc_1, acc_2, acc_3 = resident_gate_products(
                    acc_0,
                    acc_1,
                    acc_2,
                    acc_3,
                    h_prev,
                    h_prev,
                    w_0,
                    w_1,
                    w_2,
                    w_3,
                    rows,
                    ks,
                    live,
                    H,
                    PRECISION,
                    False,
                    GATES,
                )
            else:
                acc_0, acc_1, acc_2, acc_3 = gate_products(
                    acc_0,
                    acc_1,
                    acc_2,
                    acc_3,
                    h_prev,
                    h_prev,
                    w_layer,
                    rows,
                    units,
                    ks,
                    live,
                    H,
                    BLOCK_K,
                    PRECISION,
                    False,
                    GATES,
                )
            if CELL == GRU:  # acc_2: n's input term, acc_3: h_{t-1} W_hnᵀ + b_hn
                acc_2, acc_3 = acc_3, acc_2
            h_next = hs_layer + (t + 1) * B * H + here
            act = act_ptr + (layer64 * T + t) * B * 4 * H + rows[:, None] * (4 * H) + units[None, :]
            if CELL == LSTM:
                gi = sigmoid(acc_0)
                gf = sigmoid(acc_1)
                gg = tanh(acc_2)
                go = sigmoid(acc_3)
                c = gf * tl.load(cs_layer + t * B * H + here, mask=live, other=0.0) + gi * gg
                tl.store(cs_layer + (t + 1) * B * H + here, c, mask=live)
                tl.store(h_next, go * tanh(c), mask=live)
                tl.store(act, gi, mask=live)
                tl.store(act + H, gf, mask=live)
                tl.store(act + 2 * H, gg, mask=live)
                tl.store(act + 3 * H, go, mask=live)
            elif CELL == GRU:
                r = sigmoid(acc_0)
                z = sigmoid(acc_1)
                n = tanh(acc_2 + r * acc_3)
                h_old = tl.load(h_prev + here, mask=live, other=0.0)  # this program's own units
                tl.store(h_next, n + z * (h_old - n), mask=live)  # (1 - z)·n + z·h, as PyTorch's
                tl.store(act, r, mask=live)
                tl.store(act + H, z, mask=live)
                tl.store(act + 2 * H, n, mask=live)
                tl.store(act + 3 * H, acc_3, mask=live)
            elif CELL == RNN_TANH:
                tl.store(h_next, tanh(acc_0), mask=live)
            else:
                tl.store(h_next, tl.maximum(acc_0, 0.0), mask=live)
        if PERSISTENT:
            meet(flags_ptr, error_ptr, s + 1, spin_limit, NUM_PROGRAMS, FLAGS, COUNTER)


@triton.jit
def backward(
    w_ptr,  # (L, G·H, H) W_hh in the product dtype
    wx_ptr,  # (L - 1, G·H, H) W_ih of layers 1 … L-1 in the product dtype (read only when LAYERS > 1)
    mask_ptr,  # (L - 1, T, B, H) fp32: the dropout scale of each lower layer's output (MASKED only)
    act_ptr,  # (L, T, B, 4H) fp32 from the forward pass (not the RNN's)
    states_ptr,  # (L, T + 1, B, H) fp32 from the forward pass: the LSTM's cs, the others' hs
    dout_ptr,  # (L, T, B, H) fp32: ∂loss/∂h_t from outside the stack (the top layer's outputs; h_T)
    dz_ptr,  # (L, T + 1, B, SLOTS·H) fp32: the gate gradients (module docstring); dz[:, T] = 0 on entry
    dc_ptr,  # (L, B, H) fp32, carried back a timestep: the LSTM's ∂loss/∂c (∂c_T in, ∂c_0 out); the
    # GRU's ∂h_t·z_t (zero in, ∂h_0's direct share out); not the RNN's
    flags_ptr,
    error_ptr,
    t_last,
    n_steps,
    T,
    B,
    H: tl.constexpr,
    spin_limit,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    FLAGS: tl.constexpr,
    PRECISION: tl.constexpr,
    RESIDENT: tl.constexpr,
    COUNTER: tl.constexpr,
    LAYERS: tl.constexpr,
    MASKED: tl.constexpr,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    SLOTS: tl.constexpr,
    INPUT_SLOT_2: tl.constexpr,
):
    """``n_steps`` super-steps back from ``t_last``: at super-step s the top layer runs timestep
    t_last - s and layer l the one after it by L - 1 - l, once the layer above has its gate gradients."""
    rows, units, ks, live, here = program_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    # Layers counted from the bottom, so the interpreter runs a tile's layers bottom first (see
    # forward): reading the gradients the layer above writes in the same super-step fails the tests.
    layer = tl.program_id(2)
    layer64 = layer.to(tl.int64)
    above = tl.maximum(tl.minimum(layer64, LAYERS - 2), 0)  # W_ih of layer l + 1 sits at wx[l]
    w_layer = w_ptr + layer64 * GATES * H * H
    wx_above = wx_ptr + above * GATES * H * H
    dz_layer = dz_ptr + layer64 * (T + 1) * B * SLOTS * H
    states_layer = states_ptr + layer64 * (T + 1) * B * H
    if RESIDENT:  # BLOCK_K == H: W[q·H + k, units] for the gates q, read once for all timesteps
        w_0, w_1, w_2, w_3 = row_tiles(w_layer, units, ks, H, GATES)
        if LAYERS > 1:
            x_0, x_1, x_2, x_3 = row_tiles(wx_above, units, ks, H, GATES)
    for s in range(n_steps):
        step = t_last - s + (LAYERS - 1 - layer)
        if (step >= 0) & (step < T):
            t = step.to(tl.int64)
            # ∂h_t = ∂out_t + dz_{t+1} W_hh[:, units] (the recurrent path, summed over the gates)
            dh = tl.load(dout_ptr + (layer64 * T + t) * B * H + here, mask=live, other=0.0)
            dz_next = dz_layer + (t + 1) * B * SLOTS * H
            if RESIDENT:
                dh = resident_gradient_products(
                    dh, dz_next, w_0, w_1, w_2, w_3, rows, ks, live, H, PRECISION, SLOTS * H, GATES, 2
                )
            else:
                dh = gradient_products(
                    dh, dz_next, w_layer, rows, units, ks, live, H, BLOCK_K, PRECISION, SLOTS * H, GATES, 2
                )
            if LAYERS > 1:  # noqa: SIM102 (a compile-time test; Triton cannot join it with a runtime one)
                if layer < LAYERS - 1:  # + dropout'(dz_t of the layer above W_ih[:, units])
                    dz_above = dz_ptr + ((layer64 + 1) * (T + 1) + t) * B * SLOTS * H
                    dx = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    # what the input product received: the GRU's ∂n sits in slot INPUT_SLOT_2 = 3
                    if RESIDENT:
                        dx = resident_gradient_products(
                            dx,
                            dz_above,
                            x_0,
                            x_1,
                            x_2,
                            x_3,
                            rows,
                            ks,
                            live,
                            H,
                            PRECISION,
                            SLOTS * H,
                            GATES,
                            INPUT_SLOT_2,
                        )
                    else:
                        dx = gradient_products(
                            dx,
                            dz_above,
                            wx_above,
                            rows,
                            units,
                            ks,
                            live,
                            H,
                            BLOCK_K,
                            PRECISION,
                            SLOTS * H,
                            GATES,
                            INPUT_SLOT_2,
                        )
                    if MASKED:
                        dx = dx * tl.load(mask_ptr + (layer64 * T + t) * B * H + here, mask=live, other=0.0)
                    dh += dx
            dz = dz_layer + t * B * SLOTS * H + rows[:, None] * (SLOTS * H) + units[None, :]
            if CELL == RNN_TANH:
                h = tl.load(states_layer + (t + 1) * B * H + here, mask=live, other=0.0)
                tl.store(dz, dh * (1.0 - h * h), mask=live)
            elif CELL == RNN_RELU:
                h = tl.load(states_layer + (t + 1) * B * H + here, mask=live, other=0.0)
                tl.store(dz, tl.where(h > 0.0, dh, 0.0), mask=live)
            else:
                act = act_ptr + (layer64 * T + t) * B * 4 * H
                g_0, g_1, g_2, g_3 = gate_tiles(act, rows, units, live, H, 4 * H, 4)
                dc_here = dc_ptr + layer64 * B * H + here
                if CELL == LSTM:  # g: σ(i), σ(f), tanh(g), σ(o)
                    c = tl.load(states_layer + (t + 1) * B * H + here, mask=live, other=0.0)
                    c_prev = tl.load(states_layer + t * B * H + here, mask=live, other=0.0)
                    tc = tanh(c)
                    dc = tl.load(dc_here, mask=live, other=0.0) + dh * g_3 * (1.0 - tc * tc)
                    tl.store(dz, dc * g_2 * g_0 * (1.0 - g_0), mask=live)
                    tl.store(dz + H, dc * c_prev * g_1 * (1.0 - g_1), mask=live)
                    tl.store(dz + 2 * H, dc * g_0 * (1.0 - g_2 * g_2), mask=live)
                    tl.store(dz + 3 * H, dh * tc * g_3 * (1.0 - g_3), mask=live)
                    tl.store(dc_here, dc * g_1, mask=live)
                else:  # the GRU; g: r, z, n, hn; h' = n + z·(h - n)
                    dh += tl.load(dc_here, mask=live, other=0.0)  # ∂h_{t+1}·z_{t+1}: h's direct path
                    h_old = tl.load(states_layer + t * B * H + here, mask=live, other=0.0)
                    dn = dh * (1.0 - g_1) * (1.0 - g_2 * g_2)
                    tl.store(dz, dn * g_3 * g_0 * (1.0 - g_0), mask=live)
                    tl.store(dz + H, dh * (h_old - g_2) * g_1 * (1.0 - g_1), mask=live)
                    tl.store(dz + 2 * H, dn * g_0, mask=live)
                    tl.store(dz + 3 * H, dn, mask=live)
                    tl.store(dc_here, dh * g_1, mask=live)
        if PERSISTENT:
            meet(flags_ptr, error_ptr, s + 1, spin_limit, NUM_PROGRAMS, FLAGS, COUNTER)
