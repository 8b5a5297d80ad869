"""Instance-level method patches that are always undone.

The Accumulator changes what ``optimizer.step`` and friends do while its ``with`` block
runs. It does so by shadowing the bound method with an attribute on the *instance*, so
the class (and every other optimizer) is untouched, and restoring exactly what was there
before: a previous instance attribute (LR schedulers install one on ``optimizer.step``)
or nothing at all.

The replacement is itself a bound method of the instance, as the original was: an LR
scheduler created inside the block wraps ``optimizer.step.__func__``, and pickling or
deep-copying the instance (``torch.save(model)``) handles bound methods by name.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

_ABSENT = object()

#: Attribute set on every replacement function, naming the object that installed it.
OWNER_ATTRIBUTE = "_torch_accum_owner"


def patch_owner(method: object) -> object | None:
    """Return the object that patched ``method``, or None if it is not one of ours."""
    return getattr(method, OWNER_ATTRIBUTE, None)


class MethodPatches:
    """A stack of instance attribute replacements, undone in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def replace(
        self,
        target: object,
        name: str,
        handler: Callable[..., Any],
        owner: object,
        *,
        pass_self: bool = False,
    ) -> Callable[..., Any]:
        """Route calls of ``target.name`` to ``handler``; return the original callable.

        With ``pass_self`` the handler also receives the instance the method is bound to,
        which differs from ``target`` in a deep copy of it.
        """
        original: Callable[..., Any] = getattr(target, name)

        # A fresh function per patch, so it can carry the owner tag. wraps() copies the
        # original's attributes: LR schedulers look for theirs on optimizer.step and warn
        # when it is missing.
        @functools.wraps(original)
        def patched(bound_to: object, *args: Any, **kwargs: Any) -> Any:
            if pass_self:
                return handler(bound_to, *args, **kwargs)
            return handler(*args, **kwargs)

        setattr(patched, OWNER_ATTRIBUTE, owner)
        self._saved.append((target, name, vars(target).get(name, _ABSENT)))
        setattr(target, name, types.MethodType(patched, target))
        return original

    def scrub(self, target: object, attributes: dict[str, Any]) -> dict[str, Any]:
        """Undo, in a copy of ``target.__dict__``-like ``attributes``, the patches on ``target``.

        Objects whose ``state_dict()`` copies their ``__dict__`` (LR schedulers) would
        otherwise save the patched functions, which neither pickle nor belong in a checkpoint.
        """
        cleaned = dict(attributes)
        for patched_target, name, previous in self._saved:
            if patched_target is target:
                if previous is _ABSENT:
                    cleaned.pop(name, None)
                else:
                    cleaned[name] = previous
        return cleaned

    def restore(self) -> None:
        """Put back everything replaced, newest first; safe to call more than once."""
        while self._saved:
            target, name, previous = self._saved.pop()
            if previous is _ABSENT:
                delattr(target, name)
            else:
                setattr(target, name, previous)
