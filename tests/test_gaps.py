"""Behaviours that mutation testing (benchmarks/mutation.py) found no test pinned.

Grouped by module; docs/testing.md lists the surviving mutants each test kills.
"""

import sys
from typing import ClassVar

import pytest
import torch
from helpers import make_batches, make_model, mse, sgd_failing_first_step
from torch import nn

from torch_accum import Accumulator, measure_activation_memory


# ----------------------------------------------------------------------------- progress.py
class RecordingBar:
    """Stands in for tqdm: records how the bar was made and every postfix and update."""

    made: ClassVar[list["RecordingBar"]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.postfixes = []
        self.updates = 0
        self.closed = False
        RecordingBar.made.append(self)

    def set_postfix(self, postfix, refresh=True):
        self.postfixes.append((dict(postfix), refresh))

    def update(self, n):
        self.updates += n

    def close(self):
        self.closed = True


@pytest.fixture
def recording_bar(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    RecordingBar.made = []
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    return RecordingBar.made


def train_with_bar(k=2, micro_batches=4, lr=0.05, **kwargs):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    acc = Accumulator(model, optimizer, k, progress=True, **kwargs)
    with acc:
        for batch in make_batches(micro_batches, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return acc


def test_progress_bar_in_a_log_file_redraws_rarely_at_a_fixed_width(recording_bar):
    assert not sys.stderr.isatty()
    train_with_bar(total_micro_batches=4)
    (bar,) = recording_bar
    assert bar.kwargs == {
        "total": 2,
        "desc": "optimizer steps",
        "unit": "step",
        "dynamic_ncols": False,
        "mininterval": 10.0,
    }
    assert bar.updates == 2 and bar.closed


def test_progress_bar_on_a_terminal_follows_its_width_and_redraws_often(recording_bar, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train_with_bar()
    (bar,) = recording_bar
    assert bar.kwargs["total"] is None  # the block's length is not known
    assert bar.kwargs["dynamic_ncols"] is True
    assert bar.kwargs["mininterval"] == 0.1


def test_progress_bar_postfix_shows_micro_batch_loss_lr_and_skips(recording_bar):
    acc = train_with_bar(k=2, micro_batches=4, lr=0.05)
    (bar,) = recording_bar
    postfixes = [postfix for postfix, _ in bar.postfixes]
    assert all(refresh is False for _, refresh in bar.postfixes)  # tqdm redraws on its clock
    assert postfixes[0] == {"micro": "1/2"}
    assert postfixes[1] == {"micro": "2/2"}
    assert postfixes[2] == {"micro": "2/2", "loss": postfixes[2]["loss"], "lr": "0.05"}
    assert postfixes[-1]["loss"] == f"{acc.loss:.4g}"
    assert "skipped" not in postfixes[-1]
    assert len(postfixes) == 6  # 4 micro-batches + 2 steps


def test_progress_bar_counts_skipped_steps(recording_bar):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = Accumulator(model, optimizer, 1, progress=True)
    with acc, pytest.warns(RuntimeWarning, match="non-finite gradient"):
        x, y = make_batches(1, 4)[0]
        acc.backward(mse(model, (x * float("nan"), y)))
        optimizer.step()
    (bar,) = recording_bar
    postfix, _ = bar.postfixes[-1]
    assert postfix["skipped"] == "1"
    assert postfix["loss"] == "nan"


# ----------------------------------------------------------------------------- error texts
class Reprs:
    """An object whose repr is exactly the text given."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("x" * 60, "got " + "x" * 60 + " (Reprs)"),  # up to 60 characters the repr is shown
        ("x" * 61, "an object of type Reprs"),  # a longer one is summarised
        ("a\nb", "an object of type Reprs"),  # as is a short one on several lines
    ],
)
def test_error_messages_show_short_one_line_reprs_only(text, shown):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    value = Reprs(text)
    with pytest.raises(TypeError) as accumulator_error:
        Accumulator(model, optimizer, value)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as memory_error:
        measure_activation_memory(value)
    for error in (accumulator_error, memory_error):
        assert shown in str(error.value)
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- _boundary.py
class Wide(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.unused = nn.Linear(2, 2)  # no gradient at all, listed first
        self.ok = nn.Linear(2, 2)  # finite gradient
        self.layers = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
        out = self.ok(x).sum()
        for layer in self.layers:
            out = out + (layer(x) * poison).sum()
        return out


@pytest.mark.parametrize(
    ("layers", "listed"),
    [
        (
            5,
            "5 parameter(s): layers.0.weight, layers.1.weight, layers.2.weight, "
            "layers.3.weight, layers.4.weight; the update",
        ),
        (
            6,
            "6 parameter(s): layers.0.weight, layers.1.weight, layers.2.weight, "
            "layers.3.weight, layers.4.weight ...; the update",
        ),
    ],
)
def test_non_finite_error_names_the_first_five_parameters(layers, listed):
    model = Wide(layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1, on_nonfinite="raise")
    with acc, pytest.raises(RuntimeError) as error:
        acc.backward(model(torch.ones(1, 2), torch.tensor(float("inf"))))
        optimizer.step()
    assert f"non-finite gradient in {listed}" in str(error.value)


def test_non_finite_warning_shows_the_shape_of_a_parameter_outside_the_model():
    model = make_model()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with acc, pytest.warns(RuntimeWarning) as warned:
        x, y = make_batches(1, 4)[0]
        acc.backward(mse(model, (x, y)) + (extra * float("inf")).sum())
        optimizer.step()
    assert str(warned[0].message) == (
        "non-finite gradient in 1 parameter(s): <parameter of shape (3,)>: optimizer step 1 skipped"
    )


def test_a_tensor_learning_rate_is_never_read_back_to_the_host():
    # The learning-rate check skips tensor rates: reading one is a device sync per window
    # (on CPU too it goes through aten._local_scalar_dense, which is what this counts).
    from torch.utils._python_dispatch import TorchDispatchMode

    lr = torch.tensor(0.1, dtype=torch.float64)

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and args[0] is lr:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with Accumulator(model, optimizer, 2) as acc, CountReads():
        for batch in make_batches(4, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert acc.optimizer_steps == 2
    assert CountReads.reads == 0


# ----------------------------------------------------------------------------- resumable state
def pending_state(k=3, micro_batches=1, weight=None, dtype=torch.float64):
    model = make_model(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, k)
    with acc:
        for batch in make_batches(micro_batches, 4, dtype):
            acc.backward(mse(model, batch), weight=weight)
            if acc.sync_gradients:
                break
        state = acc.state_dict()
    return model, acc, state


def test_a_state_dict_from_before_explicit_window_states_still_loads():
    # Older checkpoints saved no window "state", "length" or "weighted"; a complete window
    # was marked by window_ready alone. Such a window must still be applied on resume.
    _, _, state = pending_state(k=2, micro_batches=2)
    assert state["window_ready"] and state["window"]["state"] == "complete"
    for key in ("state", "length", "weighted"):
        del state["window"][key]
        if state["last_window"] is not None:
            del state["last_window"][key]
    expected = make_model()
    expected_optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    for p, saved in zip(expected.parameters(), state["gradients"]):
        p.grad = saved.clone()
    expected_optimizer.step()

    resumed_model = make_model()
    optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    acc = Accumulator(resumed_model, optimizer, 2)
    acc.load_state_dict(state)
    assert acc.window_state.value == "complete" and acc.micro_step == 2
    with acc:
        optimizer.step()  # the loop's step after the backward that completed the window
    assert acc.optimizer_steps == 1
    for got, want in zip(resumed_model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_old_pending_window_resumes_with_the_saved_length():
    _, _, state = pending_state(k=3, micro_batches=1)
    for key in ("state", "length", "weighted"):
        del state["window"][key]
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    acc.load_state_dict(state)
    assert acc.window_state.value == "accumulating"
    assert acc.state_dict()["window"]["weighted"] is False  # unweighted unless saved so
    ends = []
    with acc:
        for batch in make_batches(2, 4, seed=7):
            acc.backward(mse(model, batch))
            ends.append(acc.sync_gradients)
            optimizer.step()
    assert ends == [False, True]  # two more micro-batches complete the window of 3
    assert acc.optimizer_steps == 1


def test_load_state_dict_restores_the_skipped_steps():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 1)
    with acc, pytest.warns(RuntimeWarning):
        x, y = make_batches(1, 4)[0]
        acc.backward(mse(model, (x * float("nan"), y)))
        optimizer.step()
    state = acc.state_dict()
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 1)
    other.load_state_dict(state)
    assert (other.skipped_steps, other.optimizer_steps) == (1, 0)


def test_load_state_dict_rejects_a_gradient_of_the_wrong_shape():
    _, _, state = pending_state()
    state["gradients"][0] = torch.zeros(2, 2, dtype=torch.float64)
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    with pytest.raises(
        ValueError,
        match=r"state_dict\['gradients'\]\[0\] has shape \(2, 2\) but the parameter has shape \(16, 6\)",
    ):
        acc.load_state_dict(state)


def test_loaded_gradients_take_the_parameters_dtype_and_are_copies():
    _, _, state = pending_state(dtype=torch.float32)
    model = make_model(torch.float64)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    acc.load_state_dict(state)
    for param, saved in zip(model.parameters(), state["gradients"]):
        assert param.grad.dtype == torch.float64 and param.grad.device == param.device
        torch.testing.assert_close(param.grad, saved.double(), rtol=0, atol=0)
    # Accumulating further must not write into the checkpoint's tensors.
    saved_copy = [g.clone() for g in state["gradients"]]
    same = make_model(torch.float32)
    acc32 = Accumulator(same, torch.optim.SGD(same.parameters(), lr=0.1), 3)
    acc32.load_state_dict(state)
    with acc32:
        acc32.backward(mse(same, make_batches(1, 4, torch.float32, seed=9)[0]))
    for saved, before in zip(state["gradients"], saved_copy):
        assert torch.equal(saved, before)


# ----------------------------------------------------------------------------- _validation.py
def test_shared_parameters_are_counted_across_all_optimizers():
    a, b, c = (nn.Parameter(torch.ones(1)) for _ in range(3))
    first = torch.optim.SGD([a, b], lr=0.1)
    second = torch.optim.SGD([a], lr=0.1)
    third = torch.optim.SGD([b, c], lr=0.1)
    model = nn.Module()
    with pytest.raises(
        ValueError, match=r"optimizer: 2 parameter\(s\) belong to more than one of the optimizers"
    ):
        Accumulator(model, [first, second, third])


# ----------------------------------------------------------------------------- iterate()
def test_iterate_refuses_to_go_on_after_the_block_has_ended():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    batches = make_batches(2, 4)
    with acc:
        items = acc.iterate(batches)
        acc.backward(mse(model, next(items)))
        acc.discard()
    with pytest.raises(RuntimeError, match=r"acc.iterate\(\) was called outside the `with acc:`"):
        next(items)


def test_a_complete_window_resumed_with_non_finite_gradients_is_skipped():
    _, _, state = pending_state(k=2, micro_batches=2)
    state["gradients"][0][0, 0] = float("nan")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(model, optimizer, 2)
    acc.load_state_dict(state)
    with acc, pytest.warns(RuntimeWarning, match="non-finite gradient in 1 parameter"):
        optimizer.step()
    assert (acc.optimizer_steps, acc.skipped_steps) == (0, 1)
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)


def saved_with_one_window_finished_and_one_pending():
    """The state_dict and loss of an Accumulator after 3 micro-batches at K=2."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    with acc:
        for batch in make_batches(3, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
        return acc.state_dict(), acc.loss


def test_load_state_dict_restores_the_last_window_loss():
    state, loss_at_save = saved_with_one_window_finished_and_one_pending()
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    assert other.loss is None
    other.load_state_dict(state)
    assert isinstance(other.loss, float)
    assert other.loss == loss_at_save


def test_state_dict_of_a_pending_window_keeps_parameters_without_gradient():
    model = nn.ModuleDict({"used": nn.Linear(6, 3), "unused": nn.Linear(6, 3)}).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 2)
    x, y = make_batches(1, 4)[0]
    with acc:
        acc.backward(nn.functional.mse_loss(model["used"](x), y))
        state = acc.state_dict()
    assert [g is None for g in state["gradients"]] == [False, False, True, True]
    other_model = nn.ModuleDict({"used": nn.Linear(6, 3), "unused": nn.Linear(6, 3)}).double()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    other.load_state_dict(state)
    assert other_model["unused"].weight.grad is None
    torch.testing.assert_close(
        other_model["used"].weight.grad, state["gradients"][0], rtol=0, atol=0
    )


# ----------------------------------------------------------------------------- _patching.py
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


# ----------------------------------------------------------------------------- _boundary.py
def test_with_a_scaler_an_error_after_the_first_optimizer_stepped_uses_the_window_up():
    FailsOnce = sgd_failing_first_step("second optimizer failed")

    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = FailsOnce(model[1].parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    acc = Accumulator(model, [first, second], 1, scaler=scaler)
    x, y = make_batches(1, 4, torch.float32)[0]
    with acc:
        acc.backward(nn.functional.mse_loss(model(x), y))
        first_before = [p.detach().clone() for p in model[0].parameters()]
        with pytest.raises(RuntimeError, match="second optimizer failed"):
            scaler.step(first)
        # The first optimizer stepped: a retry must not step it again.
        assert acc.window_state.value == "applied"
        stepped = [p.detach().clone() for p in model[0].parameters()]
        assert not torch.equal(stepped[0], first_before[0])
        scaler.step(first)
        for got, want in zip(model[0].parameters(), stepped):
            assert torch.equal(got, want)


# ----------------------------------------------------------------------------- _interception.py
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


def test_a_scheduler_whose_state_dict_leaves_out_attributes_saves_inside_the_block():
    class Scheduler(torch.optim.lr_scheduler.StepLR):
        def state_dict(self):
            return {"last_epoch": self.last_epoch}

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = Scheduler(optimizer, step_size=1)
    with Accumulator(model, optimizer, 2, scheduler=scheduler):
        assert scheduler.state_dict() == {"last_epoch": 0}


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


# ----------------------------------------------------------------------------- _driver.py
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


def test_discard_outside_the_block_clears_parameters_outside_the_model_to_none():
    # A parameter the optimizer trains but the model does not hold (a learned loss scale).
    model = make_model()
    temperature = nn.Parameter(torch.ones((), dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    acc = Accumulator(model, optimizer, 4, partial_window="carry")
    with acc:
        acc.backward(mse(model, make_batches(1, 4)[0]) * temperature)
    assert temperature.grad is not None
    assert acc.discard() == 1
    assert temperature.grad is None


# ----------------------------------------------------------------------------- _gradients.py
def test_one_backward_seed_per_factor_is_reused_across_micro_batches(monkeypatch):
    # Seeding backward with the factor saves an allocation per micro-batch only if the seed
    # is kept: every micro-batch of a K=4 run starts backward from the same tensor.
    seeds = []
    backward = torch.autograd.backward

    def recording(tensors, grad_tensors=None, *args, **kwargs):
        seeds.append(grad_tensors)
        return backward(tensors, grad_tensors, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", recording)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 4) as acc:
        for batch in make_batches(8, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert len(seeds) == 8
    assert all(seed is seeds[0] for seed in seeds)
    assert seeds[0].item() == 0.25 and seeds[0]._version == 0


def test_a_seed_that_is_not_the_cached_one_is_left_alone():
    from torch_accum._gradients import BackwardSeeds

    seeds = BackwardSeeds()
    loss = torch.tensor(2.0, dtype=torch.float64)
    seeds.release(torch.full_like(loss, 0.5), 0.5)  # nothing cached yet: nothing to forget
    cached = seeds.get(loss, 0.5)
    stranger = torch.full_like(loss, 0.5)
    stranger.add_(0)  # changed, as a seed autograd adopted would be
    seeds.release(stranger, 0.5)
    assert seeds.get(loss, 0.5) is cached
    cached.add_(0)
    seeds.release(cached, 0.5)  # the cached seed changed: a new one from now on
    assert seeds.get(loss, 0.5) is not cached


# ----------------------------------------------------------------------------- microbatch.py
def test_memory_budget_sizing_starts_from_a_four_sample_probe():
    # The 4-sample probe's peak per sample gives the first guess; a bisection on measured
    # peaks then settles on the largest size within the budget.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 1))
    x, y = torch.randn(64, 32), torch.randn(64, 1)

    def peak(size):
        return measure_activation_memory(
            lambda: nn.functional.mse_loss(model(x[:size]), y[:size]),
            parameters=model.parameters(),
        ).peak

    budget = peak(20)
    largest = max(s for s in range(1, 65) if peak(s) <= budget)
    sizes = []

    def compute_loss(micro):
        sizes.append(len(micro[0]))
        return nn.functional.mse_loss(model(micro[0]), micro[1])

    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size="auto",
        memory_budget=budget,
    )
    with acc:
        acc.step_batch((x, y), compute_loss)
    assert acc.micro_batch_size == largest
    first_guess = int(budget // (peak(4) / 4))
    assert sizes[:2] == [4, first_guess]
    probes = sizes[: -len(range(0, 64, largest))]
    assert sizes[len(probes) :] == [largest] * (64 // largest) + [64 % largest] * bool(64 % largest)
    assert len(probes) <= 8


def test_state_dict_survives_a_round_trip_unchanged():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, 3)
    batches = make_batches(4, 4)
    with acc:
        for batch, weight in zip(batches, [1.0, 2.0, 3.0, 4.0]):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
        # K changes between windows: the pending window keeps its own length of 3.
        acc.accumulation_steps = 2
        state = acc.state_dict()
    assert state["window"]["length"] == 3 and state["accumulation_steps"] == 2
    assert state["window"]["weighted"] is True and state["last_window"]["weighted"] is True
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again.keys() == state.keys()
    for key in ("accumulation_steps", "optimizer_steps", "skipped_steps", "window_ready"):
        assert again[key] == state[key], key
    for part in ("window", "last_window"):
        for key, value in state[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again[part][key], value), (part, key)
            else:
                assert again[part][key] == value, (part, key)
    # The resumed window still needs two more micro-batches to reach its length of 3.
    ends = []
    with other:
        for batch in make_batches(2, 4, seed=3):
            other.backward(mse(other_model, batch))
            ends.append(other.sync_gradients)
            other_model.zero_grad()
    assert ends == [False, True]


def test_loading_a_state_dict_into_a_running_window_continues_from_it():
    # Rolling back to a checkpoint mid-window: the loaded gradients replace the pending
    # ones, and the next acc.backward must not mistake them for a foreign write.
    batches = make_batches(4, 4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 3) as acc:
        acc.backward(mse(model, batches[0]))
        state = acc.state_dict()
        acc.backward(mse(model, batches[1]))
        acc.load_state_dict(state)  # back to one micro-batch pending
        for batch in batches[2:]:
            acc.backward(mse(model, batch))
            optimizer.step()
    assert acc.optimizer_steps == 1
    kept = [batches[0], *batches[2:]]
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    mse(reference, (torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept]))).backward()
    ref_optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_loaded_gradients_move_to_the_parameters_device():
    # A checkpoint saved on one device and loaded on another (here: onto the meta device).
    _, _, state = pending_state()
    model = make_model().to("meta")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    acc.load_state_dict(state)
    for param in model.parameters():
        assert param.grad.device.type == "meta"


def test_a_memory_budget_below_one_sample_falls_back_to_micro_batches_of_one():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, micro_batch_size="auto", memory_budget=1)
    with acc:
        acc.step_batch(make_batches(1, 6)[0], lambda micro: mse(model, micro))
    assert acc.micro_batch_size == 1
    assert acc.optimizer_steps == 1


# ----------------------------------------------------------------------------- discarding
def test_discard_keeps_the_micro_batches_counted_towards_total_micro_batches():
    # acc.discard() drops the window, not the block's progress: the third acc.backward of a
    # block declared with 3 micro-batches still ends it.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(3, 4)
    with Accumulator(model, optimizer, 3, total_micro_batches=3) as acc:
        acc.backward(mse(model, batches[0]))
        assert acc.discard() == 1
        ends = []
        for batch in batches[1:]:
            acc.backward(mse(model, batch))
            ends.append(acc.sync_gradients)
            optimizer.step()
    assert ends == [False, True]
    assert acc.optimizer_steps == 1


def test_a_failed_step_batch_leaves_the_blocks_count_as_it_was():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(3, 4)
    calls = []

    def failing(micro):
        calls.append(len(micro[0]))
        if len(calls) == 2:
            raise ValueError("bad sample")
        return mse(model, micro)

    acc = Accumulator(model, optimizer, 2, micro_batch_size=2, total_micro_batches=2)
    with acc:
        with pytest.raises(ValueError, match="bad sample"):
            acc.step_batch(batches[0], failing)
        ends = []
        for batch in batches[1:]:
            acc.backward(mse(model, batch))
            ends.append(acc.sync_gradients)
            optimizer.step()
    assert ends == [False, True]


def test_discard_frees_the_dropped_gradients_at_once():
    import gc
    import weakref

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, 3) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
        grads = [weakref.ref(p.grad) for p in model.parameters()]
        acc.discard()
        gc.collect()
        assert all(ref() is None for ref in grads)


def test_probe_up_after_does_not_probe_at_the_cap(caplog):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(
        model, optimizer, micro_batch_size="auto", max_micro_batch_size=4, probe_up_after=1
    )
    with caplog.at_level("INFO", logger="torch_accum"), acc:
        for batch in make_batches(3, 8):
            acc.step_batch(batch, lambda micro: mse(model, micro))
    assert acc.micro_batch_size == 4
    assert "probing" not in caplog.text


def test_window_loss_weights_are_exact_in_float64():
    # Relative weights such as 0.1 are not float32 numbers: the mean must not round them.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = make_batches(3, 4)
    weights = [1.0, 0.1, 0.7]
    losses = [mse(model, b).item() for b in batches]
    with Accumulator(model, optimizer, 3) as acc:
        for batch, weight in zip(batches, weights):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
    expected = sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)
    assert acc.loss == pytest.approx(expected, rel=1e-13, abs=0)


def test_discard_sets_every_gradient_to_none_also_outside_the_optimizer():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)).double()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)  # model[1] trains elsewhere
    x, y = make_batches(1, 4)[0]
    with Accumulator(model, optimizer, 2) as acc:
        acc.backward(nn.functional.mse_loss(model(x), y))
        assert all(p.grad is not None for p in model.parameters())
        acc.discard()
        assert [p.grad for p in model.parameters()] == [None] * 4


def test_memory_budget_measures_only_before_the_first_batch():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def compute_loss(micro):
        calls.append(len(micro[0]))
        return mse(model, micro)

    acc = Accumulator(
        model, optimizer, micro_batch_size="auto", max_micro_batch_size=4, memory_budget=10**9
    )
    with acc:
        acc.step_batch(make_batches(1, 8)[0], compute_loss)
        assert len(calls) > 2  # the probes, then two micro-batches of 4
        calls.clear()
        acc.step_batch(make_batches(1, 8, seed=2)[0], compute_loss)
    assert calls == [4, 4]


def test_step_batch_weighs_micro_batches_by_the_weight_function():
    # A loss that is a mean over tokens, with a different number of tokens per micro-batch:
    # weighted by tokens, the update is the mean over all tokens of the batch.
    torch.manual_seed(0)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1], [1, 1, 1]])
    mask = mask.bool()

    def token_mean(model, x, y, mask):
        return ((model(x) - y) ** 2)[mask].mean()

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Accumulator(model, optimizer, micro_batch_size=2) as acc:
        acc.step_batch(
            (x, y, mask),
            lambda micro: token_mean(model, *micro),
            weight=lambda micro: micro[2].sum(),
        )
    reference = make_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    token_mean(reference, x, y, mask).backward()
    ref_optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_an_out_of_memory_replay_counts_the_replayed_micro_batches_once():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def compute_loss(micro):
        calls.append(len(micro[0]))
        if len(calls) == 2:  # the second micro-batch of the first attempt
            raise torch.OutOfMemoryError("simulated")
        return mse(model, micro)

    acc = Accumulator(
        model,
        optimizer,
        micro_batch_size="auto",
        max_micro_batch_size=2,
        total_micro_batches=5,
    )
    with acc:
        acc.step_batch(make_batches(1, 4)[0], compute_loss)
        assert calls == [2, 2, 1, 1, 1, 1] and acc.oom_retries == 1
        # 4 micro-batches counted, not 5: one more acc.backward ends the block.
        acc.backward(mse(model, make_batches(1, 4, seed=3)[0]))
        assert acc.sync_gradients
        optimizer.step()


def test_an_old_state_dict_with_a_finished_window_restores_its_loss():
    state, loss_at_save = saved_with_one_window_finished_and_one_pending()
    for key in ("state", "length", "weighted"):
        del state["last_window"][key]
    other_model = make_model()
    other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), 2)
    other.load_state_dict(state)
    assert other.loss == loss_at_save


def test_discard_clears_parameters_the_optimizer_holds_outside_the_model():
    model = make_model()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    x, y = make_batches(1, 4)[0]
    with Accumulator(model, optimizer, 2) as acc:
        acc.backward(mse(model, (x, y)) + extra.sum())
        acc.discard()
        assert extra.grad is None


def test_step_batch_returns_the_batch_mean_loss():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batches(1, 6)[0]
    with Accumulator(model, optimizer, micro_batch_size=4) as acc:
        loss = acc.step_batch(batch, lambda micro: mse(model, micro))
    assert loss == acc.loss
    assert loss == pytest.approx(mse(model, batch).item(), rel=1e-12)


def test_step_batch_outside_the_block_names_itself():
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    with pytest.raises(RuntimeError, match=r"^acc.step_batch\(\) was called outside the `with"):
        acc.step_batch(make_batches(1, 4)[0], lambda micro: mse(model, micro))


def test_step_batch_splits_named_tuples():
    from collections import namedtuple

    Batch = namedtuple("Batch", ["x", "y"])
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def compute_loss(micro):
        seen.append((type(micro), len(micro.x), len(micro.y)))
        return mse(model, micro)

    with Accumulator(model, optimizer, micro_batch_size=4) as acc:
        acc.step_batch(Batch(*make_batches(1, 10)[0]), compute_loss)
    assert seen == [(Batch, 4, 4), (Batch, 4, 4), (Batch, 2, 2)]


def test_batches_whose_tensors_disagree_are_refused_naming_the_sizes():
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    x, y = make_batches(1, 4)[0]
    with acc:
        with pytest.raises(
            ValueError, match=r"\(sizes of dimension 0: \[3, 4\]\); every tensor must have"
        ):
            acc.step_batch((x, y[:3]), lambda micro: mse(model, micro))
        with pytest.raises(
            ValueError, match=r"\(sizes of dimension 0: \[4\], and a 0-d tensor\); every tensor"
        ):
            acc.step_batch((x, y, torch.tensor(1.0)), lambda micro: mse(model, micro[:2]))


def test_state_dict_after_discard_saves_a_fresh_window():
    # The dropped window is finished: resuming from here starts a new one, as a new run would.
    def saved_window(micro_batches, discard):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = Accumulator(model, optimizer, 3)
        with acc:
            for batch in make_batches(micro_batches, 4):
                acc.backward(mse(model, batch))
                optimizer.step()
            if discard:
                acc.discard()
            window = acc.state_dict()["window"]
        assert window.pop("losses").numel() == 0
        return window

    assert saved_window(2, discard=True) == saved_window(0, discard=False)


# ----------------------------------------------------------------------------- memory.py
def test_a_storage_that_an_out_argument_resizes_counts_its_new_size():
    x = torch.ones(100)  # 400 bytes

    def forward():
        out = torch.empty(4)  # 16 bytes, grown to 400 in place
        torch.mul(x, 2, out=out.resize_(100))
        return out.sum()

    memory = measure_activation_memory(forward, backward=False)
    assert memory.peak == 400 + 4
    assert memory.retained_after_forward == 4  # `out` is freed when forward returns


def test_a_view_of_a_new_tensor_is_not_counted_again():
    x = torch.ones(100)
    memory = measure_activation_memory(lambda: (x * 2).view(10, 10)[0].sum(), backward=False)
    assert memory.peak == 400 + 4


def test_a_wrapper_subclass_counts_the_storages_of_its_inner_tensors():
    # DTensor (FSDP2) is such a subclass: the memory is in the tensors it wraps.
    from torch.testing._internal.two_tensor import TwoTensor

    x = TwoTensor(torch.ones(100), torch.ones(100))
    memory = measure_activation_memory(lambda: (x * 2).sum(), backward=False)
    assert memory.peak == 2 * 400 + 2 * 4


def test_a_broadcast_gradient_is_not_taken_for_the_parameters_own():
    # The gradient of w.sum() is the 4-byte backward seed expanded to w's shape: its storage
    # is the seed's, an activation of backward, not a gradient to leave out.
    weight = nn.Parameter(torch.ones(100, 4))
    weight.grad = torch.zeros_like(weight)
    memory = measure_activation_memory(lambda: weight.sum(), parameters=[weight])
    assert (memory.retained_after_forward, memory.peak) == (4, 4 + 4)


def test_parameters_may_be_a_single_tensor():
    weight = nn.Parameter(torch.ones(100, 4))
    x = torch.ones(4)

    def measure(parameters):
        weight.grad = torch.zeros_like(weight)  # backward adds a fresh gradient into it
        return measure_activation_memory(lambda: (weight @ x).sum(), parameters=parameters)

    assert measure(weight) == measure([weight])
    assert measure(weight).peak < measure([]).peak  # the fresh gradient is left out


# ----------------------------------------------------------------------------- _interception.py
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


# ----------------------------------------------------------------------------- _window.py
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_default_device_does_not_reach_the_windows_loss(dtype):
    # Internal tensors name their device: a default device set by the user (here the meta
    # device, where no tensor holds data) must not pull the window's loss weights (or the
    # gradient check's buffers) onto it.
    model = make_model(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(2, 4, dtype)
    losses = [mse(model, batch).item() for batch in batches]
    with Accumulator(model, optimizer, 2) as acc, torch.device("meta"):
        for index, batch in enumerate(batches):
            acc.backward(mse(model, batch), weight=index + 1)
            optimizer.step()
        loss = acc.loss  # computed here, under the default device
    torch.testing.assert_close(loss, (losses[0] + 2 * losses[1]) / 3, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- microbatch.py
def test_a_replayed_batch_restores_the_cuda_random_state_when_cuda_is_in_use(monkeypatch):
    # CI has no GPU: a stand-in CUDA RNG shows that its state is saved before a batch and
    # put back before the batch is replayed in smaller micro-batches.
    states = {"cuda": [torch.tensor([1])]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states["cuda"]))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: states.update(cuda=new))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, micro_batch_size="auto")

    def compute_loss(micro):
        if micro[0].shape[0] > 2:
            states["cuda"] = [torch.tensor([99])]  # the failed attempt drew random numbers
            raise torch.OutOfMemoryError("injected")
        return mse(model, micro)

    with acc:
        acc.step_batch(make_batches(1, 8)[0], compute_loss)
    assert acc.micro_batch_size == 2
    assert [t.item() for t in states["cuda"]] == [1]


# ----------------------------------------------------------------------------- _boundary.py
def test_a_non_finite_window_with_max_grad_norm_is_skipped():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    batches = make_batches(2, 4)
    with Accumulator(model, optimizer, 2, max_grad_norm=1.0) as acc:
        acc.backward(mse(model, batches[0]))
        acc.backward(mse(model, batches[1]) * float("inf"))
        optimizer.step()
    assert (acc.optimizer_steps, acc.skipped_steps) == (0, 1)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_max_grad_norm_with_no_gradient_in_the_optimizer_steps_nothing():
    # The optimizer holds a head the loss does not reach: nothing to clip, nothing changes.
    model, head = make_model(), nn.Linear(3, 3).double()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    before = [p.detach().clone() for p in head.parameters()]
    with Accumulator(model, optimizer, 1, max_grad_norm=1.0) as acc:
        acc.backward(mse(model, make_batches(1, 4)[0]))
        optimizer.step()
    assert acc.optimizer_steps == 1
    for p, b in zip(head.parameters(), before, strict=True):
        assert torch.equal(p, b)


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


def test_an_empty_parameter_group_is_fine():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.add_param_group({"params": []})
    with Accumulator(model, optimizer, 2) as acc:
        for batch in make_batches(2, 4):
            acc.backward(mse(model, batch))
            optimizer.step()
    assert acc.optimizer_steps == 1


def test_the_default_dtype_does_not_reach_the_gradient_check():
    # float32 gradients are scaled by a float32 factor (the kernel's), whatever the default.
    def trained(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Accumulator(model, optimizer, 2) as acc:
            for weight, batch in enumerate(make_batches(2, 4, torch.float32), start=1):
                acc.backward(mse(model, batch), weight=weight)
                optimizer.step()
        return [p.detach() for p in model.parameters()]

    expected = trained(make_model(torch.float32))
    model = make_model(torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = trained(model)
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_element_losses_of_several_shapes_mix_in_a_window():
    # Losses of shape (1,) and (1, 1) between scalar ones: the same update as all scalars.
    def trained(shaped):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Accumulator(model, optimizer, 4) as acc:
            for index, batch in enumerate(make_batches(4, 4)):
                loss = mse(model, batch)
                shape = [(), (1,), (1, 1), (1,)][index] if shaped else ()
                acc_loss = loss.reshape(shape)
                acc.backward(acc_loss)
                optimizer.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(trained(True), trained(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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


def test_skipped_windows_are_counted_and_named_by_their_step():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(3, 4)
    with Accumulator(model, optimizer, 1) as acc, pytest.warns(RuntimeWarning) as warned:
        acc.backward(mse(model, batches[0]))  # step 1 is applied
        optimizer.step()
        for batch in batches[1:]:  # steps 2 and 3 are skipped
            acc.backward(mse(model, batch) * float("inf"))
            optimizer.step()
    assert (acc.optimizer_steps, acc.skipped_steps) == (1, 2)
    assert [str(w.message)[-24:] for w in warned] == [
        "optimizer step 2 skipped",
        "optimizer step 2 skipped",  # the count of applied steps has not moved
    ]


def test_a_micro_batch_weighing_twice_the_mean_of_its_window():
    # K=2, weights 1 and 4: the second loss is scaled by 4 / 2 = 2 in backward.
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(2, 4)
    with Accumulator(model, optimizer, 2) as acc:
        for weight, batch in zip((1, 4), batches, strict=True):
            acc.backward(mse(model, batch), weight=weight)
            optimizer.step()
    ((mse(reference, batches[0]) + 4 * mse(reference, batches[1])) / 5).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_a_parameter_group_added_in_the_middle_of_a_window():
    model, head = make_model(), nn.Linear(3, 3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(2, 4)
    with Accumulator(model, optimizer, 2) as acc:
        acc.backward(mse(model, batches[0]))
        optimizer.add_param_group({"params": head.parameters()})
        acc.backward(nn.functional.mse_loss(head(model(batches[1][0])), batches[1][1]))
        optimizer.step()
    assert acc.optimizer_steps == 1


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


def test_a_step_closure_is_refused_naming_the_optimizer_class():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        Accumulator(model, optimizer, 2) as acc,
        pytest.raises(TypeError, match=r"call SGD\.step\(\) without a closure"),
    ):
        acc.backward(mse(model, make_batches(1, 4)[0]))
        optimizer.step(lambda: None)


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


# ----------------------------------------------------------------------------- construction
def test_micro_batches_of_one_sample_train_like_the_full_batch():
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batches(1, 3)[0]
    with Accumulator(model, optimizer, micro_batch_size=1) as acc:
        acc.step_batch(batch, lambda micro: mse(model, micro))
    mse(reference, batch).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "argument", ["micro_batch_size", "total_micro_batches", "probe_up_after", "memory_budget"]
)
def test_counts_refuse_booleans(argument):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = {"micro_batch_size": "auto"} if argument in ("probe_up_after", "memory_budget") else {}
    with pytest.raises(ValueError, match=rf"{argument} must be .*got True \(bool\)"):
        Accumulator(model, optimizer, **extra, **{argument: True})


def test_defaults_and_attributes_of_a_new_accumulator():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    acc = Accumulator(model, optimizer, scheduler=scheduler)
    assert (acc.accumulation_steps, acc.scheduler, acc.loss) == (1, scheduler, None)
    with pytest.raises(TypeError, match=r"sync_each_micro_batch must be True or False"):
        Accumulator(model, optimizer, sync_each_micro_batch="yes")


def test_sizing_arguments_without_auto_are_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"max_micro_batch_size"):
        Accumulator(model, optimizer, micro_batch_size=4, max_micro_batch_size=8)
