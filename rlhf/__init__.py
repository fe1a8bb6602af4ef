"""Config-driven InstructGPT-style RLHF: SFT, reward model and PPO on DeepSpeed, composed with Hydra."""

from rlhf.compose import compose

__all__ = ["PPOTrainer", "PPOModels", "compose"]


def __getattr__(name: str):
    """The PPO API on first use, so `import rlhf` stays light for the command line."""
    if name == "PPOTrainer":
        from rlhf.stages.ppo import PPOTrainer

        return PPOTrainer
    if name == "PPOModels":
        from rlhf.stages.ppo_models import PPOModels

        return PPOModels
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
