"""The Triton kernels behind ``model.impl: fused`` (see :mod:`drnn_cli.fused_lstm` for the design).

Imported only when the fused kernels run, so drnn imports without Triton. ``triton.jit`` decides at
import whether the kernels compile for the GPU or run in the CPU interpreter (``TRITON_INTERPRET=1``).
Index layout: every (T, B, X) buffer is contiguous, so element [t, b, x] sits at ``(t·B + b)·X + x``.
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
def grid_barrier(flags_ptr, error_ptr, arrival, spin_limit, NUM_PROGRAMS: tl.constexpr, FLAGS: tl.constexpr):
    """Every program has finished step ``arrival``: each raises its own flag to ``arrival``
    (idempotent, so it does not matter how many threads issue the store), then polls all flags.
    Release/acquire at GPU scope make the stores before the barrier visible to loads after it."""
    tl.debug_barrier()  # all of this program's threads have issued their stores
    me = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
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
def product_past_l1(ptr, live, w, PRECISION: tl.constexpr):
    """The (rows, K) block at ``ptr``, written by other programs and so read past L1 (.cg), in the
    product dtype, times a (K, units) tile ``w``."""
    block = tl.load(ptr, mask=live, other=0.0, cache_modifier=".cg").to(w.dtype)
    return tl.dot(block, w, input_precision=PRECISION)


@triton.jit
def forward(
    xg_ptr,  # (T, B, 4H) fp32: x_t W_ih^T + b_ih + b_hh for every timestep
    w_ptr,  # (4H, H) W_hh in the product dtype
    hs_ptr,  # (T + 1, B, H) fp32: hs[0] = h0 (given), hs[t + 1] = h_t (written)
    cs_ptr,  # (T + 1, B, H) fp32: likewise for c
    act_ptr,  # (T, B, 4H) fp32: σ(i), σ(f), tanh(g), σ(o) at every step, for the backward pass
    flags_ptr,
    error_ptr,
    t_begin,
    n_steps,
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
):
    rows, units, ks, live, here, gate_here = program_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    if RESIDENT:  # BLOCK_K == H: this program's four W_hh^T tiles, read once for all timesteps
        w_t = w_ptr + units[None, :] * H + ks[:, None]
        w_i = tl.load(w_t)
        w_f = tl.load(w_t + H * H)
        w_g = tl.load(w_t + 2 * H * H)
        w_o = tl.load(w_t + 3 * H * H)
    for s in range(n_steps):
        t = (t_begin + s).to(tl.int64)  # offsets of a (T, B, 4H) buffer can pass 2³¹ elements
        xg = xg_ptr + t * B * 4 * H
        acc_i = tl.load(xg + gate_here, mask=live, other=0.0)
        acc_f = tl.load(xg + gate_here + H, mask=live, other=0.0)
        acc_g = tl.load(xg + gate_here + 2 * H, mask=live, other=0.0)
        acc_o = tl.load(xg + gate_here + 3 * H, mask=live, other=0.0)
        if RESIDENT:  # all of h_{t-1}[rows] in one load, one product per gate
            h = tl.load(
                hs_ptr + t * B * H + rows[:, None] * H + ks[None, :],
                mask=live,
                other=0.0,
                cache_modifier=".cg",
            ).to(w_ptr.dtype.element_ty)
            acc_i += tl.dot(h, w_i, input_precision=PRECISION)
            acc_f += tl.dot(h, w_f, input_precision=PRECISION)
            acc_g += tl.dot(h, w_g, input_precision=PRECISION)
            acc_o += tl.dot(h, w_o, input_precision=PRECISION)
        else:
            for k0 in range(0, H, BLOCK_K):
                # h_{t-1}[rows, k0:k0+K], written by other programs: read past L1 (.cg)
                h = tl.load(
                    hs_ptr + t * B * H + rows[:, None] * H + (k0 + ks)[None, :],
                    mask=live,
                    other=0.0,
                    cache_modifier=".cg",
                ).to(w_ptr.dtype.element_ty)
                # W_hh^T tile of gate q: element [k, j] = W_hh[q·H + units[j], k0 + k]
                w_t = w_ptr + units[None, :] * H + (k0 + ks)[:, None]
                acc_i += tl.dot(h, tl.load(w_t), input_precision=PRECISION)
                acc_f += tl.dot(h, tl.load(w_t + H * H), input_precision=PRECISION)
                acc_g += tl.dot(h, tl.load(w_t + 2 * H * H), input_precision=PRECISION)
                acc_o += tl.dot(h, tl.load(w_t + 3 * H * H), input_precision=PRECISION)
        gi = sigmoid(acc_i)
        gf = sigmoid(acc_f)
        gg = tanh(acc_g)
        go = sigmoid(acc_o)
        c = gf * tl.load(cs_ptr + t * B * H + here, mask=live, other=0.0) + gi * gg
        tl.store(cs_ptr + (t + 1) * B * H + here, c, mask=live)
        tl.store(hs_ptr + (t + 1) * B * H + here, go * tanh(c), mask=live)
        act = act_ptr + t * B * 4 * H + gate_here
        tl.store(act, gi, mask=live)
        tl.store(act + H, gf, mask=live)
        tl.store(act + 2 * H, gg, mask=live)
        tl.store(act + 3 * H, go, mask=live)
        if PERSISTENT:
            meet(flags_ptr, error_ptr, s + 1, spin_limit, NUM_PROGRAMS, FLAGS, COUNTER)


@triton.jit
def backward(
    w_ptr,  # (4H, H) W_hh in the product dtype
    act_ptr,  # (T, B, 4H) fp32 from the forward pass
    cs_ptr,  # (T + 1, B, H) fp32 from the forward pass
    dout_ptr,  # (T, B, H) fp32: ∂loss/∂h_t from above (the last step's includes ∂loss/∂h_T)
    dz_ptr,  # (T + 1, B, 4H) fp32: ∂loss/∂(pre-activation gates); dz[T] = 0 on entry
    dc_ptr,  # (B, H) fp32: ∂loss/∂c_T on entry, ∂loss/∂c_0 on exit
    flags_ptr,
    error_ptr,
    t_last,
    n_steps,
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
):
    rows, units, ks, live, here, gate_here = program_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    if RESIDENT:  # BLOCK_K == H: W_hh[q·H + k, units] for the four gates q, read once for all timesteps
        w_rows = w_ptr + ks[:, None] * H + units[None, :]
        w_i = tl.load(w_rows)
        w_f = tl.load(w_rows + H * H)
        w_g = tl.load(w_rows + 2 * H * H)
        w_o = tl.load(w_rows + 3 * H * H)
    for s in range(n_steps):
        t = (t_last - s).to(tl.int64)  # offsets of a (T, B, 4H) buffer can pass 2³¹ elements
        # ∂h_t = ∂out_t + dz_{t+1} W_hh[:, units]: the recurrent path, summed over all 4H gates
        dh = tl.load(dout_ptr + t * B * H + here, mask=live, other=0.0)
        if RESIDENT:  # dz_{t+1}[rows] gate by gate, one product each
            dz_row = dz_ptr + (t + 1) * B * 4 * H + rows[:, None] * (4 * H) + ks[None, :]
            dh += product_past_l1(dz_row, live, w_i, PRECISION)
            dh += product_past_l1(dz_row + H, live, w_f, PRECISION)
            dh += product_past_l1(dz_row + 2 * H, live, w_g, PRECISION)
            dh += product_past_l1(dz_row + 3 * H, live, w_o, PRECISION)
        else:
            for k0 in range(0, 4 * H, BLOCK_K):
                dz_next = tl.load(
                    dz_ptr + (t + 1) * B * 4 * H + rows[:, None] * (4 * H) + (k0 + ks)[None, :],
                    mask=live,
                    other=0.0,
                    cache_modifier=".cg",
                ).to(w_ptr.dtype.element_ty)
                w = tl.load(w_ptr + (k0 + ks)[:, None] * H + units[None, :])
                dh += tl.dot(dz_next, w, input_precision=PRECISION)
        act = act_ptr + t * B * 4 * H + gate_here
        gi = tl.load(act, mask=live, other=0.0)
        gf = tl.load(act + H, mask=live, other=0.0)
        gg = tl.load(act + 2 * H, mask=live, other=0.0)
        go = tl.load(act + 3 * H, mask=live, other=0.0)
        c = tl.load(cs_ptr + (t + 1) * B * H + here, mask=live, other=0.0)
        c_prev = tl.load(cs_ptr + t * B * H + here, mask=live, other=0.0)
        tc = tanh(c)
        dc = tl.load(dc_ptr + here, mask=live, other=0.0) + dh * go * (1.0 - tc * tc)
        dz = dz_ptr + t * B * 4 * H + gate_here
        tl.store(dz, dc * gg * gi * (1.0 - gi), mask=live)
        tl.store(dz + H, dc * c_prev * gf * (1.0 - gf), mask=live)
        tl.store(dz + 2 * H, dc * gi * (1.0 - gg * gg), mask=live)
        tl.store(dz + 3 * H, dh * tc * go * (1.0 - go), mask=live)
        tl.store(dc_ptr + here, dc * gf, mask=live)
        if PERSISTENT:
            meet(flags_ptr, error_ptr, s + 1, spin_limit, NUM_PROGRAMS, FLAGS, COUNTER)
