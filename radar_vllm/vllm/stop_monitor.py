"""Ending a batched draft loop once every request has stopped, without blocking the device.

On CPU the check is a plain read. On CUDA, after each policy step the flag "some request is still
active" is copied to pinned host memory behind an event; before each draft call the loop reads
the newest flag whose event has completed (``Event.query()`` never blocks). A copy that has not
landed yet costs at most an extra, masked draft call; the drafted tokens do not depend on when the
loop notices. No vLLM import: usable and testable on its own.
"""
from __future__ import annotations

import torch


class AllStoppedMonitor:
    """Tells the draft loop when every request has stopped, without blocking the device."""

    def __init__(self, device: torch.device, max_depth: int) -> None:
        self.device = device
        self.use_events = device.type == "cuda"
        self.max_depth = max_depth
        if self.use_events:
            # [max_depth] host copies of "some request is still active" after each policy step
            self.host_flags = torch.ones(max_depth, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(max_depth)]
        self.num_recorded = 0
        self.any_active = True

    def begin_round(self) -> None:
        self.num_recorded = 0
        self.any_active = True

    def record(self, active: torch.Tensor) -> None:
        """After a policy step: ``active [batch]`` (bool, on the device)."""
        if self.use_events:
            slot = self.num_recorded
            self.host_flags[slot].copy_(active.any(), non_blocking=True)
            self.events[slot].record()
        else:
            self.any_active = bool(active.any())
        self.num_recorded += 1

    def all_stopped(self) -> bool:
        if not self.use_events:
            return not self.any_active
        # Flags only go from True to False within a round: the newest completed copy decides.
        for slot in range(self.num_recorded - 1, -1, -1):
            if self.events[slot].query():
                return not bool(self.host_flags[slot])
        return False
