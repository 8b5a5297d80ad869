"""The window's state machine and the boundary update, tested on their own, without a loop."""

import pytest
import torch
from helpers import TOLERANCES, make_batches, make_model, mse, parameters_of

from torch_accum._boundary import BoundaryUpdate
from torch_accum._window import _ALLOWED, InvalidTransitionError, Window, WindowState

TOL64 = TOLERANCES[torch.float64]
S = WindowState


def test_every_state_has_its_transitions_listed():
    assert set(_ALLOWED) == set(WindowState)
    assert all(not _ALLOWED[state] for state in (S.APPLIED, S.SKIPPED, S.DISCARDED))


@pytest.mark.parametrize(
    ("path", "refused", "message"),
    [
        ([], S.APPLIED, r"a window that is accumulating cannot become applied \(doing it\)"),
        ([S.COMPLETE, S.APPLYING, S.APPLIED], S.APPLYING, r"applied cannot become applying"),
        ([S.DISCARDED], S.COMPLETE, r"discarded cannot become complete"),
        ([S.COMPLETE, S.UNSCALED], S.COMPLETE, r"unscaled cannot become complete"),
    ],
)
def test_invalid_transitions_are_refused_with_what_was_done(path, refused, message):
    window = Window(4)
    for state in path:
        window.move_to(state)
    with pytest.raises(InvalidTransitionError, match=message):
        window.move_to(refused, "doing it")
    assert window.state is (path[-1] if path else S.ACCUMULATING)


def test_a_terminal_window_takes_no_micro_batch():
    window = Window(2)
    window.move_to(S.DISCARDED)
    with pytest.raises(InvalidTransitionError, match="a window that is discarded takes no"):
        window.add(1.0, torch.tensor(0.5))
    assert window.pending == 0


def complete_window(model, batches):
    """Gradients of the mean loss over ``batches``, as a closed window leaves them."""
    for batch in batches:
        (mse(model, batch) / len(batches)).backward()
    window = Window(len(batches))
    for batch in batches:
        window.add(1.0, mse(model, batch))
    window.move_to(S.COMPLETE)
    window.nonfinite = False
    return window


def test_apply_steps_every_optimizer_and_scheduler_once_with_clipping_over_all():
    batches = make_batches(2, 4)
    reference = make_model()
    ref_optimizers = [
        torch.optim.SGD(reference[0].parameters(), lr=0.1),
        torch.optim.Adam(reference[2].parameters(), lr=0.01),
    ]
    for batch in batches:
        (mse(reference, batch) / 2).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    for optimizer in ref_optimizers:
        optimizer.step()

    model = make_model()
    optimizers = [
        torch.optim.SGD(model[0].parameters(), lr=0.1),
        torch.optim.Adam(model[2].parameters(), lr=0.01),
    ]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in optimizers]
    boundary = BoundaryUpdate(model, optimizers, schedulers, max_grad_norm=0.05)
    window = complete_window(model, batches)
    boundary.apply(window)
    assert window.state is S.APPLIED
    assert [s.last_epoch for s in schedulers] == [1, 1]
    assert all(p.grad is not None for p in model.parameters())  # clearing is the loop's
    for got, expected in zip(parameters_of(model), parameters_of(reference), strict=True):
        torch.testing.assert_close(got, expected, **TOL64)


def test_a_nonfinite_window_is_skipped_or_discarded():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = parameters_of(model)
    window = complete_window(model, make_batches(1, 4))
    window.nonfinite = True
    with pytest.warns(RuntimeWarning, match="optimizer step 7 skipped"):
        BoundaryUpdate(model, [optimizer]).apply(window, step_number=7)
    assert window.state is S.SKIPPED

    window = complete_window(model, make_batches(1, 4))
    window.nonfinite = True
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        BoundaryUpdate(model, [optimizer], on_nonfinite="raise").apply(window)
    assert window.state is S.DISCARDED
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(parameters_of(model), before, rtol=0, atol=0)


def test_an_error_before_any_step_leaves_the_window_complete():
    class Refusing(torch.optim.SGD):
        def step(self, closure=None):
            raise ValueError("no")

    model = make_model()
    window = complete_window(model, make_batches(1, 4))
    with pytest.raises(ValueError, match="no"):
        BoundaryUpdate(model, [Refusing(model.parameters(), lr=0.1)]).apply(window)
    assert window.state is S.COMPLETE


def test_an_error_after_the_step_leaves_the_window_applied():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class Broken:
        def step(self):
            raise ValueError("scheduler broke")

    window = complete_window(model, make_batches(1, 4))
    before = parameters_of(model)
    with pytest.raises(ValueError, match="scheduler broke"):
        BoundaryUpdate(model, [optimizer], [Broken()]).apply(window)
    assert window.state is S.APPLIED
    assert any(not torch.equal(a, b) for a, b in zip(parameters_of(model), before, strict=True))


def test_the_scaled_path_unscales_once_and_skips_on_inf():
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    batches = make_batches(1, 4, dtype=torch.float32)
    scaler.scale(mse(model, batches[0])).backward()
    window = Window(1)
    window.add(1.0, mse(model, batches[0]))
    window.move_to(S.COMPLETE)
    grads_scaled = [p.grad.clone() for p in model.parameters()]
    BoundaryUpdate(model, [optimizer], scaler=scaler).apply(window)
    assert window.state is S.APPLIED and window.unscaled == {0}
    for p, scaled in zip(model.parameters(), grads_scaled, strict=True):
        torch.testing.assert_close(p.grad, scaled / 8.0, rtol=0, atol=0)

    optimizer.zero_grad()
    (mse(model, batches[0]) * float("inf")).backward()
    window = Window(1)
    window.add(1.0, torch.tensor(0.0))
    window.move_to(S.COMPLETE)
    BoundaryUpdate(model, [optimizer], scaler=scaler).apply(window)
    assert window.state is S.SKIPPED and scaler.get_scale() == 4.0
