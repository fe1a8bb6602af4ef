"""PPO: the pure math (`functional`) behind the PPO stage trainer."""
