"""Progress for long work: a step log with rates and ETA, and the small tables printed at the end of a stage."""

from __future__ import annotations

import logging
import time


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class StepLog:
    """Logs `name step/total | metrics | rates | ETA` every `interval` steps (rank 0 only)."""

    def __init__(self, name: str, total: int, interval: int, logger: logging.Logger, enabled: bool = True) -> None:
        self.name, self.total, self.interval, self.logger, self.enabled = (
            name,
            total,
            interval,
            logger,
            enabled,
        )
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def step(self, step: int, metrics: dict[str, float], tokens_per_s: float, step_s: float) -> None:
        """Record the end of 1-based optimizer step `step`."""
        if self.first_step is None:  # the clock starts with this step, not with the evaluation before it
            self.first_step = step - 1
            self.started = time.perf_counter() - step_s
        if not self.enabled or (step % self.interval and step != self.total):
            return
        done = step - self.first_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        shown = " | ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())
        self.logger.info(
            "%s step %d/%d | %s | %.0f tok/s | %.2f s/step | elapsed %s | ETA %s",
            self.name,
            step,
            self.total,
            shown,
            tokens_per_s,
            step_s,
            format_seconds(elapsed),
            format_seconds(eta),
        )


def markdown_table(rows: list[dict[str, object]]) -> str:
    """A markdown table of `rows` (same keys in each); floats shown with 4 significant digits."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def loss_figures(history: list[float], samples: int, train_s: float, tokens: int) -> dict:
    """The summary figures every trainer reports: throughput and the loss at the start and the end (the means of
    up to five steps at each end, so one noisy step does not decide)."""
    nan = float("nan")
    window = max(1, min(5, len(history) // 4))
    return {
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s if train_s else 0.0,
        "tokens_per_s": tokens / train_s if train_s else 0.0,
        "first_loss": history[0] if history else nan,
        "last_loss": history[-1] if history else nan,
        "first_loss_mean": sum(history[:window]) / window if history else nan,
        "last_loss_mean": sum(history[-window:]) / window if history else nan,
    }


def describe_plan(stage: str, unit: str, train: int, evaluation: int, model, lora_modules: int, cfg) -> str:
    """One line on what a trainer is about to do: data, parameters, steps and how a step splits over ranks."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = cfg.hardware.nodes * cfg.hardware.procs_per_node
    micro = cfg.hardware.micro_batch
    accum = cfg.stage.global_batch // (world * micro)
    return (
        f"{stage}: {train} train / {evaluation} eval {unit}, {params:,} params ({trainable:,} trainable, "
        f"{lora_modules} LoRA modules), steps of {cfg.stage.global_batch} {unit} ({world} x {accum} micro-batches "
        f"of {micro}), world size {world}"
    )


def eval_due(step: int, total_steps: int, interval: int, checkpoints) -> bool:
    """Whether a stage evaluates after `step`: every `interval` steps and at the last, but not when stopping early
    for a signal (`checkpoints`, a Checkpointer or None, knows)."""
    stopping = checkpoints is not None and checkpoints.stop_requested()
    return step == total_steps or (step % interval == 0 and not stopping)
