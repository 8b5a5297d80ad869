"""DDP and FSDP2 on CPU ranks: exact, one all-reduce per step, no hangs: uneven or empty
inputs raise the same clear error on every rank within seconds.

Every scenario runs on gloo ranks that are processes (loopback) and on ranks that are
threads of the test process (see distributed_workers.py).
"""

from collections.abc import Sequence

import pytest
import torch
from distributed_ddp import SUBGROUP_COUNTS, ddp_part_giving, pair_micro_batches
from distributed_uneven import uneven_layouts
from distributed_workers import (
    RANKS,
    global_batches,
    launch,
    launch_in_threads,
    launch_ranks,
    make_net,
    make_optimizer,
    rank_micro_batches,
    weighted_reference,
)
from torch import nn

from torch_accum._precision import HAS_GRAD_DTYPE

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without distributed"
)

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64: only summation order differs
K, B, STEPS = 4, 2, 3


def reference(optimizer_name, batches):
    """One process, one optimizer step per global batch of 2*K*B samples."""
    model = make_net()
    optimizer = make_optimizer(optimizer_name, model.parameters())
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


class RanksOnDemand(Sequence):
    """A scenario's results on ranks that are threads, run when a test first reads them.

    So they run in the test's call, not in fixture setup: mutmut times only the call and
    bounds each mutant's run by those times (a setup it cannot see looks like a hang). Of
    ddp_scenarios only the part that gives the key read runs: each test runs (and maps to)
    the library code of its own scenario.
    """

    def __init__(self, scenario, world=2):
        self.scenario = scenario
        self.results = [{} for _ in range(world)]

    def read(self, rank, key):
        if key not in self.results[rank]:
            parts = [(ddp_part_giving(key),)] if self.scenario == "ddp_scenarios" else []
            found = launch_in_threads(self.scenario, len(self.results), 30, *parts)
            for mine, theirs in zip(self.results, found, strict=True):
                mine.update(theirs)
        return self.results[rank][key]

    def __getitem__(self, rank):
        if not 0 <= rank < len(self.results):
            raise IndexError(rank)
        return RankResults(self, rank)

    def __len__(self):
        return len(self.results)


class RankResults:
    """One rank's results of a RanksOnDemand: ``results[key]``."""

    def __init__(self, ranks, rank):
        self.ranks, self.rank = ranks, rank

    def __getitem__(self, key):
        return self.ranks.read(self.rank, key)


def ranks_running(scenario, request):
    """``scenario``'s results on ranks that are processes (once per module) or threads.

    On threads it runs again for every test (a second or two): mutation testing maps the
    library code each test reaches to that test only (docs/testing.md).
    """
    if request.param == "threads":
        return RanksOnDemand(scenario)
    return request.getfixturevalue(f"{scenario}_in_processes")


def pooled_windows(per_rank, count):
    """The full batches of two ranks' first ``count`` micro-batches in windows of K."""
    parts = [slice(start, min(start + K, count)) for start in range(0, count, K)]
    return [
        tuple(torch.cat([t[i] for micro in per_rank for t in micro[part]]) for i in (0, 1))
        for part in parts
    ]


@pytest.fixture(scope="module")
def ddp_scenarios_in_processes(tmp_path_factory):
    return launch("ddp_scenarios", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(params=RANKS)
def ddp(request):
    return ranks_running("ddp_scenarios", request)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_ddp_equals_one_full_batch_process(ddp, optimizer_name, checkpointing):
    expected = reference(optimizer_name, global_batches(STEPS, 2 * K * B))
    for rank in ddp:
        got = rank[f"exact/{optimizer_name}/{checkpointing}"]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_one_gradient_all_reduce_per_optimizer_step(ddp):
    for rank in ddp:
        for key in ("syncs/sgd/False", "syncs/adamw/True"):
            syncs, steps = rank[key]
            assert (syncs, steps) == (STEPS, STEPS)  # one bucket: one all-reduce per step
        assert rank["syncs/naive"] == K * STEPS
        assert rank["k1_syncs"] == (3, 3)  # K=1: in every backward, none after it


def test_forwards_before_backwards_are_synchronised_exactly(ddp):
    # Issue 11, item 11: before the fix each rank stepped on its local gradient (0.28 apart).
    expected = reference("sgd", global_batches(STEPS, 2 * K * B))
    for rank in ddp:
        got, steps = rank["forwards_first"]
        assert steps == STEPS
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_ranks_gradients_differ_between_boundaries(ddp):
    first = [rank["first_grads"] for rank in ddp]
    assert any(not torch.equal(a, b) for a, b in zip(*first, strict=True))


def test_ddp_flags_and_hooks_are_restored(ddp):
    for rank in ddp:
        assert rank["flag_after"] is True
        assert rank["hooks_after"] == 0
        assert rank["restored_after_error"] == (True, 0)


@pytest.mark.parametrize("key", ["weighted", "weighted_in_thirds"])
def test_weighted_gives_the_global_mean_over_all_ranks(ddp, key):
    # Rank 0 holds samples 0..11 in micro-batches of 1, 5, 2, 4; rank 1 samples 12..24.
    expected = weighted_reference()
    for rank in ddp:
        for a, b in zip(rank[key], expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_ddp_on_a_single_rank_trains_like_one_process():
    # torchrun --nproc_per_node=1: the agreements of one rank, a final partial window.
    (rank,) = launch_in_threads("ddp_scenarios", 1, 10, ("partial",))
    micro = rank_micro_batches(global_batches(STEPS, K * B), 0, 1, K)[:6]
    expected = reference("sgd", pooled_windows([micro], 6))
    params, steps = rank["partial"]
    assert steps == 2
    for a, b in zip(params, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("key", ["partial", "partial_known_length"])
def test_a_final_partial_window_is_exact(ddp, key):
    # 6 micro-batches per rank with K=4: a window of 4 and one of 2, on both ranks.
    per_rank = [rank_micro_batches(global_batches(STEPS, 2 * K * B), r, 2, K)[:6] for r in (0, 1)]
    expected = reference("sgd", pooled_windows(per_rank, 6))
    for rank in ddp:
        params = rank[key][0]
        for a, b in zip(params, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    assert ddp[0]["partial"][1] == 2  # optimizer steps
    assert ddp[0]["partial_known_length"][1] == 2  # both windows synchronised in backward


def test_auto_micro_batching_backs_off_on_every_rank_together(ddp):
    # Each rank's 8 samples per batch: 8 -> 4 -> 2 on rank 0's OOMs, on both ranks.
    expected = reference("sgd", global_batches(STEPS, 2 * K * B))
    for rank in ddp:
        params, size, retries = rank["auto"]
        assert (size, retries) == (2, 2)
        for a, b in zip(params, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_uneven_inputs_raise_on_every_rank(ddp):
    for rank in ddp:
        assert rank["uneven"].startswith(
            "ranks ran different numbers of micro-batches: a rank left the with block (rank 0 "
            "ran 5 micro-batches, then started another forward; rank 1 ran 5 micro-batches, "
            "then left the with block). Every rank must run"
        )
        assert rank["uneven_restored"] == (False, False, True, 0, False)


def test_ranks_at_different_calls_raise_naming_each_call(ddp):
    for rank in ddp:
        assert rank["mixed_calls"].startswith(
            "ranks are not at the same point of this with block (rank 0 ran 0 micro-batches, "
            "then started acc.step_batch(); rank 1 ran 0 micro-batches, then started another "
            "forward). Every rank must run"
        )


def test_sync_each_micro_batch_synchronises_every_backward_and_stays_exact(ddp):
    expected = reference("sgd", global_batches(STEPS, 2 * K * B))
    for rank in ddp:
        params, syncs, steps = rank["sync_each"]
        assert (syncs, steps) == (K * STEPS, STEPS)
        for a, b in zip(params, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_uneven_declared_counts_raise_at_block_entry_naming_each_rank(ddp):
    for rank in ddp:
        assert "total_micro_batches of ranks 0..1: [7, 5]" in rank["uneven_declared"]


@pytest.mark.parametrize("key", ["counted", "carried"])
def test_declared_counts_train_exactly(ddp, key):
    # "carried": a window carried across two blocks of 6 micro-batches (K=4) with
    # total_micro_batches=6 is synchronised once, at its end, not also at the block's end.
    expected = reference("sgd", global_batches(STEPS, 2 * K * B))
    for rank in ddp:
        got, steps = rank[key]
        assert steps == STEPS
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_step_batch_on_batches_of_different_sizes_gives_the_mean_over_all_samples(ddp):
    expected = reference("sgd", global_batches(2, 16))
    for rank in ddp:
        for a, b in zip(rank["step_batch_sizes"], expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_a_rank_starting_one_more_step_batch_raises_on_every_rank(ddp):
    for rank in ddp:
        assert rank["step_batch_extra"].startswith(
            "ranks ran different numbers of micro-batches: a rank left the with block (rank 0 "
            "ran 0 micro-batches, then left the with block; rank 1 ran 0 micro-batches, then "
            "started acc.step_batch())"
        )


def test_an_empty_step_batch_on_one_rank_raises_on_every_rank_naming_it(ddp):
    for index, rank in enumerate(ddp):
        message, size = rank["step_batch_empty"]
        assert message.startswith("acc.step_batch() got an empty batch on rank(s) 1 (tuple ")
        assert "on every rank alike" in message
        assert size == (8 if index == 0 else None)  # rank 1's empty batch sized nothing


def test_a_rank_declaring_its_count_where_another_does_not_raises_on_every_rank(ddp):
    # Nothing ran on either rank: only the step each is at tells them apart.
    for rank in ddp:
        assert rank["declared_and_not"].startswith(
            "ranks ran different numbers of micro-batches: a rank left the with block (rank 0 "
            "ran 0 micro-batches, then started a block with total_micro_batches=0; rank 1 ran "
            "0 micro-batches, then left the with block)"
        )


def test_out_of_memory_at_a_fixed_micro_batch_size_stops_every_rank_saying_why(ddp):
    assert ddp[0]["fixed_size_oom"] == "OutOfMemoryError: injected on rank 0"
    assert ddp[1]["fixed_size_oom"] == "RuntimeError: another rank ran out of memory"


@pytest.mark.parametrize("how", RANKS)
def test_ddp_on_subgroups_agrees_and_averages_inside_the_models_group(how, tmp_path):
    # Ranks {0, 1} and {2, 3} train two DDP models on their own data, 6 and 5 micro-batches.
    ranks = launch_ranks(how, "ddp_subgroups", tmp_path, world=4)
    for pair, count in enumerate(SUBGROUP_COUNTS):
        per_rank = [pair_micro_batches(pair, r) for r in (0, 1)]
        expected = reference("sgd", pooled_windows(per_rank, count))
        for in_pair, rank in enumerate(ranks[2 * pair : 2 * pair + 2]):
            assert rank["steps"] == 2
            for a, b in zip(rank["params"], expected, strict=True):
                torch.testing.assert_close(a, b, **TOL)
            assert rank["short"].startswith(
                f"rank {in_pair} ran 2 micro-batches but every rank declared total_micro_batches=8"
            )


# FSDP2 on CPU fails in torch 2.6 ("'Stream' object has no attribute 'record_event'");
# torch 2.13, which CI pins, runs it.
FSDP2_ON_CPU = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)
fsdp2_on_cpu = pytest.mark.skipif(
    not FSDP2_ON_CPU,
    reason="FSDP2 on CPU needs a newer torch than this one (tested with 2.13)",
)


@pytest.fixture(scope="module")
def fsdp_scenarios_in_processes(tmp_path_factory):
    return launch("fsdp_scenarios", tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(params=RANKS)
def fsdp(request):
    return ranks_running("fsdp_scenarios", request)


@fsdp2_on_cpu
@pytest.mark.parametrize("sync_each", [False, True])
def test_fsdp2_equals_one_full_batch_process(fsdp, sync_each):
    expected = reference("adamw", global_batches(2, 2 * K * B))
    for rank in fsdp:
        params, steps = rank[f"exact/{sync_each}"]
        assert steps == 2
        for a, b in zip(params, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@fsdp2_on_cpu
def test_fsdp2_partial_window_needs_the_length(fsdp):
    for rank in fsdp:
        assert rank["partial_known_length"][1] == 2
        assert "pass total_micro_batches=len(loader)" in rank["partial_unknown_length"]


@fsdp2_on_cpu
def test_fsdp2_weighted_gives_the_global_mean_and_sync_is_restored(fsdp):
    expected = weighted_reference()
    for rank in fsdp:
        for a, b in zip(rank["weighted"], expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)
        assert rank["synchronises_after_error"]


@fsdp2_on_cpu
@pytest.mark.skipif(not HAS_GRAD_DTYPE, reason="float32 accumulation needs Tensor.grad_dtype")
def test_fsdp2_bfloat16_parameters_are_refused_naming_the_mixed_precision_policy(fsdp):
    for rank in fsdp:
        assert "MixedPrecisionPolicy(param_dtype=torch.bfloat16" in rank["bfloat16_refused"]
        assert "accumulation_dtype=None" in rank["bfloat16_refused"]


@fsdp2_on_cpu
def test_fsdp2_non_finite_gradient_in_one_shard_skips_on_every_rank(fsdp):
    # Without a scaler or clipping each rank checks its own shards; the inf lands in one.
    initial = [p.detach() for p in make_net().parameters()]
    for rank_index, rank in enumerate(fsdp):
        skipped, steps, (after_first, after_second), messages = rank["nonfinite_on_one_shard"]
        assert (skipped, steps) == (1, 1)
        where = ["1 parameter(s): probe", "a parameter shard held by another rank"][rank_index]
        assert messages == [f"non-finite gradient in {where}: optimizer step 1 skipped"]
        probe, *net = after_first  # a module's own parameters come before its children's
        torch.testing.assert_close(probe, torch.ones(2, dtype=torch.float64), rtol=0, atol=0)
        for a, b in zip(net, initial, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(after_second[1], initial[0])


def test_with_a_declared_count_the_ranks_agree_once_and_nothing_runs_per_step(ddp):
    # 3 windows of K=4: 12 micro-batches, 12 training forwards.
    for rank in ddp:
        assert rank[f"collectives/True/{K}"] == (1, 0)  # (agreements, extra averages)
        assert rank[f"collectives/False/{K}"] == (12 + 1, 0)
        assert rank["collectives/False/1"] == (12 + 1, 0)


def test_ranks_running_different_numbers_of_forwards_raise_naming_the_counts(ddp):
    for rank in ddp:
        assert rank["forwards_differ"].startswith(
            "ranks ran different numbers of micro-batches (rank 0 ran 0 micro-batches, then "
            "started another forward; rank 1 ran 1 micro-batches, then started another forward)"
        )


@pytest.mark.skipif(not HAS_GRAD_DTYPE, reason="float32 accumulation needs Tensor.grad_dtype")
def test_ddp_bfloat16_weights_average_the_float32_sums_once_per_window(ddp):
    # The first window in one process, over both ranks' micro-batches, summed in float32:
    # the same gradient up to the order of the float32 additions.
    model = make_net().to(torch.bfloat16)
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for r in (0, 1):
        for x, y in rank_micro_batches(global_batches(3, 2 * K * B), r, 2, K)[:K]:
            model.zero_grad()
            nn.functional.mse_loss(model(x.to(torch.bfloat16)), y.to(torch.bfloat16)).backward()
            for total, p in zip(expected, model.parameters(), strict=True):
                total += p.grad.float() / (2 * K)
    for rank in ddp:
        sums, syncs, steps, refused = rank["bfloat16"]
        assert (syncs, steps) == (0, 3)  # DDP's own all-reduce never ran
        for got, want in zip(sums[0], expected, strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert "sync_each_micro_batch=False" in refused


# ----------------------------------------------------------------------------- uneven inputs
# The matrix of uneven layouts: DDP (with a BatchNorm, whose buffers DDP broadcasts in every
# forward) and FSDP2, 2 and 4 ranks, token weights on and off, total_micro_batches given or not.
CASES = [
    pytest.param(wrapper, world, id=f"{wrapper}-{world}ranks")
    for wrapper in ("ddp", "fsdp2")
    for world in (2, 4)
]


SECONDS = 10  # issue 16: every rank raises within 10 s (a hang waits for the group's timeout)


@pytest.mark.parametrize("how", RANKS)
@pytest.mark.parametrize(("wrapper", "world"), CASES)
def test_every_uneven_layout_raises_on_every_rank_within_seconds(wrapper, world, how, tmp_path):
    if wrapper == "fsdp2" and not FSDP2_ON_CPU:
        pytest.skip("FSDP2 on CPU needs a newer torch than this one (tested with 2.13)")
    ranks = launch_ranks(how, f"uneven_matrix_{wrapper}", tmp_path, world=world, timeout=240)
    layouts = uneven_layouts(world)
    # Equal counts but different accumulation_steps (rank 0: 2, the others: 4).
    steps = [2] + [4] * (world - 1)
    for declared in (False, True):
        for rank in ranks:
            message = rank[f"steps/{declared}"] or "nothing raised"
            assert f"different accumulation_steps (ranks 0..{world - 1}: {steps})" in message
            assert message.endswith("give every rank the same accumulation_steps")
    matrix = [case for case in ranks[0] if case.count("/") == 2]
    assert len(matrix) == 4 * len(layouts)
    for case in matrix:
        layout, _weighted, declared = case.split("/")
        messages = set()
        for rank, results in enumerate(ranks):
            outcome, seconds = results[case]
            assert outcome is not None, f"{case}: rank {rank} raised nothing"
            kind, message = outcome
            assert kind == "UnevenInputsError", f"{case}: rank {rank}: {kind}: {message}"
            assert seconds < SECONDS, f"{case}: rank {rank} took {seconds:.1f} s"
            assert "DistributedSampler(drop_last=True)" in message
            messages.add(message)
        # One agreement, gathered by all: every rank explains the same thing.
        assert len(messages) == 1, f"{case}: {messages}"
        message = messages.pop()
        counts = layouts[layout]
        if declared == "True":
            assert f"total_micro_batches of ranks 0..{world - 1}: {counts}" in message
        else:
            # Each rank's count as far as it went before the first rank left the block.
            shortest = min(counts)
            assert "a rank left the with block" in message
            for rank, count in enumerate(counts):
                stopped = "left the with block" if count == shortest else "another forward"
                assert f"rank {rank} ran {shortest} micro-batches, then " in message
                assert stopped in message.split(f"rank {rank} ran")[1].split(";")[0]
