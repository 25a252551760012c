"""How progress is made: who polls the completion queues, and when they sleep."""

from __future__ import annotations

from dataclasses import dataclass

from ..transport.contract import PolicyNs


@dataclass(frozen=True, slots=True)
class ProgressPolicy:
    """Progress policy of an engine.

    The engine's native progress thread polls the completion queues. After the
    last completion it keeps polling for ``spin_us``, then blocks on the CQ wait
    objects for at most ``busy_block_us`` while transfers are in flight and
    ``idle_block_us`` otherwise (the timeout bounds the latency of providers
    whose target must progress, such as shm). A coroutine that awaits a
    transfer or counter first polls from its own thread for ``wait_spin_us``
    (the progress thread stands aside meanwhile), which saves an event-loop
    wake-up when the answer is microseconds away. ``wait_spin_us=0`` never
    holds the event loop.
    """

    spin_us: float = 50.0
    idle_block_us: float = 1000.0
    busy_block_us: float = 50.0
    wait_spin_us: float = 20.0
    py_hold_us: float = 50.0
    trigger_spin_us: float = 1000.0
    """Armed triggers: the watcher polls their flags without pause this long after an
    arm or a fire (``float("inf")``: always, a core while armed), then every
    ``trigger_nap_us`` (docs/gpu.md, "Triggers")."""
    trigger_nap_us: float = 20.0

    @classmethod
    def latency(cls) -> ProgressPolicy:
        """Lowest latency: long spins on both sides. Costs a core per engine while busy."""
        return cls(spin_us=1000.0, idle_block_us=200.0, busy_block_us=10.0, wait_spin_us=200.0)

    @classmethod
    def low_cpu(cls) -> ProgressPolicy:
        """Least CPU: no spinning, block at once. Adds wake-up latency to each transfer."""
        return cls(spin_us=0.0, idle_block_us=5000.0, busy_block_us=200.0, wait_spin_us=0.0)

    def __post_init__(self) -> None:
        names = ("spin_us", "idle_block_us", "busy_block_us", "wait_spin_us", "py_hold_us",
                 "trigger_spin_us", "trigger_nap_us")  # fmt: skip
        for name in names:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"ProgressPolicy.{name} must be a number >= 0, got {v!r}")
        if self.idle_block_us == 0 or self.busy_block_us == 0 or self.trigger_nap_us == 0:
            raise ValueError(
                "ProgressPolicy block times must be > 0 (they bound sleeping, not spinning)"
            )

    def to_ns(self) -> PolicyNs:
        """The policy in nanoseconds, as handed to a transport."""
        return PolicyNs(
            int(self.spin_us * 1e3),
            int(self.idle_block_us * 1e3),
            int(self.busy_block_us * 1e3),
            py_hold_ns=int(self.py_hold_us * 1e3),
        )
