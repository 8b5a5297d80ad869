"""Checkpointing under torch.compile: the graphs and results of the compiled hand loop.

The reference is always the same loop written by hand and compiled the same way, each
checkpointed block wrapped in a module calling ``checkpoint(block, ..., use_reentrant=False)``;
never eager, against which a model that silently falls back to eager would pass. Counting
runs use the ``aot_eager`` backend (the graphs dynamo hands over do not depend on the
backend, and it compiles in a fraction of inductor's time); one test runs inductor.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from gpt import GPT, GPTConfig
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

from torch_accum import Accumulator, Checkpointing

# The compiled hand-written loop the library is held to: one copy, with the benchmark's.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _compiled_reference import (
    Batch,
    Counting,
    graph_breaks,
    loss_of,
    one_rank_group,
    wrap_by_hand,
)

pytestmark = pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here"
)

K = 2
TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


# ----------------------------------------------------------------------------- models
class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm(self.conv(x)))


class CNN(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(ConvBlock(channels), ConvBlock(channels))
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class MLP(nn.Module):
    """The smallest model with blocks: what inductor compiles in a few seconds."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ResidualMLP(width), ResidualMLP(width)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(kind: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP()
    if kind == "gpt":
        return GPT(
            GPTConfig(vocab_size=32, context=8, width=16, heads=2, layers=2, dropout=dropout)
        )
    return CNN()


def make_batches(kind: str, count: int, ragged: bool = False) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    batches: list[Batch] = []
    for index in range(count):
        rows = 1 if ragged and index == count - 1 else 2
        if kind == "gpt":
            tokens = torch.randint(0, 32, (rows, 9), generator=generator)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        elif kind == "mlp":
            x = torch.randn(rows, 8, generator=generator)
            batches.append((x, torch.randint(0, 3, (rows,), generator=generator)))
        else:
            image = torch.randn(rows, 3, 6, 6, generator=generator)
            batches.append((image, torch.randint(0, 3, (rows,), generator=generator)))
    return batches


#: The code of the graphs handed to the backend in the last `train`, in order.
traced_graphs: list[str] = []


def train(
    kind: str,
    policy: object,
    *,
    by_hand: bool,
    layout: str = "compile",
    backend: str = "aot_eager",
    steps: int = 2,
    blocks: int = 1,
    dropout: float = 0.0,
    ragged: bool = False,
    fresh: bool = False,
) -> tuple[nn.Module, tuple[int, int, int]]:
    """Train ``steps`` windows of K micro-batches per `with` block; (model, counts).

    ``fresh``: each `with` block gets an Accumulator of its own on the same model.
    """
    torch._dynamo.reset()
    counters.clear()
    traced_graphs.clear()
    model = make_model(kind, dropout)
    counter = Counting(backend, codes=traced_graphs)
    if policy == "callable":
        chosen = list(model.blocks)
        policy = lambda module: any(module is block for block in chosen)  # noqa: E731
    wrappers = wrap_by_hand(model, policy) if by_hand and policy else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dynamic = False if ragged else None
    net: Any = model
    if layout.startswith("ddp"):
        net = DistributedDataParallel(model)
        reduced_buckets.clear()
        net.register_comm_hook(reduced_buckets, counted_all_reduce)
    run: Any = torch.compile(net, backend=counter, dynamic=dynamic)
    if layout == "method":
        model.compile(backend=counter)
        run = model
    # Under DDP the Accumulator gets the module the loop calls: the compiled one
    # ("ddp-bare": the DDP module inside it, which works too).
    given = run if layout == "ddp" else net
    acc = None if by_hand else Accumulator(given, optimizer, K, checkpointing=policy)
    if layout in ("per-block", "per-block-first"):
        run = model
        if layout == "per-block-first" and not by_hand:
            # The blocks compiled before the Accumulator exists.
            acc = None
        for block in wrappers or model.blocks:
            block.compile(backend=counter, fullgraph=True)
        if acc is None and not by_hand:
            acc = Accumulator(model, optimizer, K, checkpointing=policy)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if layout == "autocast"
        else contextlib.nullcontext()
    )
    batches = make_batches(kind, K * steps, ragged=ragged)

    def backward(loss: torch.Tensor) -> None:
        if acc is not None:
            acc.backward(loss)
        else:
            (loss / K).backward()

    def train_step(batch: Batch) -> None:
        loss = loss_of(net, batch)
        if acc is not None:
            acc.backward(loss)
        else:
            (loss / K).backward()

    step = torch.compile(train_step, backend=counter)
    for block_index in range(blocks):
        if fresh and block_index and acc is not None:
            acc = Accumulator(model, optimizer, K, checkpointing=policy)
        with acc if acc is not None else contextlib.nullcontext():
            if layout == "inside":
                run = torch.compile(net, backend=counter)
            for index, batch in enumerate(batches):
                sync = not (layout.startswith("ddp") and by_hand and index % K != K - 1)
                with autocast, contextlib.nullcontext() if sync else net.no_sync():
                    if layout == "step":
                        step(batch)  # forward and backward, compiled together
                    else:
                        backward(loss_of(run, batch))
                if acc is not None:
                    optimizer.step()
                elif index % K == K - 1:
                    optimizer.step()
                    optimizer.zero_grad()
        if blocks > 1:  # an evaluation pass between epochs
            model.eval()
            with torch.no_grad():
                loss_of(run, batches[0])
            model.train()
    return model, (graph_breaks(), counter.graphs, counter.recompiles)


def assert_same_parameters(got: nn.Module, expected: nn.Module) -> None:
    for a, b in zip(got.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(got.buffers(), expected.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


POLICIES = {
    "full": True,
    "selective": "selective",
    "every_second": Checkpointing(every=2),
    "class": Checkpointing(blocks=type(make_model("gpt").blocks[0])),
    "callable": "callable",
}


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_every_mode_compiles_to_the_graphs_of_the_hand_loop(policy):
    expected, expected_counts = train("gpt", policy, by_hand=True)
    got, counts = train("gpt", policy, by_hand=False)
    assert expected_counts == (0, 1, 0)
    assert counts == expected_counts  # a graph break here runs the GPT eager
    assert_same_parameters(got, expected)


@pytest.mark.parametrize("policy", [True, "selective"], ids=["full", "selective"])
def test_batch_norm_blocks_compile_and_update_running_stats_as_the_hand_loop(policy):
    expected, expected_counts = train("cnn", policy, by_hand=True)
    got, counts = train("cnn", policy, by_hand=False)
    assert counts == expected_counts == (0, 1, 0)
    # Buffers too: the running statistics, and num_batches_tracked counted once per forward.
    assert_same_parameters(got, expected)
    if TORCH >= (
        2,
        13,
    ):  # torch 2.6's compiled checkpoint counts the recomputation too, by hand alike
        assert int(got.blocks[0].norm.num_batches_tracked) == 2 * K


def test_dropout_in_compiled_checkpointed_blocks_matches_the_hand_loop():
    torch.manual_seed(2)
    expected, expected_counts = train("gpt", True, by_hand=True, dropout=0.2)
    torch.manual_seed(2)
    got, counts = train("gpt", True, by_hand=False, dropout=0.2)
    assert counts == expected_counts
    assert_same_parameters(got, expected)


class DenseLayer(nn.Module):
    """Takes the list of all earlier features, as torchvision's DenseNet layers do."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 4)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.tanh(self.linear(torch.cat(features, dim=1)))


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([DenseLayer(4), DenseLayer(8), DenseLayer(12)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for block in self.blocks:
            features.append(block(features))  # the list passed in grows after the call
        return self.head(torch.cat(features, dim=1))


def test_a_list_argument_mutated_after_the_call_compiles_as_the_hand_loop():
    def run(by_hand: bool) -> tuple[nn.Module, tuple[int, int, int]]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Dense()
        counter = Counting()
        if by_hand:
            wrap_by_hand(model, True)
        compiled = torch.compile(model, backend=counter)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = None if by_hand else Accumulator(model, optimizer, K, checkpointing=True)
        generator = torch.Generator().manual_seed(1)
        with acc if acc is not None else contextlib.nullcontext():
            for index in range(2 * K):
                x = torch.randn(2, 4, generator=generator)
                loss = nn.functional.cross_entropy(compiled(x), torch.tensor([0, 2]))
                if acc is not None:
                    acc.backward(loss)
                    optimizer.step()
                else:
                    (loss / K).backward()
                    if index % K == K - 1:
                        optimizer.step()
                        optimizer.zero_grad()
        return model, (graph_breaks(), counter.graphs, counter.recompiles)

    expected, expected_counts = run(by_hand=True)
    got, counts = run(by_hand=False)
    assert counts == expected_counts
    assert expected_counts[0] == 0
    assert_same_parameters(got, expected)


@pytest.mark.parametrize("kind", ["gpt", "cnn"])
def test_with_blocks_reuse_the_compiled_graphs(kind):
    # Three epochs with an evaluation pass between them: the hand loop compiles one graph
    # for training and recompiles once for evaluation; a with block must not add one.
    expected, expected_counts = train(kind, True, by_hand=True, blocks=3)
    got, counts = train(kind, True, by_hand=False, blocks=3)
    assert expected_counts == (0, 2, 1)
    assert counts == expected_counts
    assert_same_parameters(got, expected)


def test_with_blocks_hand_the_backend_the_graphs_of_the_hand_loop_in_its_order():
    # Identical graphs, but for the hand wrapper's attribute in the parameters' names: a
    # difference under inductor is the kernels' (whose multi-threaded CPU code does not give
    # the same bits twice; benchmarks/compile.py prints the hand loop against itself).
    train("gpt", True, by_hand=True, blocks=3)
    expected = [code.replace("_modules_block_", "_") for code in traced_graphs]
    train("gpt", True, by_hand=False, blocks=3)
    assert len(expected) == 2
    assert traced_graphs == expected


def test_a_new_accumulator_on_the_same_model_reuses_the_compiled_graphs():
    # An Accumulator per epoch (a training function that builds its own): the forward
    # objects a block gets must be the ones the compiled graph guards on.
    expected, expected_counts = train("gpt", True, by_hand=True, blocks=3)
    got, counts = train("gpt", True, by_hand=False, blocks=3, fresh=True)
    assert expected_counts == (0, 2, 1)
    assert counts == expected_counts
    assert_same_parameters(got, expected)


def test_a_new_accumulator_in_another_mode_traces_that_mode():
    # The forward objects are kept across Accumulators; the mode they trace is guarded.
    torch._dynamo.reset()
    counters.clear()
    model = make_model("gpt")
    counter = Counting()
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for mode in ("full", "selective", "full"):
        acc = Accumulator(model, optimizer, K, checkpointing=mode)
        with acc:
            seen.append(vars(model.blocks[0])["forward"])
            for batch in make_batches("gpt", K):
                acc.backward(loss_of(compiled, batch))
    assert (graph_breaks(), counter.graphs, counter.recompiles) == (0, 2, 1)
    assert seen[0] is seen[1] is seen[2]


def test_with_blocks_install_the_same_forward_objects():
    model = make_model("gpt")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), K, checkpointing=True)
    installed = []
    for _ in range(2):
        with acc:
            installed.append([vars(block)["forward"] for block in model.blocks])
        assert all("forward" not in vars(block) for block in model.blocks)
    assert all(a is b for a, b in zip(*installed, strict=True))


def test_a_forward_patched_between_with_blocks_is_wrapped_afresh():
    model = make_model("gpt")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), K, checkpointing=True)
    with acc:
        first = vars(model.blocks[0])["forward"]
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        return type(model.blocks[0]).forward(model.blocks[0], *args, **kwargs)

    model.blocks[0].forward = patched
    with acc:
        assert vars(model.blocks[0])["forward"] is not first
        acc.backward(loss_of(model, make_batches("gpt", 1)[0]))
    assert calls == [1, 1]  # the forward and its recomputation in backward
    assert vars(model.blocks[0])["forward"] is patched


LAYOUTS = {
    "compiled_inside_the_block": {"layout": "inside"},
    "model_compile_method": {"layout": "method"},
    "per_block_compile_after_the_accumulator": {"layout": "per-block"},
    "per_block_compile_before_the_accumulator": {"layout": "per-block-first"},
    "bf16_autocast": {"layout": "autocast"},
    "ragged_last_micro_batch_static_shapes": {"ragged": True},
}


@pytest.mark.parametrize("options", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_compiles_as_the_hand_loop(options):
    expected, expected_counts = train("gpt", True, by_hand=True, **options)
    got, counts = train("gpt", True, by_hand=False, **options)
    assert expected_counts[0] == 0
    assert counts == expected_counts
    if options.get("layout") == "autocast":
        for a, b in zip(got.parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    else:
        assert_same_parameters(got, expected)


@pytest.mark.parametrize("policy", [False, True], ids=["off", "full"])
def test_a_compiled_step_calling_acc_backward_breaks_once_as_one_calling_loss_backward(policy):
    # Two windows: the library's counters change at every micro-batch, and must not be
    # guarded on (a recompile per micro-batch) nor traced (a graph break per attribute).
    expected, expected_counts = train("gpt", policy, by_hand=True, layout="step")
    got, counts = train("gpt", policy, by_hand=False, layout="step")
    assert expected_counts == (1, 1, 0)
    assert counts == expected_counts
    assert_same_parameters(got, expected)


#: The buckets DDP all-reduced in the last `train` with a DDP layout.
reduced_buckets: list[int] = []


def counted_all_reduce(state, bucket):  # unannotated: DDP checks annotations as objects
    state.append(bucket.index())
    future = torch.futures.Future()
    future.set_result(bucket.buffer())  # one rank: the average is the gradient itself
    return future


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_compiled_ddp_model_compiles_as_the_hand_loop():
    with one_rank_group():
        expected, expected_counts = train("gpt", True, by_hand=True, layout="ddp")
        expected_reduced = list(reduced_buckets)
        got, counts = train("gpt", True, by_hand=False, layout="ddp")
    assert counts == expected_counts
    assert expected_reduced and reduced_buckets == expected_reduced  # once per window
    assert_same_parameters(got, expected)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_the_bare_ddp_module_given_while_the_loop_calls_compile_ddp_trains_as_the_hand_loop():
    # The agreement hook is then on the DDP module, inside the compiled frame (dynamo
    # crashed tracing it): it runs eagerly behind one graph break of its own, before any
    # op (no graph more), and still says which micro-batches DDP all-reduces.
    with one_rank_group():
        expected, expected_counts = train("gpt", True, by_hand=True, layout="ddp")
        expected_reduced = list(reduced_buckets)
        got, counts = train("gpt", True, by_hand=False, layout="ddp-bare")
    breaks, graphs, recompiles = expected_counts
    extra = 1 if TORCH >= (2, 13) else 0  # torch 2.6's dynamo counts no break for the hook
    assert counts == (breaks + extra, graphs, recompiles)
    assert expected_reduced and reduced_buckets == expected_reduced
    assert_same_parameters(got, expected)


def test_inductor_compiles_checkpointed_blocks_as_the_hand_loop():
    expected, expected_counts = train("mlp", True, by_hand=True, backend="inductor")
    got, counts = train("mlp", True, by_hand=False, backend="inductor")
    assert counts == expected_counts == (0, 1, 0)
    assert_same_parameters(got, expected)


def test_blocks_of_a_compiled_model_are_found_under_its_original_module():
    model = make_model("gpt")
    compiled = torch.compile(model, backend="aot_eager")
    acc = Accumulator(compiled, torch.optim.SGD(model.parameters(), lr=0.1), K, checkpointing=True)
    assert acc.checkpointed_modules == ("_orig_mod.blocks.0", "_orig_mod.blocks.1")


@pytest.mark.skipif(TORCH < (2, 13), reason="torch.distributed.fsdp imports dynamo itself")
def test_importing_torch_accum_leaves_dynamo_unloaded():
    # Importing dynamo takes about as long as importing torch: acc.backward is left out
    # of compiled graphs only once something else has loaded it.
    code = "import sys, torch_accum; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_acc_backward_is_left_to_eager_once_dynamo_is_loaded():
    model = make_model("gpt")
    Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), K)
    assert getattr(Accumulator.backward, "_torchdynamo_disable", False)
    assert Accumulator.backward.__doc__.startswith("Accumulate the gradient")
