"""Gradient synchronisation across processes: once per optimizer step, not per micro-batch.

Under ``DistributedDataParallel`` the gradient all-reduce is switched off for every
micro-batch but the one that ends a window (``require_backward_grad_sync``, set in a forward
pre-hook because DDP reads it in ``forward``); under FSDP2 (``fully_shard``) the same through
``set_requires_gradient_sync`` before each backward.

No layout of uneven inputs can hang: every collective the library issues is one and the
same *agreement* (an all-gather of one small row per rank: what the rank is about to do, its
micro-batch and forward counts, its accumulation steps and a value), and one runs before
anything else can issue a collective. With ``total_micro_batches`` the ranks compare their
declared counts once, when the block starts; without it, before every training forward of
the wrapped model (prepended to DDP's and FSDP2's own forward collectives) and when the
block ends. So when one rank leaves the block early, its end-of-block agreement meets the
others' next forward agreement, and every rank raises the same ``UnevenInputsError``, which
names what each rank did. The weight sums of token-weighted windows and the checks at the
boundary travel in the same row, so they can never pair with another collective either.

Token weights stay exact across ranks: every rank weights its losses relative to one
reference weight that all ranks share (for the first window the mean of the ranks' first
weights, later the previous window's mean), so after the usual averaging of gradients the
window needs one uniform correction, for which the ranks sum their weights once per window.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from torch_accum._window import Window

try:  # public from torch 2.6 on
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch built without distributed
    FSDPModule = ()  # type: ignore[assignment,misc]


class UnevenInputsError(RuntimeError):
    """Ranks ran different numbers of micro-batches inside the same ``with`` block."""


class Step(enum.IntEnum):
    """What a rank is about to do when it joins an agreement."""

    ENTER = 1  # start a block with a declared count (the row's value)
    FORWARD = 2  # run a training forward
    END = 3  # leave the block
    REFERENCE = 4  # share the first window's reference weight (the value: its first weight)
    WINDOW_WEIGHTS = 5  # sum a weighted window's weights
    AVERAGE = 6  # average the gradients of a window that ended unsynchronised
    NONFINITE = 7  # tell whether its gradients hold inf/NaN (FSDP2: each rank has a shard)
    STEP_BATCH = 8  # start acc.step_batch() (the value: the micro-batch size it can afford)
    STEP_BATCH_FAILED = 9  # tell whether its attempt ran out of memory
    PLAN = 10  # checkpointing="auto": share a planning measurement (the value)


_DOING = {
    Step.ENTER: "started a block with total_micro_batches={value}",
    Step.FORWARD: "started another forward",
    Step.END: "left the with block",
    Step.REFERENCE: "weighted its first window (acc.backward(loss, weight=...))",
    Step.WINDOW_WEIGHTS: "closed a token-weighted window",
    Step.AVERAGE: "averaged an unsynchronised window",
    Step.NONFINITE: "checked its gradients at the boundary",
    Step.STEP_BATCH: "started acc.step_batch()",
    Step.STEP_BATCH_FAILED: "finished acc.step_batch()",
    Step.PLAN: "planned acc.step_batch() (checkpointing='auto')",
}

_FIX = (
    "Every rank must run the same number of micro-batches, with the same "
    "accumulation_steps and the same calls: use DistributedSampler(drop_last=True) with a "
    "DataLoader(drop_last=True), or equal-length shards, and pass "
    "total_micro_batches=len(loader) so that the ranks compare their counts when the block "
    "starts"
)


class LoopProgress(Protocol):
    """What the agreement needs to know of the loop (the ``WindowDriver``)."""

    def next_is_last(self) -> bool: ...
    def synchronises_explicitly(self) -> bool: ...
    def micro_batches(self) -> int: ...
    def accumulation_steps(self) -> int: ...


class GradientSync:
    """Synchronisation control for a DDP- or FSDP2-wrapped model in one ``with`` block."""

    def __init__(
        self, model: nn.Module, sync_each_micro_batch: bool, caller: nn.Module | None = None
    ) -> None:
        self.model = model
        # The module the loop calls: a torch.compile wrapper of ``model`` runs its own
        # hooks eagerly, outside the compiled frame that dynamo would otherwise trace the
        # hook's counters and collectives into.
        self._caller = model if caller is None else caller
        self.sync_each_micro_batch = sync_each_micro_batch
        self.is_ddp = isinstance(model, DistributedDataParallel)
        group = getattr(model, "process_group", None) if self.is_ddp else None
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.device = next(model.parameters()).device
        if self.device.type == "meta":  # pragma: no cover - defensive
            self.device = torch.device("cpu")
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._saved_ddp_flag = True
        self._loop: LoopProgress | None = None
        self.shared_reference_weight: float | None = None
        # The window's forwards (DDP: whether each would synchronise its backward), or the
        # flag of its latest backward (FSDP2): what says whether its gradients are averaged.
        self._forward_flags: list[bool] = []
        self._last_backward_synchronised = False
        # The window accumulates float32 sums of low-precision parameters (_precision.py),
        # which DDP's buckets cannot take: the window is averaged here, in float32.
        self.reduces_itself = False
        # Training forwards of the block, compared in every agreement.
        self._forwards = 0
        # The block's micro-batch count was agreed at entry: no per-forward agreement.
        self._counts_agreed = False

    @staticmethod
    def for_model(model: nn.Module, sync_each_micro_batch: bool) -> GradientSync | None:
        """A GradientSync when ``model`` is wrapped by DDP or FSDP2, else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        from torch._dynamo.eval_frame import OptimizedModule

        inner = getattr(model, "_orig_mod", None)  # torch.compile(DDP(model))
        if isinstance(model, OptimizedModule) and isinstance(
            inner, (DistributedDataParallel, FSDPModule)
        ):
            return GradientSync(cast(nn.Module, inner), sync_each_micro_batch, caller=model)
        if isinstance(model, (DistributedDataParallel, FSDPModule)):
            return GradientSync(model, sync_each_micro_batch)
        return None

    # ------------------------------------------------------------------ the block
    def enter(self, loop: LoopProgress, total: int | None = None) -> None:
        """Agree on the block's count if known, and hook the model's forward.

        The hook is prepended to the model's own forward pre-hooks, so that its agreement
        runs before FSDP2's parameter all-gather (DDP's collectives run inside ``forward``).
        """
        self._loop = loop
        self._forwards = 0
        self._counts_agreed = False
        if self.is_ddp:  # saved first: exit() restores it also when the agreement raises
            ddp = cast(DistributedDataParallel, self.model)
            self._saved_ddp_flag = bool(ddp.require_backward_grad_sync)
        if total is not None:
            self.agree(Step.ENTER, total)
            self._counts_agreed = True

        def before_forward(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled():
                return
            explicit = loop.synchronises_explicitly()
            if self.model.training and not explicit:
                self._forwards += 1
                if not self._counts_agreed:
                    self.agree(Step.FORWARD)
            if self.is_ddp:
                flag = (
                    loop.next_is_last() or self.sync_each_micro_batch
                ) and not self.reduces_itself
                self._forward_flags.append(flag)
                cast(DistributedDataParallel, self.model).require_backward_grad_sync = flag

        # Left to eager also when the hook sits inside a compiled frame (the loop calls
        # torch.compile(ddp) but the Accumulator got ddp): one graph break before any op,
        # where dynamo crashed tracing the agreement (its counters and collective).
        hook = torch.compiler.disable(before_forward)  # type: ignore[no-untyped-call]
        self._hook = self._caller.register_forward_pre_hook(hook, prepend=True)

    def exit(self) -> None:
        """Restore the flags and remove the hook (runs in ``finally``)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.is_ddp:
            cast(
                DistributedDataParallel, self.model
            ).require_backward_grad_sync = self._saved_ddp_flag
        else:
            self.model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def before_backward(self, last: bool) -> None:
        self._last_backward_synchronised = last or self.sync_each_micro_batch
        if not self.is_ddp:
            self.model.set_requires_gradient_sync(  # type: ignore[operator]
                self._last_backward_synchronised
            )

    def finish_block(self, ran: int, declared: int | None) -> None:
        """At the block's end, check that the ranks stopped at the same point.

        With the count agreed at entry, a rank that ran exactly that many micro-batches
        needs no collective; one that ran a different number raises on its own (the others
        may then wait in DDP's next all-reduce: a declared count is a promise).
        """
        if self._counts_agreed:
            if ran != declared:
                raise UnevenInputsError(
                    f"rank {self.rank} ran {ran} micro-batches but every rank declared "
                    f"total_micro_batches={declared}; leave total_micro_batches out when a "
                    "rank may stop early, or give every rank the same number"
                )
            return
        self.agree(Step.END)

    # ------------------------------------------------------------------ the window
    def start_window(self) -> None:
        """Forget the previous window's forwards (their backwards all ran)."""
        del self._forward_flags[:-1]  # the latest forward may belong to this window

    def _window_synchronised(self) -> bool:
        """Whether DDP/FSDP2 averaged the window's gradients in its last backward.

        Under DDP the forward decides; when a window's forwards all ran before its
        backwards (contrastive losses), none of them was marked to synchronise, and the
        window is averaged here instead.
        """
        if self.sync_each_micro_batch or not self.is_ddp:
            return self._last_backward_synchronised
        flags = self._forward_flags
        if flags and flags[-1] and not any(flags[:-1]):
            return True
        if any(flags):
            raise UnevenInputsError(
                "the forwards and backwards of this window are not paired one to one: a "
                "forward marked to synchronise gradients was followed by another forward "
                "before its backward. Run each micro-batch's backward right after its forward, "
                "or pass sync_each_micro_batch=True"
            )
        return False

    def close_window(self, window: Window, grads: list[torch.Tensor]) -> float:
        """Average a window that ended unsynchronised; return the uniform correction."""
        # acc.step_batch() windows may differ in length across ranks (batches of different
        # sizes): each rank undoes its own 1/length before the average, not after it.
        runner = not window.synchronise_in_backward
        if runner and grads:
            torch._foreach_mul_(grads, float(window.length))
        if not self._window_synchronised():
            self.average_pending(grads)
        self._forward_flags.clear()
        if not window.weighted:
            # Every rank ran the same count (the agreements say so): K / count everywhere,
            # and so the same seeds, whose rounding the correction undoes.
            return window.length / window.count / window.seed_rounding
        # Averaged over R ranks the gradient is sum(w g) / (R K w_ref); make it sum(w g) / W.
        total = sum(self.agree(Step.WINDOW_WEIGHTS, window.weight_sum))
        if runner:
            return window.reference_weight * self.world_size / total
        self.shared_reference_weight = total / (self.world_size * window.count)
        return window.length * window.reference_weight * self.world_size / total

    # ------------------------------------------------------------------ agreement
    def agree(self, step: Step, value: float = 0.0) -> list[float]:
        """All ranks say what they are about to do; each rank's ``value`` comes back.

        Raises ``UnevenInputsError`` on every rank alike when the ranks are not at the same
        step, micro-batch and forward, or use different accumulation steps (or, entering a
        block, declare different counts).
        """
        loop = self._loop
        micro_batches = 0 if loop is None else loop.micro_batches()
        steps = 0 if loop is None else loop.accumulation_steps()
        # float64 holds every count exactly (below 2**53) next to a weight.
        mine = torch.tensor(
            [float(step), float(micro_batches), float(self._forwards), float(steps), value],
            dtype=torch.float64,
            device=self.device,
        )
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine, group=self.group)
        table = [[float(x) for x in row.tolist()] for row in rows]
        # The loop's micro-batch count leaves out acc.step_batch()'s pieces (ranks may cut
        # batches of different sizes into different numbers of them), so every column but
        # the value agrees at every step of a correct loop; the value only at ENTER.
        compared = [0, 1, 2, 3, 4] if step is Step.ENTER else [0, 1, 2, 3]
        if any(row[i] != table[0][i] for row in table for i in compared):
            raise UnevenInputsError(_describe_disagreement(table))
        return [row[4] for row in table]

    def shared_reference(self, first_weight: float) -> float:
        """A reference weight that is the same on all ranks (see the module docstring)."""
        if self.shared_reference_weight is None:
            weights = self.agree(Step.REFERENCE, first_weight)
            self.shared_reference_weight = sum(weights) / self.world_size
        return self.shared_reference_weight

    def any_rank(self, flag: bool, *, step: Step = Step.NONFINITE) -> bool:
        """Whether ``flag`` holds on any rank."""
        if self.is_ddp and step is Step.NONFINITE:
            return flag  # DDP gradients are identical on all ranks after the sync
        return any(self.agree(step, float(flag)))

    def average_pending(self, grads: list[torch.Tensor]) -> None:
        """Average the gradients of a window that ended without DDP's synchronisation."""
        if not self.is_ddp:
            raise RuntimeError(
                "a partial window is pending at the end of the with block, but FSDP2 keeps "
                "unsynchronised gradients internally and cannot reduce them without a "
                "backward pass; pass total_micro_batches=len(loader) to the Accumulator so "
                "that the last micro-batch synchronises, or sync_each_micro_batch=True"
            )
        self.agree(Step.AVERAGE)
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.dtype, grad.device), []).append(grad)
        for tensors in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, group=self.group)
            flat /= self.world_size
            chunks = flat.split([t.numel() for t in tensors])  # type: ignore[no-untyped-call]
            torch._foreach_copy_(
                tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)]
            )


def _describe_disagreement(table: list[list[float]]) -> str:
    """What each rank was doing, and how many micro-batches it had run."""
    steps = [int(row[3]) for row in table]
    if len(set(steps)) > 1:
        return (
            f"ranks use different accumulation_steps (ranks 0..{len(table) - 1}: {steps}); "
            "give every rank the same accumulation_steps"
        )
    if all(row[0] == Step.ENTER for row in table):
        declared = [int(row[4]) for row in table]
        return (
            f"ranks declared different numbers of micro-batches for this block "
            f"(total_micro_batches of ranks 0..{len(table) - 1}: {declared}). {_FIX}"
        )
    doing = [Step(int(row[0])) for row in table]
    counts = [int(row[1]) for row in table]
    if Step.END in doing and any(step is not Step.END for step in doing):
        header = "ranks ran different numbers of micro-batches: a rank left the with block"
    elif len(set(counts)) > 1:
        header = "ranks ran different numbers of micro-batches"
    else:
        header = "ranks are not at the same point of this with block"
    ranks = "; ".join(
        f"rank {rank} ran {count} micro-batches, then " + _DOING[step].format(value=int(row[4]))
        for rank, (step, count, row) in enumerate(zip(doing, counts, table, strict=True))
    )
    return f"{header} ({ranks}). {_FIX}"
