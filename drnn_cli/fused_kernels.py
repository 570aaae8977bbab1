"""The Triton kernels behind ``model.impl: fused`` (see :mod:`drnn_cli.fused_lstm` for the design).

Imported only when the fused kernels run, so drnn imports without Triton. ``triton.jit`` decides at
import whether the kernels compile for the GPU or run in the CPU interpreter (``TRITON_INTERPRET=1``).
Index layout: every (L, T, B, X) buffer is contiguous, so element [l, t, b, x] sits at
``((l·T + t)·B + b)·X + x``. One launch runs the recurrence of one layer, or of a whole stack as a
wavefront (``LAYERS`` > 1): the grid's third axis is the layer, and layer l runs timestep t at
super-step t + l, so the layers' timesteps overlap and the stack meets at T + L - 1 barriers, not L·T.
"""

import triton
import triton.language as tl


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
    offsets of (row, unit) in a (B, H) slab and of gate 0's column for it in a (B, 4H) slab."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    live = (rows < B)[:, None]
    here = rows[:, None] * H + units[None, :]
    gate_here = rows[:, None] * (4 * H) + units[None, :]
    return rows, units, ks, live, here, gate_here


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
def transposed_tiles(w_ptr, units, ks, H: tl.constexpr):
    """The four gates' tiles of Wᵀ over all of K (= H) for this program's units: element [k, j] of
    gate q's is W[q·H + units[j], k], for W (4H, H) at ``w_ptr`` (the forward pass's products)."""
    w_t = w_ptr + units[None, :] * H + ks[:, None]
    return tl.load(w_t), tl.load(w_t + H * H), tl.load(w_t + 2 * H * H), tl.load(w_t + 3 * H * H)


@triton.jit
def row_tiles(w_ptr, units, ks, H: tl.constexpr):
    """W[q·H + k, units] for the four gates q and all k < H (the backward pass's products)."""
    w_rows = w_ptr + ks[:, None] * H + units[None, :]
    return tl.load(w_rows), tl.load(w_rows + H * H), tl.load(w_rows + 2 * H * H), tl.load(w_rows + 3 * H * H)


@triton.jit
def gate_products(
    acc_i,
    acc_f,
    acc_g,
    acc_o,
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
):
    """acc_q += x W_qᵀ[:, units] for the gates q = i, f, g, o: x is rows of the (B, H) slab at
    ``src_ptr`` (times the dropout scale at ``scale_ptr`` if SCALED), W (4H, H) sits at ``w_ptr``;
    one BLOCK_K-wide tile of K at a time, W's tiles read from memory at every call."""
    for k0 in range(0, H, BLOCK_K):
        at = rows[:, None] * H + (k0 + ks)[None, :]
        x = load_past_l1(src_ptr + at, live, scale_ptr + at, SCALED).to(w_ptr.dtype.element_ty)
        # Wᵀ tile of gate q: element [k, j] = W[q·H + units[j], k0 + k]
        w_t = w_ptr + units[None, :] * H + (k0 + ks)[:, None]
        acc_i += tl.dot(x, tl.load(w_t), input_precision=PRECISION)
        acc_f += tl.dot(x, tl.load(w_t + H * H), input_precision=PRECISION)
        acc_g += tl.dot(x, tl.load(w_t + 2 * H * H), input_precision=PRECISION)
        acc_o += tl.dot(x, tl.load(w_t + 3 * H * H), input_precision=PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def resident_gate_products(
    acc_i,
    acc_f,
    acc_g,
    acc_o,
    src_ptr,
    scale_ptr,
    w_i,
    w_f,
    w_g,
    w_o,
    rows,
    ks,
    live,
    H: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALED: tl.constexpr,
):
    """:func:`gate_products` with Wᵀ's tiles held (:func:`transposed_tiles`): all of x in one load,
    one product per gate."""
    at = rows[:, None] * H + ks[None, :]
    x = load_past_l1(src_ptr + at, live, scale_ptr + at, SCALED).to(w_i.dtype)
    acc_i += tl.dot(x, w_i, input_precision=PRECISION)
    acc_f += tl.dot(x, w_f, input_precision=PRECISION)
    acc_g += tl.dot(x, w_g, input_precision=PRECISION)
    acc_o += tl.dot(x, w_o, input_precision=PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def gradient_products(
    dh, dz_ptr, w_ptr, rows, units, ks, live, H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr
):
    """dh += dz W[:, units]: rows of the (B, 4H) slab of gate gradients at ``dz_ptr`` (other programs'
    writes) times W (4H, H) at ``w_ptr``, summed over all 4H gates a BLOCK_K-wide tile at a time."""
    for k0 in range(0, 4 * H, BLOCK_K):
        block = load_past_l1(dz_ptr + rows[:, None] * (4 * H) + (k0 + ks)[None, :], live, dz_ptr, False)
        w = tl.load(w_ptr + (k0 + ks)[:, None] * H + units[None, :])
        dh += tl.dot(block.to(w_ptr.dtype.element_ty), w, input_precision=PRECISION)
    return dh


@triton.jit
def resident_gradient_products(
    dh, dz_ptr, w_i, w_f, w_g, w_o, rows, ks, live, H: tl.constexpr, PRECISION: tl.constexpr
):
    """:func:`gradient_products` with W's rows held (:func:`row_tiles`): gate by gate, one product each."""
    dz_row = dz_ptr + rows[:, None] * (4 * H) + ks[None, :]
    dh += product_past_l1(dz_row, live, w_i, PRECISION)
    dh += product_past_l1(dz_row + H, live, w_f, PRECISION)
    dh += product_past_l1(dz_row + 2 * H, live, w_g, PRECISION)
    dh += product_past_l1(dz_row + 3 * H, live, w_o, PRECISION)
    return dh


@triton.jit
def input_gates(xg_ptr, gate_here, live, H: tl.constexpr):
    """The four gates' precomputed input terms at one timestep's (B, 4H) slab ``xg_ptr``."""
    acc_i = tl.load(xg_ptr + gate_here, mask=live, other=0.0)
    acc_f = tl.load(xg_ptr + gate_here + H, mask=live, other=0.0)
    acc_g = tl.load(xg_ptr + gate_here + 2 * H, mask=live, other=0.0)
    acc_o = tl.load(xg_ptr + gate_here + 3 * H, mask=live, other=0.0)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def bias_gates(bias_ptr, units, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, H: tl.constexpr):
    """The four gates' biases (a 4H vector at ``bias_ptr``) for this program's units, on every row."""
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    return (
        zero + tl.load(bias_ptr + units)[None, :],
        zero + tl.load(bias_ptr + H + units)[None, :],
        zero + tl.load(bias_ptr + 2 * H + units)[None, :],
        zero + tl.load(bias_ptr + 3 * H + units)[None, :],
    )


@triton.jit
def forward(
    xg_ptr,  # (T, B, 4H) fp32: layer 0's x_t W_ihᵀ + b_ih + b_hh for every timestep
    w_ptr,  # (L, 4H, H) every layer's W_hh in the product dtype
    wx_ptr,  # (L - 1, 4H, H) W_ih of layers 1 … L-1 in the product dtype (read only when LAYERS > 1)
    bias_ptr,  # (L - 1, 4H) fp32: b_ih + b_hh of layers 1 … L-1
    mask_ptr,  # (L - 1, T, B, H) fp32: the dropout scale of each lower layer's output (MASKED only)
    hs_ptr,  # (L, T + 1, B, H) fp32: hs[l, 0] = h0 (given), hs[l, t + 1] = h_t (written)
    cs_ptr,  # (L, T + 1, B, H) fp32: likewise for c
    act_ptr,  # (L, T, B, 4H) fp32: σ(i), σ(f), tanh(g), σ(o) at every step, for the backward pass
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
):
    """``n_steps`` super-steps from ``t_begin`` of a stack of LAYERS layers: at super-step s, layer l
    runs timestep s - l (a wavefront), its input h_{s-l} of layer l - 1 written one super-step before."""
    rows, units, ks, live, here, gate_here = program_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    # The grid's last axis counts layers from the top: Triton's interpreter runs the programs of a
    # tile's column (its third axis innermost) top layer first, so were a layer to read what the
    # layer below writes in the same super-step, the tests would see stale values.
    layer = LAYERS - 1 - tl.program_id(2)
    layer64 = layer.to(tl.int64)  # offsets of a (L, T, B, 4H) buffer can pass 2³¹ elements
    below = tl.maximum(layer64 - 1, 0)  # layer 0 reads no W_ih here: its input gates come in xg
    w_layer = w_ptr + layer64 * 4 * H * H
    wx_layer = wx_ptr + below * 4 * H * H
    hs_layer = hs_ptr + layer64 * (T + 1) * B * H
    cs_layer = cs_ptr + layer64 * (T + 1) * B * H
    if RESIDENT:  # BLOCK_K == H: this program's Wᵀ tiles, read once for all timesteps
        w_i, w_f, w_g, w_o = transposed_tiles(w_layer, units, ks, H)
        if LAYERS > 1:
            x_i, x_f, x_g, x_o = transposed_tiles(wx_layer, units, ks, H)
    for s in range(n_steps):
        step = t_begin + s - layer
        if (step >= 0) & (step < T):
            t = step.to(tl.int64)
            xg = xg_ptr + t * B * 4 * H
            if LAYERS > 1:
                if layer > 0:  # the input gates: b + dropout(h_t of the layer below) W_ihᵀ
                    acc_i, acc_f, acc_g, acc_o = bias_gates(
                        bias_ptr + below * 4 * H, units, BLOCK_B, BLOCK_H, H
                    )
                    h_below = hs_ptr + below * (T + 1) * B * H + (t + 1) * B * H
                    scale = mask_ptr + (below * T + t) * B * H
                    if RESIDENT:
                        acc_i, acc_f, acc_g, acc_o = resident_gate_products(
                            acc_i,
                            acc_f,
                            acc_g,
                            acc_o,
                            h_below,
                            scale,
                            x_i,
                            x_f,
                            x_g,
                            x_o,
                            rows,
                            ks,
                            live,
                            H,
                            PRECISION,
                            MASKED,
                        )
                    else:
                        acc_i, acc_f, acc_g, acc_o = gate_products(
                            acc_i,
                            acc_f,
                            acc_g,
                            acc_o,
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
                        )
                else:
                    acc_i, acc_f, acc_g, acc_o = input_gates(xg, gate_here, live, H)
            else:
                acc_i, acc_f, acc_g, acc_o = input_gates(xg, gate_here, live, H)
            # + h_{t-1} W_hhᵀ, h_{t-1} written by other programs one super-step before
            h_prev = hs_layer + t * B * H
            if RESIDENT:
                acc_i, acc_f, acc_g, acc_o = resident_gate_products(
                    acc_i,
                    acc_f,
                    acc_g,
                    acc_o,
                    h_prev,
                    h_prev,
                    w_i,
                    w_f,
                    w_g,
                    w_o,
                    rows,
                    ks,
                    live,
                    H,
                    PRECISION,
                    False,
                )
            else:
                acc_i, acc_f, acc_g, acc_o = gate_products(
                    acc_i,
                    acc_f,
                    acc_g,
                    acc_o,
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
                )
            gi = sigmoid(acc_i)
            gf = sigmoid(acc_f)
            gg = tanh(acc_g)
            go = sigmoid(acc_o)
            c = gf * tl.load(cs_layer + t * B * H + here, mask=live, other=0.0) + gi * gg
            tl.store(cs_layer + (t + 1) * B * H + here, c, mask=live)
            tl.store(hs_layer + (t + 1) * B * H + here, go * tanh(c), mask=live)
            act = act_ptr + (layer64 * T + t) * B * 4 * H + gate_here
            tl.store(act, gi, mask=live)
            tl.store(act + H, gf, mask=live)
            tl.store(act + 2 * H, gg, mask=live)
            tl.store(act + 3 * H, go, mask=live)
        if PERSISTENT:
            meet(flags_ptr, error_ptr, s + 1, spin_limit, NUM_PROGRAMS, FLAGS, COUNTER)


@triton.jit
def backward(
    w_ptr,  # (L, 4H, H) W_hh in the product dtype
    wx_ptr,  # (L - 1, 4H, H) W_ih of layers 1 … L-1 in the product dtype (read only when LAYERS > 1)
    mask_ptr,  # (L - 1, T, B, H) fp32: the dropout scale of each lower layer's output (MASKED only)
    act_ptr,  # (L, T, B, 4H) fp32 from the forward pass
    cs_ptr,  # (L, T + 1, B, H) fp32 from the forward pass
    dout_ptr,  # (L, T, B, H) fp32: ∂loss/∂h_t from outside the stack (the top layer's outputs; h_T)
    dz_ptr,  # (L, T + 1, B, 4H) fp32: ∂loss/∂(pre-activation gates); dz[:, T] = 0 on entry
    dc_ptr,  # (L, B, H) fp32: ∂loss/∂c_T on entry, ∂loss/∂c_0 on exit
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
):
    """``n_steps`` super-steps back from ``t_last``: at super-step s the top layer runs timestep
    t_last - s and layer l the one after it by L - 1 - l, once the layer above has its gate gradients."""
    rows, units, ks, live, here, gate_here = program_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    # Layers counted from the bottom, so the interpreter runs a tile's layers bottom first (see
    # forward): reading the gradients the layer above writes in the same super-step fails the tests.
    layer = tl.program_id(2)
    layer64 = layer.to(tl.int64)
    above = tl.maximum(tl.minimum(layer64, LAYERS - 2), 0)  # W_ih of layer l + 1 sits at wx[l]
    w_layer = w_ptr + layer64 * 4 * H * H
    wx_above = wx_ptr + above * 4 * H * H
    dz_layer = dz_ptr + layer64 * (T + 1) * B * 4 * H
    cs_layer = cs_ptr + layer64 * (T + 1) * B * H
    if RESIDENT:  # BLOCK_K == H: W[q·H + k, units] for the four gates q, read once for all timesteps
        w_i, w_f, w_g, w_o = row_tiles(w_layer, units, ks, H)
        if LAYERS > 1:
            x_i, x_f, x_g, x_o = row_tiles(wx_above, units, ks, H)
    for s in range(n_steps):
        step = t_last - s + (LAYERS - 1 - layer)
        if (step >= 0) & (step < T):
            t = step.to(tl.int64)
            # ∂h_t = ∂out_t + dz_{t+1} W_hh[:, units] (the recurrent path, summed over all 4H gates)
            dh = tl.load(dout_ptr + (layer64 * T + t) * B * H + here, mask=live, other=0.0)
            dz_next = dz_layer + (t + 1) * B * 4 * H
            if RESIDENT:
                dh = resident_gradient_products(dh, dz_next, w_i, w_f, w_g, w_o, rows, ks, live, H, PRECISION)
            else:
                dh = gradient_products(dh, dz_next, w_layer, rows, units, ks, live, H, BLOCK_K, PRECISION)
            if LAYERS > 1:  # noqa: SIM102 (a compile-time test; Triton cannot join it with a runtime one)
                if layer < LAYERS - 1:  # + dropout'(dz_t of the layer above W_ih[:, units])
                    dz_above = dz_ptr + ((layer64 + 1) * (T + 1) + t) * B * 4 * H
                    dx = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    if RESIDENT:
                        dx = resident_gradient_products(
                            dx, dz_above, x_i, x_f, x_g, x_o, rows, ks, live, H, PRECISION
                        )
                    else:
                        dx = gradient_products(
                            dx, dz_above, wx_above, rows, units, ks, live, H, BLOCK_K, PRECISION
                        )
                    if MASKED:
                        dx = dx * tl.load(mask_ptr + (layer64 * T + t) * B * H + here, mask=live, other=0.0)
                    dh += dx
            act = act_ptr + (layer64 * T + t) * B * 4 * H + gate_here
            gi = tl.load(act, mask=live, other=0.0)
            gf = tl.load(act + H, mask=live, other=0.0)
            gg = tl.load(act + 2 * H, mask=live, other=0.0)
            go = tl.load(act + 3 * H, mask=live, other=0.0)
            c = tl.load(cs_layer + (t + 1) * B * H + here, mask=live, other=0.0)
            c_prev = tl.load(cs_layer + t * B * H + here, mask=live, other=0.0)
            tc = tanh(c)
            dc_here = dc_ptr + layer64 * B * H + here
            dc = tl.load(dc_here, mask=live, other=0.0) + dh * go * (1.0 - tc * tc)
            dz = dz_layer + t * B * 4 * H + gate_here
            tl.store(dz, dc * gg * gi * (1.0 - gi), mask=live)
            tl.store(dz + H, dc * c_prev * gf * (1.0 - gf), mask=live)
            tl.store(dz + 2 * H, dc * gi * (1.0 - gg * gg), mask=live)
            tl.store(dz + 3 * H, dh * tc * go * (1.0 - go), mask=live)
            tl.store(dc_here, dc * gf, mask=live)
        if PERSISTENT:
            meet(flags_ptr, error_ptr, s + 1, spin_limit, NUM_PROGRAMS, FLAGS, COUNTER)
