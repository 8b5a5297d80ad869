"""What the Accumulator intercepts in the user's loop and how it detects misuse
(``torch_accum/_interception.py``, ``_driver.py``, ``_patching.py``): the patched methods
and their restore, zero_grad semantics, schedulers, calls passing through during the
update, and the errors for loss.backward(), closures and clashing accumulators.
"""

import contextlib

import pytest
import torch
from helpers import (
    EXACT,
    TwoParts,
    assert_same,
    make_batches,
    make_model,
    mse,
    reference_run,
    two_optimizers,
    windows_of,
)
from torch import nn

from torch_accum import Accumulator


def snapshot(*objects):
    """The instance attributes the Accumulator may shadow, by identity."""
    names = ("step", "zero_grad", "update", "unscale_")
    return [(id(o), n, vars(o).get(n)) for o in objects for n in names]


def make_everything():
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scaler = torch.amp.GradScaler("cpu")
    acc = Accumulator(model, optimizer, 2, scheduler=scheduler, scaler=scaler)
    return model, optimizer, scheduler, scaler, acc


def test_exit_restores_every_patched_method():
    model, optimizer, scheduler, scaler, acc = make_everything()
    # The scheduler already shadows optimizer.step with its own wrapper: that must come back.
    assert "step" in vars(optimizer)
    before = snapshot(optimizer, scheduler, scaler)
    with acc:
        assert snapshot(optimizer, scheduler, scaler) != before
        acc.backward(mse(model, make_batches(1, 4, dtype=torch.float32)[0]))
    assert snapshot(optimizer, scheduler, scaler) == before
    assert not acc.active


def test_exception_in_the_body_restores_every_patched_method():
    model, optimizer, scheduler, scaler, acc = make_everything()
    before = snapshot(optimizer, scheduler, scaler)
    with pytest.raises(ZeroDivisionError), acc:
        acc.backward(mse(model, make_batches(1, 4, dtype=torch.float32)[0]))
        1 / 0  # noqa: B018
    assert snapshot(optimizer, scheduler, scaler) == before
    assert not acc.active
    # Outside the block the optimizer's step is real again.
    weight = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight, model[0].weight)


@pytest.mark.parametrize("failure", ["non-finite", "learning rate"])
def test_an_error_while_leaving_the_block_restores_every_patched_method(failure):
    # The partial window is applied at the block's exit, and that raises: inf/NaN with
    # on_nonfinite="raise", or a learning rate changed in the middle of the window.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    acc = Accumulator(model, optimizer, 4, scheduler=scheduler, on_nonfinite="raise")
    watched = (optimizer, scheduler, *model.modules())
    before = snapshot(*watched)
    batches = make_batches(2, 4)
    with pytest.raises(RuntimeError, match=failure), acc:
        acc.backward(mse(model, batches[0]))
        if failure == "learning rate":
            optimizer.param_groups[0]["lr"] = 0.05
            acc.backward(mse(model, batches[1]))
        else:
            acc.backward(mse(model, batches[1]) * float("nan"))
        assert snapshot(*watched) != before
    assert snapshot(*watched) == before
    assert not acc.active
    acc.discard()  # the window refused for its learning rate is still pending
    with acc:  # entered again: nothing of the last block is left patched
        pass


def test_plain_optimizer_has_no_instance_attributes_left():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2):
        pass
    assert "step" not in vars(optimizer)
    assert "zero_grad" not in vars(optimizer)


def test_scheduler_state_dict_inside_the_block_is_clean_and_picklable(tmp_path):
    _, _, scheduler, _, acc = make_everything()
    outside = scheduler.state_dict()
    with acc:
        inside = scheduler.state_dict()
        torch.save(inside, tmp_path / "scheduler.pt")
    assert inside.keys() == outside.keys()
    assert torch.load(tmp_path / "scheduler.pt").keys() == outside.keys()


def test_scheduler_state_dict_inside_the_block_keeps_its_own_instance_attributes():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    # An instance attribute of the scheduler's own (set by the user or another wrapper) that
    # the Accumulator shadows while the block runs: checkpoints must hold the original.
    own_step = scheduler.step
    scheduler.step = own_step
    outside = scheduler.state_dict()
    with Accumulator(model, optimizer, 2, scheduler=scheduler):
        inside = scheduler.state_dict()
    assert inside.keys() == outside.keys()
    assert inside["step"] is own_step


def test_a_scheduler_whose_state_dict_leaves_out_attributes_saves_inside_the_block():
    class Scheduler(torch.optim.lr_scheduler.StepLR):
        def state_dict(self):
            return {"last_epoch": self.last_epoch}

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = Scheduler(optimizer, step_size=1)
    with Accumulator(model, optimizer, 2, scheduler=scheduler):
        assert scheduler.state_dict() == {"last_epoch": 0}


def test_scaler_step_passes_arguments_through():
    class Recording(torch.optim.SGD):
        def step(self, closure=None, tag=None):
            calls.append((closure, tag))
            return super().step()

    calls = []
    model = nn.Linear(6, 3)
    extra = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    unmanaged = Recording([extra], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = make_batches(1, 4, torch.float32)[0]
    with Accumulator(model, optimizer, 2, scaler=scaler) as acc:
        acc.backward(nn.functional.mse_loss(model(x), y))
        # An optimizer the Accumulator does not manage steps as usual, with its arguments.
        extra.grad = torch.ones(2)
        scaler.step(unmanaged, "positional", tag="keyword")
        assert calls == [("positional", "keyword")]
        # The managed optimizer gets them too, and refuses a closure as optimizer.step does.
        with pytest.raises(TypeError, match=r"optimizer.step\(closure\) is not supported"):
            scaler.step(optimizer, lambda: None)
        with pytest.raises(TypeError, match=r"optimizer.step\(closure\) is not supported"):
            scaler.step(optimizer, closure=lambda: None)


def test_calls_made_during_the_boundary_update_pass_through_with_their_arguments():
    class Recording(torch.optim.lr_scheduler.StepLR):
        def step(self, *args, **kwargs):
            calls.append((args, kwargs))
            super().step()

    calls = []
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = Recording(optimizer, step_size=1)
    calls.clear()  # the constructor's own step
    # An optimizer hook runs inside the update, where patched calls must go straight through.
    optimizer.register_step_post_hook(lambda *_: scheduler.step("hook", key="value"))
    with Accumulator(model, optimizer, 1, scheduler=scheduler) as acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        optimizer.step()
    assert calls == [(("hook",), {"key": "value"}), ((), {})]


def test_a_step_called_inside_the_update_passes_through_with_its_arguments():
    model = make_model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.1)
    calls = []

    def closure():
        calls.append("closure")

    # A hook of the first optimizer's real step steps the second one, with a closure.
    first.register_step_post_hook(lambda *_: (second.step(closure), second.step(closure=closure)))
    with Accumulator(model, [first, second], 1) as acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        first.step()
        second.step()
    assert calls == ["closure", "closure"]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad_during_the_update_passes_through(set_to_none):
    # A hook of the real optimizer step clears the model's gradients: that call is not the
    # loop's, so it runs as written.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.register_step_post_hook(lambda *_: model.zero_grad(set_to_none=set_to_none))
    with Accumulator(model, optimizer, 2) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
        assert acc.optimizer_steps == 1
        grads = [p.grad for p in model.parameters()]
    if set_to_none:
        assert all(g is None for g in grads)
    else:
        assert all(g is not None and not g.any() for g in grads)


def test_zero_grad_of_a_copy_made_inside_the_block_clears_the_copy_as_usual():
    import copy

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2):
        clone = copy.deepcopy(model)  # carries the patched zero_grad along
        mse(clone, make_batches(1, 4)[0]).backward()
        clone.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in clone.parameters())
        clone.zero_grad()
        assert all(p.grad is None for p in clone.parameters())


def test_zero_grad_at_the_boundary_sets_gradients_to_none():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()  # set_to_none=True, torch's default
        assert acc.optimizer_steps == 1
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("clear", ["model", "submodule", "model_top_of_loop"])
def test_model_and_submodule_zero_grad_wait_for_the_window_boundary(clear):
    batches = make_batches(8, 4)
    reference = make_model()
    reference_run(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), windows_of(batches, 4)
    )
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 4) as acc:
        for batch in batches:
            if clear == "model_top_of_loop":
                model.zero_grad()
            acc.backward(mse(model, batch))
            optimizer.step()
            if clear == "model":
                model.zero_grad()
            elif clear == "submodule":
                model[0].zero_grad()
                model[2].zero_grad()
    assert acc.optimizer_steps == 2
    assert_same(model, reference)
    assert "zero_grad" not in vars(model) and "zero_grad" not in vars(model[0])


class TwoHeads(nn.Module):
    """A trunk and two heads; the second head is used only on some steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 8).double()
        self.head_a = nn.Linear(8, 3).double()
        self.head_b = nn.Linear(8, 3).double()

    def forward(self, x, use_b):
        h = torch.tanh(self.trunk(x))
        return self.head_b(h) if use_b else self.head_a(h)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("where", ["after_step", "top_of_loop"])
def test_with_k1_the_loop_is_bitwise_the_plain_loop_for_both_set_to_none(set_to_none, where):
    batches = make_batches(6, 4)
    uses_b = [True, False, False, True, False, False]

    def run(accumulate):
        model = TwoHeads()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        acc = Accumulator(model, optimizer, 1)
        with acc if accumulate else contextlib.nullcontext():
            for (x, y), use_b in zip(batches, uses_b):
                if where == "top_of_loop":
                    optimizer.zero_grad(set_to_none=set_to_none)
                loss = nn.functional.mse_loss(model(x, use_b), y)
                acc.backward(loss) if accumulate else loss.backward()
                optimizer.step()
                if where == "after_step":
                    optimizer.zero_grad(set_to_none=set_to_none)
        return model

    assert_same(run(True), run(False), EXACT)


def test_zero_grad_without_set_to_none_keeps_moving_unused_parameters():
    # The negative control: with set_to_none=False the unused head still moves (momentum).
    model = TwoHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = make_batches(4, 4)
    with Accumulator(model, optimizer, 2) as acc:
        for index, (x, y) in enumerate(batches):
            acc.backward(nn.functional.mse_loss(model(x, index < 2), y))
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    after_first_window = model.head_b.weight.detach().clone()
    assert model.head_b.weight.grad is not None and not model.head_b.weight.grad.any()
    assert acc.optimizer_steps == 2
    assert not torch.equal(after_first_window, TwoHeads().head_b.weight)


@pytest.mark.parametrize("clear", ["optimizer", "model"])
def test_zero_grad_before_the_first_backward_clears_gradients_left_from_before(clear):
    batches = make_batches(2, 4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mse(model, batches[0]).backward()  # e.g. a sanity check run before training
    with Accumulator(model, optimizer, 2) as acc:
        for batch in batches:
            (optimizer if clear == "optimizer" else model).zero_grad()
            acc.backward(mse(model, batch))
            optimizer.step()
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    full = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    mse(reference, full).backward()
    ref_optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_cleared_between_blocks_or_at_the_top_of_the_loop_are_fine(set_to_none):
    batches = make_batches(5, 4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2) as acc:
        for batch in batches[:2]:
            optimizer.zero_grad(set_to_none=set_to_none)
            acc.backward(mse(model, batch))
            optimizer.step()
        mse(model, batches[4]).backward()  # inside the block, but cleared at the loop's top
        for batch in batches[2:4]:
            optimizer.zero_grad(set_to_none=set_to_none)
            acc.backward(mse(model, batch))
            optimizer.step()
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for part in (batches[:2], batches[2:4]):
        ref_optimizer.zero_grad()
        mse(
            reference, (torch.cat([x for x, _ in part]), torch.cat([y for _, y in part]))
        ).backward()
        ref_optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loop_clears", ["never", "after_step"])
def test_gradients_written_between_blocks_are_refused_at_the_next_window(loop_clears):
    # A loss.backward() after a block (a gradient-norm diagnostic, say) used to be added
    # silently to the next block's first window.
    batches = make_batches(5, 4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)

    def block(part):
        with acc:
            for batch in part:
                acc.backward(mse(model, batch))
                optimizer.step()
                if loop_clears == "after_step":
                    optimizer.zero_grad()

    block(batches[:2])
    mse(model, batches[4]).backward()
    with pytest.raises(RuntimeError, match=r"parameters \(e.g. 0.weight\) have gradients that "):
        block(batches[2:4])
    assert acc.optimizer_steps == 1
    optimizer.zero_grad()  # what the message asks for
    block(batches[2:4])
    assert acc.optimizer_steps == 2


def test_gradients_written_between_blocks_name_a_parameter_outside_the_model_by_shape():
    model = make_model()
    scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), scale], lr=0.1)  # watched: 0.weight, scale
    acc = Accumulator(model, optimizer, 1)
    with acc:
        acc.backward(mse(model, make_batches(1, 4)[0]) * scale.sum())
        optimizer.step()
    for param in model.parameters():  # zeros on 0.weight: the one to name is the scale
        param.grad = torch.zeros_like(param)
    (scale * 2).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameters \(e.g. <parameter of shape \(3,\)>\)"), acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))


@pytest.mark.parametrize("loop_clears", [False, True])
def test_a_parameter_left_out_of_the_next_window_rests(loop_clears):
    # Without zero_grad in the loop the library clears the last window's gradients itself
    # (to None, as zero_grad() does); with model.zero_grad() its set_to_none=True is kept
    # for the clearing at the window's start. Either way momentum does not move a parameter
    # that no loss of the next window reaches.
    model, head = make_model(), nn.Linear(3, 3).double()
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    (x, y), batch = make_batches(2, 4)
    losses = [lambda: nn.functional.mse_loss(head(model(x)), y), lambda: mse(model, batch)]
    with Accumulator(model, optimizer, 1) as acc:
        for index, loss in enumerate(losses):
            if loop_clears:
                model.zero_grad()
            acc.backward(loss())
            optimizer.step()
            if index == 0:
                after_first = [p.detach().clone() for p in head.parameters()]
    for p, b in zip(head.parameters(), after_first, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("reaches", ["the_last_parameter", "the_first_group"])
def test_a_write_reaching_one_end_of_the_watch_is_noticed(reaches):
    # The watch reads the first and last parameter of every param group: an auxiliary loss
    # on the head's bias alone, or on the first of two groups alone, must show.
    model = make_model()
    first_weight, head_bias = model[0].weight, model[2].bias
    if reaches == "the_last_parameter":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        aux = head_bias
    else:
        body = [p for p in model.parameters() if p is not head_bias]
        groups = [{"params": body}, {"params": [head_bias]}, {"params": []}]  # empty: allowed
        optimizer = torch.optim.SGD(groups, lr=0.1)
        aux = first_weight
    batches = make_batches(2, 4)
    with (
        pytest.raises(RuntimeError, match=r"changed between two acc.backward\(\) calls"),
        Accumulator(model, optimizer, 2) as acc,
    ):
        acc.backward(mse(model, batches[0]))
        aux.square().sum().backward()
        acc.backward(mse(model, batches[1]))


def test_gradients_changed_mid_window_outside_the_model_name_the_shape():
    model = make_model()
    extra = [nn.Parameter(torch.ones(5, dtype=torch.float64)), nn.Parameter(torch.ones(2, 2))]
    optimizer = torch.optim.SGD([*extra, *model.parameters()], lr=0.1)

    def loss(batch):
        return mse(model, batch) + extra[0].square().sum() + extra[1].square().sum()

    batches = make_batches(3, 4)
    with (
        pytest.raises(RuntimeError, match=r"\(e.g. <parameter of shape \(5,\)>\) changed"),
        Accumulator(model, optimizer, 3) as acc,
    ):
        acc.backward(loss(batches[0]))
        loss(batches[1]).backward()
        acc.backward(loss(batches[2]))


def test_a_parameter_group_added_in_the_middle_of_a_window_still_steps():
    model, head = make_model(), nn.Linear(3, 3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(2, 4)
    with Accumulator(model, optimizer, 2) as acc:
        acc.backward(mse(model, batches[0]))
        optimizer.add_param_group({"params": head.parameters()})
        acc.backward(nn.functional.mse_loss(head(model(batches[1][0])), batches[1][1]))
        optimizer.step()
    assert acc.optimizer_steps == 1


def test_a_scheduler_created_inside_the_block_steps_once_per_window():
    batches = make_batches(8, 4)
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, lambda step: 0.5**step)
    reference_run(reference, ref_optimizer, windows_of(batches, 2), scheduler=ref_scheduler)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 2) as acc:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        for batch in batches:
            acc.backward(mse(model, batch))
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 4 and scheduler.last_epoch == 4
    assert_same(model, reference)


class StepOnly:
    """A hand-written schedule with nothing but step()."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.steps = 0

    def step(self):
        self.steps += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5


def test_a_scheduler_with_only_step_steps_once_per_window():
    batches = make_batches(6, 4)
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference_run(
        reference, ref_optimizer, windows_of(batches, 3), scheduler=StepOnly(ref_optimizer)
    )
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = StepOnly(optimizer)
    with Accumulator(model, optimizer, 3, scheduler=scheduler) as acc:
        for batch in batches:
            acc.backward(mse(model, batch))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert scheduler.steps == 2 and acc.optimizer_steps == 2
    assert "step" not in vars(scheduler)
    assert_same(model, reference)


def test_an_unknown_scheduler_stepped_per_micro_batch_is_refused_naming_scheduler():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with (
        pytest.raises(RuntimeError, match=r"learning rate .* changed in the middle .* scheduler="),
        Accumulator(model, optimizer, 2) as acc,
    ):
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            scheduler.step()  # per micro-batch, unknown to the Accumulator


def test_an_unknown_scheduler_stepped_before_the_boundary_step_is_named():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match=r"or before optimizer.step\(\)"),
        Accumulator(model, optimizer, 2) as acc,
    ):
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            if acc.sync_gradients:
                scheduler.step()  # before optimizer.step(): the step would use the new rate
            optimizer.step()


def test_backward_outside_the_block_raises():
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    with pytest.raises(
        RuntimeError, match=r"acc.backward\(\) was called outside the `with acc:` block"
    ):
        acc.backward(mse(model, make_batches(1, 4)[0]))


def test_entering_the_same_accumulator_twice_raises_and_keeps_the_outer_block():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    with acc:
        with pytest.raises(RuntimeError, match=r"this Accumulator is already active"), acc:
            pass
        assert acc.active
        assert "step" in vars(optimizer)
    assert "step" not in vars(optimizer)


def test_step_with_a_closure_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(TypeError, match=r"optimizer.step\(closure\) is not supported"),
        Accumulator(model, optimizer, 2),
    ):
        optimizer.step(lambda: mse(model, make_batches(1, 4)[0]))
    assert "step" not in vars(optimizer)


def test_a_step_closure_is_refused_naming_the_optimizer_class():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        Accumulator(model, optimizer, 2) as acc,
        pytest.raises(TypeError, match=r"call SGD\.step\(\) without a closure"),
    ):
        acc.backward(mse(model, make_batches(1, 4)[0]))
        optimizer.step(lambda: None)


def test_backward_after_a_complete_window_without_step_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with (
        pytest.raises(RuntimeError, match=r"call optimizer.step\(\) .* after every acc.backward"),
        acc,
    ):
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))


def test_loss_backward_instead_of_acc_backward_is_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match=r"no acc.backward\(\) ran .* acc.backward\(loss\)"),
        Accumulator(model, optimizer, 4),
    ):
        for batch in make_batches(4, 4):
            mse(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_loss_backward_in_the_middle_of_a_window_is_refused_naming_a_parameter():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(4, 4)
    first = r"parameter\(s\) \(e.g. 0.weight\) changed between two acc.backward\(\) calls"
    with (
        pytest.raises(RuntimeError, match=first),
        Accumulator(model, optimizer, 4) as acc,
    ):
        acc.backward(mse(model, batches[0]))
        mse(model, batches[1]).backward()
        acc.backward(mse(model, batches[2]))


def test_two_accumulators_on_one_optimizer_raise():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Accumulator(model, optimizer, 2)
    second = Accumulator(model, optimizer, 4)
    with first:
        with pytest.raises(RuntimeError, match=r"already driven by another active Accumulator"):
            second.__enter__()
        assert first.active and not second.active
    assert "step" not in vars(optimizer)
    with second:  # fine once the first has left
        pass


def test_one_accumulator_per_optimizer_on_one_loss_is_refused_naming_the_joint_form():
    model = TwoParts()
    body_optimizer, head_optimizer = two_optimizers(model)
    with (
        pytest.raises(RuntimeError, match=r"Accumulator\(model, \[optimizer_a, optimizer_b\]\)"),
        Accumulator(model, body_optimizer, 2) as acc,
        Accumulator(model.head, head_optimizer, 2),
    ):
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            body_optimizer.step()
            head_optimizer.step()


def test_accumulators_whose_losses_reach_each_others_parameters_are_refused():
    generator, discriminator = nn.Linear(4, 6).double(), nn.Linear(6, 1).double()
    g_optimizer = torch.optim.SGD(generator.parameters(), lr=0.1)
    d_optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    acc_g = Accumulator(generator, g_optimizer, 2)
    acc_d = Accumulator(discriminator, d_optimizer, 2)
    real = torch.randn(8, 6, dtype=torch.float64)
    with (
        pytest.raises(RuntimeError, match=r"changed between two acc.backward\(\) calls"),
        acc_g,
        acc_d,
    ):
        for _ in range(2):
            fake = generator(torch.randn(8, 4, dtype=torch.float64))
            d_loss = discriminator(real).mean() - discriminator(fake.detach()).mean()
            acc_d.backward(d_loss)
            d_optimizer.step()
            g_loss = discriminator(fake).mean()  # reaches the discriminator's parameters
            acc_g.backward(g_loss)
            g_optimizer.step()
