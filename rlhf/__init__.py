"""Config-driven InstructGPT-style RLHF: SFT, reward model and PPO on DeepSpeed, composed with Hydra."""

from rlhf.compose import compose

__all__ = ["PPOTrainer", "RLHFEngine", "compose"]


def __getattr__(name: str):
    """The PPO API on first use, so `import rlhf` stays light for the command line."""
    if name in ("PPOTrainer", "RLHFEngine"):
        from rlhf.stages import ppo

        return getattr(ppo, name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
