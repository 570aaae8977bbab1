"""Splits and minibatch iterators: d2l 0.17.6's partition rules, reproducibility, sharding, evaluation.

The reference functions below are d2l's ``seq_data_iter_sequential`` / ``seq_data_iter_random``
(d2l 0.17.6 §8.3; README "Reproducing d2l") written out on plain lists, with the random draws passed
in, so every minibatch drnn yields can be compared with the one d2l would have yielded for the same
offset and shuffle.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from drnn_cli.batches import (
    EvalBatch,
    Shard,
    check_trainable,
    epoch_batches,
    epoch_generator,
    epoch_steps,
    eval_batches,
    mean_steps_per_epoch,
    random_batches,
    sequential_batches,
    split_tokens,
    training_batches,
)
from drnn_cli.config import DataConfig
from drnn_cli.errors import DrnnError

B, T = 2, 5
CORPUS = torch.arange(35)

# -------------------------------------------------------------------------------------------------
# d2l's algorithms, exactly as d2l 0.17.6 §8.3 states them, with the random draws as arguments


def d2l_sequential(
    corpus: list[int], batch_size: int, num_steps: int, offset: int
) -> list[tuple[list, list]]:
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = corpus[offset : offset + num_tokens]
    ys = corpus[offset + 1 : offset + 1 + num_tokens]
    row_len = num_tokens // batch_size
    x_rows = [xs[b * row_len : (b + 1) * row_len] for b in range(batch_size)]
    y_rows = [ys[b * row_len : (b + 1) * row_len] for b in range(batch_size)]
    num_batches = row_len // num_steps
    return [
        ([row[i : i + num_steps] for row in x_rows], [row[i : i + num_steps] for row in y_rows])
        for i in range(0, num_steps * num_batches, num_steps)
    ]


def d2l_random(
    corpus: list[int], batch_size: int, num_steps: int, offset: int, order: list[int]
) -> list[tuple[list, list]]:
    """``order`` is the shuffle: position k of the shuffled list holds subsequence ``order[k]``."""
    corpus = corpus[offset:]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    assert sorted(order) == list(range(num_subseqs))
    initial_indices = [initial_indices[k] for k in order]
    num_batches = num_subseqs // batch_size
    batches = []
    for i in range(0, batch_size * num_batches, batch_size):
        starts = initial_indices[i : i + batch_size]
        batches.append(
            ([corpus[j : j + num_steps] for j in starts], [corpus[j + 1 : j + 1 + num_steps] for j in starts])
        )
    return batches


# -------------------------------------------------------------------------------------------------
# Controlling drnn's draws: it takes the offset with torch.randint(0, high + 1) from the generator it
# is given, then (random partition) the shuffle with torch.randperm from the same generator.


def seed_for_offset(high: int, offset: int) -> int:
    """The first seed whose generator's first ``torch.randint(0, high + 1)`` draw is ``offset``."""
    for seed in range(10_000):
        generator = torch.Generator().manual_seed(seed)
        if int(torch.randint(0, high + 1, (1,), generator=generator)) == offset:
            return seed
    raise AssertionError(f"no seed draws offset {offset} from 0..{high}")


def shuffle_after_offset(seed: int, high: int, num_subseqs: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    torch.randint(0, high + 1, (1,), generator=generator)
    return torch.randperm(num_subseqs, generator=generator).tolist()


def as_lists(batches) -> list[tuple[list, list]]:
    return [(x.tolist(), y.tolist()) for x, y in batches]


# -------------------------------------------------------------------------------------------------
# Sequential partition


@pytest.mark.parametrize("offset", range(T + 1))
def test_sequential_partition_matches_d2l_for_every_offset(offset: int) -> None:
    seed = seed_for_offset(T, offset)
    batches = sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(seed))
    expected = d2l_sequential(list(range(35)), B, T, offset)
    assert as_lists(batches) == expected
    assert len(batches) == len(expected) == (((34 - offset) // B) // T)


def test_sequential_partition_with_offset_zero_by_hand() -> None:
    """35 tokens, no offset: 34 usable tokens → two rows of 17 → three minibatches of 5 columns."""
    batches = as_lists(sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(seed_for_offset(T, 0))))
    assert batches == [
        ([[0, 1, 2, 3, 4], [17, 18, 19, 20, 21]], [[1, 2, 3, 4, 5], [18, 19, 20, 21, 22]]),
        ([[5, 6, 7, 8, 9], [22, 23, 24, 25, 26]], [[6, 7, 8, 9, 10], [23, 24, 25, 26, 27]]),
        ([[10, 11, 12, 13, 14], [27, 28, 29, 30, 31]], [[11, 12, 13, 14, 15], [28, 29, 30, 31, 32]]),
    ]


def test_sequential_offset_ranges_over_zero_to_num_steps_inclusive() -> None:
    offsets = {
        int(next(iter(sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(s))))[0][0, 0])
        for s in range(200)
    }
    assert offsets == set(range(T + 1))


def test_sequential_targets_are_inputs_shifted_by_one() -> None:
    for seed in range(10):
        for x, y in sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(seed)):
            assert x.shape == y.shape == (B, T)
            assert torch.equal(y, x + 1)


def test_sequential_rows_continue_across_minibatches() -> None:
    for seed in range(10):
        batches = list(sequential_batches(torch.arange(200), 4, T, torch.Generator().manual_seed(seed)))
        assert len(batches) > 2
        for (x, _), (x_next, _) in itertools.pairwise(batches):
            assert torch.equal(x_next[:, 0], x[:, -1] + 1)


def test_sequential_partition_carries_state() -> None:
    batches = sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(0))
    assert batches.carries_state is True


def test_minibatches_are_int64_whatever_the_corpus_dtype() -> None:
    tokens = torch.arange(35, dtype=torch.uint8)
    for sampling in ("sequential", "random"):
        for x, y in training_batches(tokens, sampling, B, T, torch.Generator().manual_seed(0)):
            assert x.dtype == y.dtype == torch.int64


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_window_is_its_minibatch_inputs_then_the_last_target_in_the_corpus_dtype(
    sampling: str, world_size: int
) -> None:
    """What the training step copies: one (B/W, T+1) window per minibatch, X = its first T columns,
    Y = its last T, in the corpus' own dtype (the step's copy makes them int64)."""
    tokens = torch.arange(257, dtype=torch.int16)
    for seed in range(5):
        for rank in range(world_size):
            batches = training_batches(
                tokens, sampling, 4, T, torch.Generator().manual_seed(seed), Shard(rank, world_size)
            )
            windows = list(batches.windows_from(0))
            assert len(windows) == len(batches) > 2
            for window, (x, y) in zip(windows, batches, strict=True):
                assert window.shape == (4 // world_size, T + 1) and window.dtype == torch.int16
                assert torch.equal(window[:, :-1].long(), x) and torch.equal(window[:, 1:].long(), y)


def test_a_sequential_window_is_a_view_of_the_corpus_even_across_a_row_end() -> None:
    """Row b's window reaches one token past its last input: the next row's first (or, for the last
    row, the token after the partition), read in place. The corpus is sized for rows of 2T tokens,
    so the last window ends exactly at the rows' ends."""
    offset = int(next(iter(sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(1))))[0][0, 0])
    corpus = torch.arange(offset + 2 * B * T + 1)  # rows of 2T inputs after the offset, then one target
    batches = sequential_batches(corpus, B, T, torch.Generator().manual_seed(1))
    assert len(batches) == 2
    last = list(batches.windows_from(1))
    assert len(last) == 1
    assert last[0].untyped_storage().data_ptr() == corpus.untyped_storage().data_ptr()
    assert last[0][:, -1].tolist() == [offset + 2 * T, offset + 4 * T]  # row 1's first; the tail
    assert list(batches.windows_from(2)) == []


# -------------------------------------------------------------------------------------------------
# Random partition


@pytest.mark.parametrize("offset", range(T))
def test_random_partition_matches_d2l_for_every_offset(offset: int) -> None:
    seed = seed_for_offset(T - 1, offset)
    num_subseqs = (35 - offset - 1) // T
    order = shuffle_after_offset(seed, T - 1, num_subseqs)
    batches = random_batches(CORPUS, B, T, torch.Generator().manual_seed(seed))
    expected = d2l_random(list(range(35)), B, T, offset, order)
    assert as_lists(batches) == expected
    assert len(batches) == len(expected) == num_subseqs // B == 3


def test_random_offset_ranges_over_zero_to_num_steps_minus_one() -> None:
    offsets = set()
    for seed in range(200):
        for x, _ in random_batches(CORPUS, B, T, torch.Generator().manual_seed(seed)):
            offsets.update((x[:, 0] % T).tolist())
    assert offsets == set(range(T))


def test_random_subsequences_start_at_offset_plus_multiples_of_num_steps_and_never_overlap() -> None:
    tokens = torch.arange(203)
    for seed in range(20):
        batches = list(random_batches(tokens, 4, T, torch.Generator().manual_seed(seed)))
        starts = [int(start) for x, _ in batches for start in x[:, 0]]
        offset = min(starts) % T  # the smallest start is offset + k*T with offset < T
        assert all((start - offset) % T == 0 for start in starts)
        seen = [int(token) for x, _ in batches for token in x.flatten()]
        assert len(seen) == len(set(seen)), "two subsequences share a token"
        assert len(batches) == ((203 - offset - 1) // T) // 4


def test_random_targets_are_inputs_shifted_by_one() -> None:
    for seed in range(10):
        for x, y in random_batches(CORPUS, B, T, torch.Generator().manual_seed(seed)):
            assert x.shape == y.shape == (B, T)
            assert torch.equal(y, x + 1)


def test_random_partition_does_not_carry_state() -> None:
    batches = random_batches(CORPUS, B, T, torch.Generator().manual_seed(0))
    assert batches.carries_state is False


def test_training_batches_dispatches_on_sampling() -> None:
    seq = training_batches(CORPUS, "sequential", B, T, torch.Generator().manual_seed(3))
    rnd = training_batches(CORPUS, "random", B, T, torch.Generator().manual_seed(3))
    assert as_lists(seq) == as_lists(sequential_batches(CORPUS, B, T, torch.Generator().manual_seed(3)))
    assert as_lists(rnd) == as_lists(random_batches(CORPUS, B, T, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(("sampling", "mean"), [("sequential", 27 / 11), ("random", 25 / 10)])
def test_mean_steps_per_epoch_averages_the_count_over_every_offset(sampling: str, mean: float) -> None:
    """35 tokens, one row of 10: the 34 targets after offset o make (34 - o) // 10 steps, 3 for o < 5 and
    2 from 5 to the largest offset (10 sequentially, 9 at random), each offset as likely."""
    data = DataConfig(batch_size=1, num_steps=10, sampling=sampling)
    tokens = torch.arange(35)
    assert mean_steps_per_epoch(35, data) == pytest.approx(mean)
    counts = collections.Counter(len(epoch_batches(tokens, data, 0, epoch)) for epoch in range(400))
    assert set(counts) == {2, 3}  # what the built epochs have, each count in about its share
    assert counts[3] / 400 == pytest.approx(5 / (11 if sampling == "sequential" else 10), abs=0.08)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_an_epoch_resumed_at_a_step_yields_the_minibatches_from_that_step_on(sampling: str) -> None:
    batches = training_batches(CORPUS, sampling, B, T, torch.Generator().manual_seed(5))
    whole = as_lists(batches)
    assert len(whole) >= 2
    assert as_lists(batches.from_step(1)) == whole[1:]
    assert list(batches.from_step(len(whole))) == []


# -------------------------------------------------------------------------------------------------
# Sharding across processes


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_rows_concatenated_over_ranks_equal_the_single_process_minibatch(
    sampling: str, world_size: int
) -> None:
    tokens = torch.arange(257)
    batch_size = 4
    for seed in range(5):
        whole = list(training_batches(tokens, sampling, batch_size, T, torch.Generator().manual_seed(seed)))
        shards = [
            list(
                training_batches(
                    tokens,
                    sampling,
                    batch_size,
                    T,
                    torch.Generator().manual_seed(seed),
                    Shard(rank, world_size),
                )
            )
            for rank in range(world_size)
        ]
        assert all(len(shard) == len(whole) for shard in shards)
        for i, (x, y) in enumerate(whole):
            assert all(shard[i][0].shape == (batch_size // world_size, T) for shard in shards)
            assert torch.equal(torch.cat([shard[i][0] for shard in shards]), x)
            assert torch.equal(torch.cat([shard[i][1] for shard in shards]), y)


def test_shard_rows_are_contiguous_blocks() -> None:
    assert Shard().rows(8) == slice(0, 8)
    assert [Shard(rank, 4).rows(8) for rank in range(4)] == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
    ]
    # an evaluation's rows need not divide: blocks of ⌊B/W⌋ or one more, the last holding row B-1
    assert [Shard(rank, 3).rows(7) for rank in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert [Shard(rank, 3).rows(2) for rank in range(3)] == [slice(0, 0), slice(0, 1), slice(1, 2)]


# -------------------------------------------------------------------------------------------------
# Too-short splits


def test_check_trainable_refuses_a_split_shorter_than_one_minibatch() -> None:
    with pytest.raises(DrnnError) as caught:
        check_trainable(10, 2, 5)
    assert str(caught.value) == (
        "the training split has 10 tokens but one minibatch of data.batch_size 2 × data.num_steps 5 needs 11; "
        "lower data.batch_size or data.num_steps, or use a longer text"
    )  # data.max_tokens is no way on where it kept the whole text
    with pytest.raises(DrnnError, match="data.num_steps, raise data.max_tokens, or use a longer text$"):
        check_trainable(10, 2, 5, capped=True)


def test_check_trainable_accepts_exactly_one_minibatch_plus_one_token() -> None:
    check_trainable(11, 2, 5)


def test_a_resumed_run_whose_batch_does_not_divide_is_told_the_process_counts_it_can_resume_on() -> None:
    """ "make it a multiple of the world size" could not be followed: a resume refuses a changed batch."""
    with pytest.raises(DrnnError) as refused:
        check_trainable(10_000, 12, 5, world_size=8, resuming=True)
    assert str(refused.value) == (
        "data.batch_size 12 does not divide among 8 processes, and a resumed run keeps its batch size: "
        "resume it on 1, 2, 3, 4, 6 or 12 processes"
    )


def test_check_trainable_refuses_a_batch_that_does_not_divide_among_processes() -> None:
    with pytest.raises(DrnnError, match="world size"):
        check_trainable(1000, 6, 5, world_size=4)
    check_trainable(1000, 8, 5, world_size=4)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize(("batch_size", "num_steps"), [(1, 1), (2, 5), (3, 7), (32, 35)])
def test_exactly_one_minibatch_plus_one_token_yields_a_minibatch_for_every_seed(
    sampling: str, batch_size: int, num_steps: int
) -> None:
    n = batch_size * num_steps + 1
    tokens = torch.arange(n)
    for seed in range(25):
        batches = list(
            training_batches(tokens, sampling, batch_size, num_steps, torch.Generator().manual_seed(seed))
        )
        assert len(batches) == 1
        x, y = batches[0]
        assert x.shape == (batch_size, num_steps)
        assert torch.equal(y, x + 1)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_a_split_barely_longer_than_one_minibatch_always_yields_one(sampling: str) -> None:
    for extra in range(1, T):
        tokens = torch.arange(B * T + 1 + extra)
        for seed in range(25):
            assert len(training_batches(tokens, sampling, B, T, torch.Generator().manual_seed(seed))) >= 1


# -------------------------------------------------------------------------------------------------
# Per-epoch reproducibility


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_same_seed_and_epoch_give_the_same_minibatches(sampling: str) -> None:
    tokens = torch.arange(1000)
    first = as_lists(training_batches(tokens, sampling, 4, T, epoch_generator(7, 3)))
    again = as_lists(training_batches(tokens, sampling, 4, T, epoch_generator(7, 3)))
    assert first == again


def test_different_epochs_give_different_minibatches() -> None:
    tokens = torch.arange(1000)
    epochs = [as_lists(training_batches(tokens, "random", 4, T, epoch_generator(7, e))) for e in range(5)]
    for a in range(5):
        for b in range(a + 1, 5):
            assert epochs[a] != epochs[b], f"epochs {a} and {b} batch identically"


def test_different_seeds_give_different_minibatches() -> None:
    tokens = torch.arange(1000)
    one = as_lists(training_batches(tokens, "random", 4, T, epoch_generator(1, 0)))
    two = as_lists(training_batches(tokens, "random", 4, T, epoch_generator(2, 0)))
    assert one != two


def test_an_epoch_does_not_depend_on_what_ran_before_it() -> None:
    tokens = torch.arange(1000)
    fresh = as_lists(training_batches(tokens, "random", 4, T, epoch_generator(7, 2)))
    torch.manual_seed(12345)
    torch.rand(100)  # global randomness must not leak into the batching
    for epoch in range(2):
        list(training_batches(tokens, "random", 4, T, epoch_generator(7, epoch)))
    assert as_lists(training_batches(tokens, "random", 4, T, epoch_generator(7, 2))) == fresh


# -------------------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_by_hand() -> None:
    """8 tokens, B=3: 7 targets → three rows of 2 (targets 1..6), then target 7 as a batch of one."""
    batches = list(eval_batches(torch.arange(8), 3, 5))
    assert [(b.x.tolist(), b.y.tolist(), b.keep_row) for b in batches] == [
        ([[0, 1], [2, 3], [4, 5]], [[1, 2], [3, 4], [5, 6]], None),
        ([[6]], [[7]], 2),
    ]


def test_eval_batches_without_a_tail() -> None:
    batches = list(eval_batches(torch.arange(7), 3, 5))
    assert [(b.x.tolist(), b.y.tolist(), b.keep_row) for b in batches] == [
        ([[0, 1], [2, 3], [4, 5]], [[1, 2], [3, 4], [5, 6]], None),
    ]


@pytest.mark.parametrize("n", [0, 1])
def test_eval_batches_of_fewer_than_two_tokens_are_empty(n: int) -> None:
    assert list(eval_batches(torch.arange(n), 4, 5)) == []


def _split_at_tail(batches: list[EvalBatch]) -> tuple[list[EvalBatch], list[EvalBatch]]:
    for index, batch in enumerate(batches):
        if batch.keep_row is not None:
            return batches[:index], batches[index:]
    return batches, []


@pytest.mark.parametrize("num_steps", [1, 5])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("n", [2, 7, 35, 36, 101])
def test_eval_batches_visit_every_target_exactly_once_with_state_carried(
    n: int, batch_size: int, num_steps: int
) -> None:
    tokens = torch.arange(n)
    batches = list(eval_batches(tokens, batch_size, num_steps))

    targets = collections.Counter(int(t) for batch in batches for t in batch.y.flatten())
    assert sorted(targets) == list(range(1, n))
    assert set(targets.values()) == {1}

    for batch in batches:
        assert batch.x.shape == batch.y.shape
        assert batch.x.dtype == batch.y.dtype == torch.int64
        assert 1 <= batch.x.shape[1] <= num_steps
        assert torch.equal(batch.y, batch.x + 1)  # Y is X shifted by one within every row

    grid, tail = _split_at_tail(batches)
    rows = min(batch_size, n - 1)
    assert grid, "the grid always has at least one batch"
    assert all(batch.x.shape[0] == rows for batch in grid)
    assert all(batch.keep_row is None for batch in grid)
    for before, after in itertools.pairwise(grid):
        assert torch.equal(after.x[:, 0], before.x[:, -1] + 1)  # every row continues

    if tail:
        assert tail[0].keep_row == rows - 1
        assert int(tail[0].x[0, 0]) == int(grid[-1].x[rows - 1, -1]) + 1  # continues the kept row
        assert all(batch.x.shape[0] == 1 for batch in tail)
        assert all(batch.keep_row is None for batch in tail[1:])
        for before, after in itertools.pairwise(tail):
            assert int(after.x[0, 0]) == int(before.x[0, -1]) + 1
    else:
        assert (n - 1) % rows == 0


@pytest.mark.parametrize(
    ("n", "batch_size", "world_size"),
    [(36, 4, 2), (38, 4, 2), (101, 8, 3), (13, 5, 4), (3, 4, 4), (2, 4, 3)],
    ids=[
        "even-no-tail",
        "even-tail",
        "uneven-tail",
        "shares-of-one-and-two",
        "rows-fewer-than-ranks",
        "one-row",
    ],
)
def test_eval_batches_shared_among_ranks_are_the_one_process_rows_in_blocks(
    n: int, batch_size: int, world_size: int
) -> None:
    """Under torchrun the ranks share a validation as they share a minibatch: rank r takes rows
    [⌊rB/W⌋, ⌊(r+1)B/W⌋) of one process's layout, with their state carried as there, so the shares add
    up to its figure. Every rank meets every column's minibatch (an empty one without a row), so the
    stop votes, counted in minibatches, meet; the tail (continuing row B-1) is the last rank's alone."""
    num_steps = 3
    tokens = torch.arange(n)
    alone = list(eval_batches(tokens, batch_size, num_steps))
    alone_grid, alone_tail = _split_at_tail(alone)
    shares = [
        list(eval_batches(tokens, batch_size, num_steps, Shard(rank, world_size)))
        for rank in range(world_size)
    ]
    grids = [[batch for batch in share if not batch.in_tail] for share in shares]
    assert all(len(grid) == len(alone_grid) for grid in grids)  # the ranks meet at every column
    for column, expected in enumerate(alone_grid):
        assert torch.equal(torch.cat([grid[column].x for grid in grids]), expected.x)
        assert torch.equal(torch.cat([grid[column].y for grid in grids]), expected.y)
        assert {grid[column].job_targets for grid in grids} == {expected.y.numel()}  # the job's, alike
    tails = [[batch for batch in share if batch.in_tail] for share in shares]
    assert all(not tail for tail in tails[:-1])
    assert [(b.x.tolist(), b.y.tolist()) for b in tails[-1]] == [
        (b.x.tolist(), b.y.tolist()) for b in alone_tail
    ]
    if alone_tail:  # the kept row, counted in the last rank's block
        rows = min(batch_size, n - 1)
        assert tails[-1][0].keep_row == rows - 1 - Shard(world_size - 1, world_size).rows(rows).start
        assert tails[-1][0].keep_row == shares[-1][0].x.shape[0] - 1
    job = sum(batch.job_targets for batch in shares[-1])
    assert job == n - 1 == sum(batch.y.numel() for share in shares for batch in share)


def test_eval_batches_follow_the_values_not_the_positions() -> None:
    tokens = torch.tensor([5, 3, 9, 1, 1, 4, 2], dtype=torch.uint8)
    batches = list(eval_batches(tokens, 2, 2))
    assert [(b.x.tolist(), b.y.tolist(), b.keep_row) for b in batches] == [
        ([[5, 3], [1, 1]], [[3, 9], [1, 4]], None),
        ([[9], [4]], [[1], [2]], None),
    ]


# -------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize(
    ("n", "val_fraction", "test_fraction", "sizes"),
    [
        (100, 0.1, 0.1, (80, 10, 10)),
        (35, 0.1, 0.2, (25, 3, 7)),
        (10, 0.0, 0.0, (10, 0, 0)),
        (10, 0.05, 0.0, (10, 0, 0)),
        (170_580, 0.1, 0.1, (136_464, 17_058, 17_058)),
        (100, 0.29, 0.0, (71, 29, 0)),  # in binary floating point 100 × 0.29 = 28.999999999999996
        (180, 0.05, 0.35, (108, 9, 63)),  # 180 × 0.35 = 62.99999999999999
    ],
)
def test_split_tokens_sizes_round_the_held_out_parts_down(
    n: int, val_fraction: float, test_fraction: float, sizes: tuple[int, int, int]
) -> None:
    splits = split_tokens(torch.arange(n), val_fraction, test_fraction)
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes


def test_split_tokens_take_any_float_such_as_numpy_s() -> None:
    """A NumPy float is a ``float`` (a sweep's ``np.linspace``), but its repr is ``np.float64(0.29)``:
    the decimal size is taken from the float's own shortest digits, 29 of 100 as for 0.29."""
    np = pytest.importorskip("numpy")
    splits = split_tokens(torch.arange(100), np.float64(0.29), np.linspace(0.0, 0.35, 2)[1])
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 29, 35)


def test_split_tokens_are_contiguous_train_val_test_segments() -> None:
    tokens = torch.arange(100)
    splits = split_tokens(tokens, 0.1, 0.2)
    assert torch.equal(torch.cat([splits.train, splits.val, splits.test]), tokens)
    assert splits.val.tolist() == list(range(70, 80))
    assert splits.test.tolist() == list(range(80, 100))
    assert splits.get("train") is splits.train
    assert splits.get("val") is splits.val
    assert splits.get("test") is splits.test


@pytest.mark.parametrize(
    ("n", "val_fraction", "val_tokens", "validates"),
    [
        (100, 0.0, 0, False),
        (100, 0.01, 1, False),  # one token: nothing to predict it from
        (100, 0.02, 2, True),  # one read, one predicted: the fewest a perplexity is computed from
        (170_580, 0.1, 17_058, True),
    ],
)
def test_a_validation_split_is_scored_from_two_tokens(
    n: int, val_fraction: float, val_tokens: int, validates: bool
) -> None:
    """What training, `drnn data` and `drnn eval`'s default split all ask: is there a validation split?"""
    splits = split_tokens(torch.arange(n), val_fraction, 0.0)
    assert (len(splits.val), splits.validates) == (val_tokens, validates)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_an_epochs_steps_come_from_its_offset_alone(sampling: str) -> None:
    """What a step budget's span walks through (up to 2,000 epochs): random sampling's batches shuffle
    every subsequence, 3.8 s over a 10 M-token text's epochs (review rev32); the offset alone decides.
    1,602 tokens in rows of 8 × 10 make epochs of 19 or 20 steps as the offset falls."""
    data = DataConfig(batch_size=8, num_steps=10, sampling=sampling)
    for num_tokens in (1_602, 1_620, 5_000):
        tokens = torch.zeros(num_tokens, dtype=torch.long)
        counts = [len(epoch_batches(tokens, data, 3, epoch)) for epoch in range(12)]
        assert [epoch_steps(num_tokens, data, 3, epoch) for epoch in range(12)] == counts
        if num_tokens == 1_602:
            assert sorted(set(counts)) == [19, 20]  # the offsets move the count, as the test needs
