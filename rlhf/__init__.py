"""Config-driven InstructGPT-style RLHF: SFT, reward model and PPO on DeepSpeed, composed with Hydra."""

from rlhf.config import compose

__all__ = ["compose"]
