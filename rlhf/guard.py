"""Guards against non-finite values: an optimizer step whose loss is not finite on some rank is skipped and counted,
and too many skipped in a row stop the run before it trains on garbage."""

from __future__ import annotations

import torch

from rlhf import dist


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or reward."""


def all_finite(*values: torch.Tensor) -> bool:
    """Whether every value is finite on every rank (all ranks must call it at the same point)."""
    bad = any(not bool(torch.isfinite(v.detach()).all()) for v in values)
    return dist.all_reduce_max([float(bad)])[0] == 0.0


def plain_optimizer(engine) -> bool:
    """ZeRO-0 in fp32 steps a torch optimizer directly, which would apply non-finite gradients; DeepSpeed's ZeRO and
    bf16/fp16 optimizers skip such a step themselves (counted in `engine.skipped_steps`)."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


class StepGuard:
    """Backward and step through DeepSpeed, skipping every optimizer step that saw a non-finite loss: its gradients
    are made non-finite so DeepSpeed's optimizers skip it, and a plain optimizer has them dropped. `end_step` counts
    a trainer step with any skipped update and raises NonFiniteError after `max_in_a_row` in a row."""

    def __init__(self, stage: str, max_in_a_row: int) -> None:
        self.stage, self.max_in_a_row = stage, max_in_a_row
        self.skipped = 0
        self.in_a_row = 0
        self._bad_updates: set[int] = set()  # engines (by id) whose optimizer step being accumulated saw a bad loss
        self._bad_step = False  # the trainer step (one or more updates) had a skipped update

    def backward_step(self, engine, loss: torch.Tensor) -> bool:
        """`engine.backward(loss)` then `engine.step()`, skipping the update if any loss in it was non-finite;
        returns whether this loss was finite on every rank."""
        finite = all_finite(loss)
        if not finite:
            self._bad_updates.add(id(engine))
        engine.backward(loss if finite else loss * float("nan"))
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return finite
        bad_update = id(engine) in self._bad_updates  # PPO's actor and critic accumulate apart
        self._bad_updates.discard(id(engine))
        skip_plain = bad_update and plain_optimizer(engine)
        self._bad_step |= bad_update
        if not skip_plain:
            engine.step()
            return finite
        # a torch optimizer skips parameters without gradients; DeepSpeed's clipping needs some, so it is off here
        for param in engine.module.parameters():
            param.grad = None
        clipping, engine._config.gradient_clipping = engine._config.gradient_clipping, 0.0
        try:
            engine.step()
        finally:
            engine._config.gradient_clipping = clipping
        return finite

    def skip_step(self) -> None:
        """Mark the current trainer step as skipped without training (e.g. a non-finite reward)."""
        self._bad_step = True

    def end_step(self, step: int) -> bool:
        """Close trainer step `step`; returns whether it was skipped."""
        skipped, self._bad_step = self._bad_step, False
        if not skipped:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.stage}: {self.in_a_row} steps in a row (to step {step}) had a non-finite loss or reward and "
                f"were skipped (checkpoint.max_skipped_in_a_row={self.max_in_a_row}); the last checkpoint is kept. "
                "Lower the learning rate or check the data, then resume"
            )
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]
