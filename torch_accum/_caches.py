"""Key/value caches and recomputation: what a checkpointed block must not do twice.

A Hugging Face style model keeps ``config.use_cache = True`` by default and, in a training
forward, builds a KV cache that each decoder layer appends to. A checkpointed layer runs its
forward a second time in backward and appends again: the returned cache doubles, and a
padding mask built for the first length no longer matches the second ("size of tensor a (32)
must match the size of tensor b (16)"). Transformers' own ``gradient_checkpointing_enable``
switches the cache off; so do we, duck-typed (no transformers import): every ``config`` of the
model's modules with ``use_cache`` True gets False for the ``with`` block, restored after it,
and a block that still receives an empty cache object or ``use_cache=True`` (passed by hand)
runs without them. A cache that already holds tokens cannot be dropped without changing the
result, so that raises an error naming the ways out.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

#: Keyword arguments under which Hugging Face layers receive the cache they append to
#: (transformers 5 names it ``cache``).
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


class CacheSwitch:
    """Turns ``config.use_cache`` off on a model's configs and puts the values back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._switched: list[tuple[str, Any]] = []

    def switch_off(self) -> None:
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            config = getattr(module, "config", None)
            if config is None or id(config) in seen:
                continue
            seen.add(id(config))
            if getattr(config, "use_cache", None) is True:
                config.use_cache = False
                self._switched.append((f"{name}.config" if name else "config", config))
        if self._switched:
            logger.info(
                "checkpointing: set use_cache=False on %s for the `with` block (a KV cache "
                "filled in a training forward would be filled again by the recomputation)",
                ", ".join(name for name, _ in self._switched),
            )

    def restore(self) -> None:
        while self._switched:
            _, config = self._switched.pop()
            config.use_cache = True


def without_caches(block_name: str, kwargs: dict[str, Any], *, log: bool) -> dict[str, Any]:
    """``kwargs`` with empty caches dropped and ``use_cache`` off; a filled cache raises.

    Returns ``kwargs`` itself when there is nothing to change; ``log`` says it at INFO.
    """
    dropped = [key for key in CACHE_ARGUMENTS if _is_kv_cache(key, kwargs.get(key))]
    if not dropped and kwargs.get("use_cache") is not True:
        return kwargs
    for key in dropped:
        length = _cached_tokens(kwargs[key])
        if length != 0:
            held = "tokens" if length is None else f"{length} tokens"
            raise ValueError(
                f"checkpointed block {block_name} received {key}= a cache that already holds "
                f"{held} in a training forward: the recomputation in backward would append "
                "to it again. Train without a cache (use_cache=False, no past_key_values), "
                "run this call under torch.no_grad() or model.eval(), or leave this block "
                "out of checkpointing (checkpointing=False or a policy that excludes it)"
            )
    cleaned = dict(kwargs)
    for key in dropped:
        cleaned[key] = None
    if "use_cache" in cleaned:
        cleaned["use_cache"] = False
    if log:
        logger.info(
            "checkpointing: %s runs with use_cache=False%s in training (the recomputation in "
            "backward would fill the cache a second time)",
            block_name,
            "".join(f", {key}=None" for key in dropped),
        )
    return cleaned


def _is_kv_cache(key: str, value: object) -> bool:
    # A name as generic as ``cache`` may be a block's own (a rotary table, say): it counts
    # as a KV cache only when the object can say its length, as transformers' caches do.
    if value is None:
        return False
    return key != "cache" or callable(getattr(value, "get_seq_length", None))


def _cached_tokens(cache: object) -> int | None:
    """Tokens a cache object holds (0 for an empty one), or None if it cannot say."""
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        try:
            return int(length())
        except Exception:  # a cache type whose length needs arguments we do not know
            return None
    return None
