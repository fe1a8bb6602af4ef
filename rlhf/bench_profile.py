"""`rlhf-bench --profile`: one more iteration after the timed ones, under torch's profiler, split by phase (the
rollout: generation and the experience passes; training) and, within each, by operator (self time)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.profiler import ProfilerActivity, profile

from rlhf.progress import markdown_table


class PhaseProfile:
    """Operator tables of the phases profiled so far, in the order they ran."""

    def __init__(self, top: int = 15) -> None:
        self.top = top
        self.phases: list[tuple[str, float, list[dict]]] = []  # (phase, seconds, operator rows)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Profile the code inside as phase `name` (CPU operators, self time)."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        events = prof.key_averages()
        total_us = sum(e.self_cpu_time_total for e in events)
        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        rows = [
            {
                "operator": e.key,
                "calls": e.count,
                "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                "share": round(e.self_cpu_time_total / total_us, 3) if total_us else 0.0,
            }
            for e in ranked[: self.top]
        ]
        self.phases.append((name, total_us / 1e6, rows))

    def markdown(self) -> str:
        """Each phase's profiled seconds and its top operators by self time, as markdown."""
        parts = []
        for name, seconds, rows in self.phases:
            parts.append(f"### {name}: {seconds:.2f} s of operator self time\n\n{markdown_table(rows)}\n")
        return "\n".join(parts)
