"""Gradient synchronisation across processes: once per optimizer step, not per micro-batch.

Under ``DistributedDataParallel`` the gradient all-reduce is switched off for every
micro-batch but the one that ends a window (``require_backward_grad_sync``, set in a forward
pre-hook because DDP reads it in ``forward``); under FSDP2 (``fully_shard``) the same through
``set_requires_gradient_sync`` before each backward. Before every synchronising micro-batch
and when the ``with`` block ends, the ranks compare how far they have come in one small
all-reduce, so that ranks with uneven numbers of micro-batches raise an error instead of
hanging in mismatched collectives.

Token weights stay exact across ranks: every rank weights its losses relative to one
reference weight that all ranks share (for the first window the mean of the ranks' first
weights, later the previous window's mean), so after the usual averaging of gradients the
window needs one uniform correction, for which the ranks sum their weights once per window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

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


class GradientSync:
    """Synchronisation control for a DDP- or FSDP2-wrapped model in one ``with`` block."""

    def __init__(self, model: nn.Module, sync_each_micro_batch: bool) -> None:
        self.model = model
        self.sync_each_micro_batch = sync_each_micro_batch
        self.is_ddp = isinstance(model, DistributedDataParallel)
        group = getattr(model, "process_group", None) if self.is_ddp else None
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.device = next(model.parameters()).device
        if self.device.type == "meta":  # pragma: no cover - defensive
            self.device = torch.device("cpu")
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._saved_ddp_flag = True
        self.shared_reference_weight: float | None = None
        # The window's forwards (DDP: whether each would synchronise its backward), or the
        # flag of its latest backward (FSDP2): what says whether its gradients are averaged.
        self._forward_flags: list[bool] = []
        self._last_backward_synchronised = False
        # The block's micro-batch count was agreed at entry: no per-step agreement.
        self._counts_agreed = False

    @staticmethod
    def for_model(model: nn.Module, sync_each_micro_batch: bool) -> GradientSync | None:
        """A GradientSync when ``model`` is wrapped by DDP or FSDP2, else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if isinstance(model, (DistributedDataParallel, FSDPModule)):
            return GradientSync(model, sync_each_micro_batch)
        return None

    # ------------------------------------------------------------------ the block
    def enter(self, next_is_last: Callable[[], bool], total: int | None = None) -> None:
        """Install the DDP forward pre-hook; ``next_is_last()`` says if a window ends.

        With the block's micro-batch count ``total`` known on every rank, the ranks agree on
        it once here, instead of before every synchronising micro-batch.
        """
        self._counts_agreed = False
        if total is not None:
            self.agree_counts(total)
        if not self.is_ddp:
            return
        ddp = cast(DistributedDataParallel, self.model)
        self._saved_ddp_flag = bool(ddp.require_backward_grad_sync)

        def before_forward(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled():
                return
            last = next_is_last()
            if last and not self._counts_agreed:
                self.agree(finishing=False, pending=-1)
            flag = last or self.sync_each_micro_batch
            self._forward_flags.append(flag)
            ddp.require_backward_grad_sync = flag

        self._hook = ddp.register_forward_pre_hook(before_forward)

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
        if not self._window_synchronised():
            if window.synchronise_in_backward:  # step_batch() has agreed already
                self.agree(finishing=False, pending=-1)
            self.average_pending(grads)
        self._forward_flags.clear()
        if not window.weighted:
            # Every rank ran the same count (checked by agree): K / count everywhere.
            return window.length / window.count
        # Averaged over R ranks the gradient is sum(w g) / (R K w_ref); make it sum(w g) / W.
        total = self.global_sum(window.weight_sum)
        self.shared_reference_weight = total / (self.world_size * window.count)
        return window.length * window.reference_weight * self.world_size / total

    # ------------------------------------------------------------------ collectives
    def agree(self, *, finishing: bool, pending: int) -> None:
        """All ranks check that they stand at the same point; raise if they do not.

        Called before every synchronising micro-batch (``finishing=False``) and when the
        block ends (``finishing=True`` with the number of pending micro-batches).
        """
        state = torch.tensor(
            [finishing, -finishing, pending, -pending], dtype=torch.int64, device=self.device
        )
        dist.all_reduce(state, op=dist.ReduceOp.MAX, group=self.group)
        any_finishing, all_finishing = bool(state[0]), int(-state[1]) == 1
        if any_finishing != all_finishing or int(state[2]) != -int(state[3]):
            where = "its data ran out" if finishing else "it is about to synchronise gradients"
            raise UnevenInputsError(
                f"ranks ran different numbers of micro-batches: on rank "
                f"{dist.get_rank(self.group)} {where}, while another rank "
                f"{'is still training' if finishing else 'has left the with block'} "
                "(or has a different number of pending micro-batches). Give every rank the "
                "same number of micro-batches, e.g. with DistributedSampler(drop_last=True)"
            )

    def finish_block(self, ran: int, declared: int | None, pending: int) -> None:
        """At the block's end, check that the ranks stopped at the same point.

        With the count agreed at entry, a rank that ran exactly that many micro-batches
        needs no collective; one that ran a different number raises on its own (the others
        may then wait in DDP's next all-reduce: a declared count is a promise).
        """
        if self._counts_agreed:
            if ran != declared:
                raise UnevenInputsError(
                    f"rank {dist.get_rank(self.group)} ran {ran} micro-batches but every rank "
                    f"declared total_micro_batches={declared}; leave total_micro_batches out "
                    "when a rank may stop early, or give every rank the same number"
                )
            return
        self.agree(finishing=True, pending=pending)

    def agree_counts(self, total: int) -> None:
        """Check that every rank declared the same micro-batch count for the block."""
        mine = torch.tensor([total], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(counts, mine, group=self.group)
        values = [int(count) for count in counts]
        if len(set(values)) > 1:
            raise UnevenInputsError(
                f"ranks declared different numbers of micro-batches for this block "
                f"(total_micro_batches of ranks 0..{self.world_size - 1}: {values}); give every "
                "rank the same number, e.g. with DistributedSampler(drop_last=True) or "
                "equal-length shards"
            )
        self._counts_agreed = True

    def shared_reference(self, first_weight: float) -> float:
        """A reference weight that is the same on all ranks (see the module docstring)."""
        if self.shared_reference_weight is None:
            total = torch.tensor([first_weight], dtype=torch.float64, device=self.device)
            dist.all_reduce(total, group=self.group)
            self.shared_reference_weight = float(total) / self.world_size
        return self.shared_reference_weight

    def global_sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.group)
        return float(total)

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return int(tensor)

    def any_rank(self, flag: bool, *, always: bool = False) -> bool:
        """Whether ``flag`` holds on any rank (FSDP2 ranks each see a shard of the grads)."""
        if self.is_ddp and not always:
            return flag  # DDP gradients are identical on all ranks after the sync
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value)

    def average_pending(self, grads: list[torch.Tensor]) -> None:
        """Average the gradients of a window that ended without DDP's synchronisation."""
        if not self.is_ddp:
            raise RuntimeError(
                "a partial window is pending at the end of the with block, but FSDP2 keeps "
                "unsynchronised gradients internally and cannot reduce them without a "
                "backward pass; pass total_micro_batches=len(loader) to the Accumulator so "
                "that the last micro-batch synchronises, or sync_each_micro_batch=True"
            )
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
