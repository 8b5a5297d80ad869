"""Launching ranks for test_distributed.py and test_planner.py, and what their scenarios share.

The scenarios themselves: distributed_ddp.py, distributed_fsdp2.py, distributed_uneven.py.

Every rank trains the same model (same seed) on its own slice of one global batch and
returns its results for the test process to compare with single-process references. Each
scenario runs two ways (``launch_ranks``): on gloo ranks that are processes (loopback, the
real thing), and on ranks that are threads of the test process (torch's threaded process
group), which take seconds and let mutation testing see which tests reach the library's
distributed code (docs/testing.md).
"""

from __future__ import annotations

import importlib
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_accum import Accumulator

FEATURES = 6


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(FEATURES, 16)
        self.blocks = nn.ModuleList(Block(16) for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# Ranks that are threads share torch's global generator: one seeded construction at a time.
_SEEDING = threading.Lock()


def make_net() -> Net:
    with _SEEDING:
        return Net().double()


def global_batches(steps: int, size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, FEATURES, generator=generator, dtype=torch.float64),
            torch.randn(size, 1, generator=generator, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def rank_micro_batches(
    batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int, k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's K micro-batches of every global batch, in training order."""
    out = []
    for x, y in batches:
        mine_x, mine_y = x.chunk(world)[rank], y.chunk(world)[rank]
        out.extend(zip(mine_x.chunk(k), mine_y.chunk(k), strict=True))
    return out


def counting_hook(counter: list[int]) -> Callable[..., Any]:
    # No annotations: DDP checks them, and `from __future__ import annotations` makes them str.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        counter.append(bucket.buffer().numel())
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook


def ddp_model(counter: list[int] | None = None) -> DDP:
    model = DDP(make_net())
    if counter is not None:
        model.register_comm_hook(None, counting_hook(counter))
    return model


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


WEIGHTED_SIZES = [[1, 5, 2, 4], [3, 3, 6, 1]]  # samples per micro-batch on rank 0 and 1


def train_weighted(model: nn.Module, rank: int, unit: float = 1.0) -> None:
    """One window of micro-batches of different sizes on the two ranks, weight = size * unit.

    Every unit gives the same mean; one like 1/3, which no binary float holds exactly,
    shows that the ranks sum their weights in float64.
    """
    optimizer = make_optimizer("sgd", model.parameters())
    x, y = global_batches(1, 64)[0]
    offset = sum(WEIGHTED_SIZES[0]) if rank else 0
    with Accumulator(model, optimizer, 4) as acc:
        for size in WEIGHTED_SIZES[rank]:
            mx, my = x[offset : offset + size], y[offset : offset + size]
            offset += size
            acc.backward(nn.functional.mse_loss(model(mx), my), weight=size * unit)
            optimizer.step()


def weighted_reference() -> list[torch.Tensor]:
    """One process, one step on all the samples the two ranks saw in train_weighted."""
    x, y = global_batches(1, 64)[0]
    seen = sum(map(sum, WEIGHTED_SIZES))
    model = make_net()
    optimizer = make_optimizer("sgd", model.parameters())
    nn.functional.mse_loss(model(x[:seen]), y[:seen]).backward()
    optimizer.step()
    return [p.detach() for p in model.parameters()]


# ----------------------------------------------------------------------------- launching


SCENARIO_MODULES = ("distributed_ddp", "distributed_fsdp2", "distributed_uneven")


def _scenario(name: str) -> Callable[..., dict[str, Any]]:
    """The function that runs scenario ``name`` on one rank, from the module that holds it."""
    for module_name in SCENARIO_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            return getattr(module, name)  # type: ignore[no-any-return]
    raise KeyError(f"no scenario {name!r} in {SCENARIO_MODULES}")


def _entry(scenario: str, rank: int, world: int, out: str) -> None:
    # A file store, not a TCP port: concurrent test runs cannot collide on it.
    store = dist.FileStore(str(Path(out) / "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = _scenario(scenario)(rank, world)
        dist.barrier()  # both ranks are done before either tears the group down
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 180) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` gloo ranks; return each rank's results, bounded in time."""
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_entry, args=(scenario, rank, world, str(out)))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results = [out / f"rank{rank}.pt" for rank in range(world)]
    deadline = time.monotonic() + timeout
    # Every rank saves its results before tearing the process group down; that teardown
    # (gloo's destroy_process_group) has been seen to hang now and then in CI, so once
    # all results are saved the ranks get a grace period and are then stopped.
    finished_at = None
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if finished_at is None and all(path.exists() for path in results):
            finished_at = time.monotonic()
        if finished_at is not None and time.monotonic() - finished_at > 20:
            break
        time.sleep(0.1)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    if hung and finished_at is not None:
        hung = []  # the results are complete; only the teardown hung
    errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
    if hung:
        raise TimeoutError(f"{scenario}: ranks still running after {timeout} s\n{errors}")
    if any(p.exitcode != 0 for p in processes) and not all(path.exists() for path in results):
        raise RuntimeError(f"{scenario} failed:\n{errors}")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def launch_in_threads(
    scenario: str, world: int = 2, timeout: float = 30, *args: Any
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks that are threads of this process, bounded in time.

    torch's threaded process group (its own tests' ``MultiThreadedTestCase``) gives each
    thread its own default group; collectives are exchanged in memory.
    """
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    results: list[dict[str, Any]] = [{} for _ in range(world)]
    errors: dict[int, str] = {}
    store = dist.HashStore()

    def rank_main(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
            try:
                results[rank] = _scenario(scenario)(rank, world, *args)
            finally:
                dist.destroy_process_group()
        except BaseException as error:
            # SystemExit: the group woke this rank up because another one failed.
            if not isinstance(error, SystemExit):
                errors[rank] = traceback.format_exc()
            threaded.ProcessLocalGroup.exception_handle(error)  # wakes the waiting ranks

    multithreading = torch.autograd.is_multithreading_enabled()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    threaded._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = any(thread.is_alive() for thread in threads)
        if hung:
            threaded.ProcessLocalGroup.exception_handle(TimeoutError())
            for thread in threads:
                thread.join(5)
    finally:
        threaded.ProcessLocalGroup.reset()
        threaded._uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        # torch 2.6 leaves autograd's device threads off after the threaded group.
        torch.autograd.set_multithreading_enabled(multithreading)
    report = "\n".join(errors[rank] for rank in sorted(errors))
    if hung:
        raise TimeoutError(f"{scenario}: ranks still running after {timeout} s\n{report}")
    if errors:
        raise RuntimeError(f"{scenario} failed:\n{report}")
    return results


RANKS = ("processes", "threads")


def launch_ranks(
    ranks: str, scenario: str, out: Path, world: int = 2, timeout: float = 180
) -> list[dict[str, Any]]:
    """``launch`` (``ranks="processes"``) or ``launch_in_threads`` (``"threads"``).

    ``timeout`` bounds the processes, which start a Python each; threads take seconds, so a
    hang shows there after ``launch_in_threads``'s own, shorter bound.
    """
    if ranks == "threads":
        return launch_in_threads(scenario, world)
    return launch(scenario, out, world, timeout)
