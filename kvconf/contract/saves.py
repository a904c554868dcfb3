"""Saves planned when a request's blocks are allocated and sent once the engine has computed them.

vLLM tells a connector's scheduler side a request's blocks once, when it is first scheduled
(``update_state_after_alloc``); a long prompt is then computed over several steps (chunked
prefill), and its later blocks arrive with later steps. A block may be saved only after the step
that computes it, so a connector plans the saves at allocation and takes, at each step's
``build_connector_meta``, those the step completes. kvconf's own engine computes every block a
request is given in its first step and says nothing of computed tokens: then everything planned is
ready at once.

>>> plans = SavePlans()
>>> plans.plan("r", [(0, b"a"), (1, b"b"), (2, b"c")], ([10, 11],))
>>> [(rid, todo) for rid, todo, _ in plans.ready(SchedulerOutput(["r"], num_computed_tokens={"r": 40}), 1, 16)]
[('r', [(0, b'a'), (1, b'b')])]
>>> out = SchedulerOutput(["r"], num_computed_tokens={"r": 64}, new_block_ids={"r": ([12],)})
>>> [(rid, todo, groups[0][todo[0][0]]) for rid, todo, groups in plans.ready(out, 1, 16)]
[('r', [(2, b'c')], 12)]
>>> len(plans)
0
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .api import SchedulerOutput

__all__ = ["SavePlans"]


@dataclass
class _Plan:
    todo: list[tuple[int, bytes]]
    """(item index, key) still to save, in order."""
    groups: tuple[list[int], ...]
    """The request's block ids so far, per KV-cache group."""


class SavePlans:
    """Per request, the items (blocks or chunks of blocks) still to save."""

    def __init__(self) -> None:
        self._plans: dict[str, _Plan] = {}

    def plan(self, request_id: str, todo: list[tuple[int, bytes]], groups: tuple[list[int], ...]) -> None:
        """Plans ``todo`` ((item index, key), in order) for the request, whose blocks so far are
        ``groups``; replaces an earlier plan (a preempted request is allocated anew)."""
        if todo:
            self._plans[request_id] = _Plan(list(todo), tuple(list(g) for g in groups))
        else:
            self._plans.pop(request_id, None)

    def ready(self, step: SchedulerOutput, item_blocks: int,
              item_tokens: int) -> Iterator[tuple[str, list[tuple[int, bytes]], tuple[list[int], ...]]]:
        """For each request with items that this step completes: its id, those items and its block
        ids. An item of ``item_blocks`` blocks and ``item_tokens`` tokens is complete when its
        blocks are allocated and the step's ``num_computed_tokens`` covers it (every allocated
        item where the engine does not say)."""
        computed = step.num_computed_tokens
        for rid, ids in step.new_block_ids.items():
            plan = self._plans.get(rid)
            if plan is not None:
                for have, more in zip(plan.groups, ids):
                    have.extend(more)
        for rid in list(self._plans):
            plan = self._plans[rid]
            limit = None if computed is None else computed.get(rid)
            if computed is not None and limit is None:
                continue  # not scheduled this step
            n = 0
            while (n < len(plan.todo) and len(plan.groups[0]) >= (plan.todo[n][0] + 1) * item_blocks
                   and (limit is None or (plan.todo[n][0] + 1) * item_tokens <= limit)):
                n += 1
            ready, plan.todo = plan.todo[:n], plan.todo[n:]
            if computed is None or not plan.todo:
                del self._plans[rid]  # an engine that does not say: the blocks it gave are all there is
            if ready:
                yield rid, ready, plan.groups

    def drop(self, request_id: str) -> None:
        """The request ended: what is not saved yet never will be."""
        self._plans.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._plans)
