"""PPO's four models, each a DeepSpeed engine: the actor and critic that train, the frozen reference and reward
model, with sampling and the reward, and the log-prob passes PPO's experience and update use."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from transformers import AutoTokenizer

from rlhf import dist, engine, models, rewards, rollout
from rlhf.config import cache_dir
from rlhf.data.tokenize import PromptFormat, response_batch
from rlhf.ppo import functional as ppo_math

log = logging.getLogger(__name__)

RewardFn = Callable[[list, list[str]], list[float]]  # (prompts as written, responses) -> scores, from Python


class PPOModels:
    """The four models of PPO, each a DeepSpeed engine (rlhf.engine): the actor and critic train, the reference and
    reward model only run forward. The reward is `stage.reward_funcs` (rlhf.rewards); `reward_fn`, a function of
    (prompts, responses) from Python, replaces them."""

    def __init__(self, cfg: DictConfig, total_steps: int | None = None, reward_fn: RewardFn | None = None) -> None:
        stage, root = cfg.stage, cache_dir(cfg)
        if total_steps is None:
            if stage.max_steps <= 0:
                raise ValueError("PPOModels needs total_steps or stage.max_steps > 0 for its LR schedules")
            total_steps = stage.max_steps
        if reward_fn is not None:
            self.reward_funcs = [rewards.RewardFunction("reward_fn", 1.0, lambda p, c, **_: reward_fn(p, c))]
        else:
            self.reward_funcs = rewards.load(stage.reward_funcs, stage.reward_weights)
        uses_model = any(r.fn is None for r in self.reward_funcs)
        if uses_model and not stage.reward_from:
            raise models.ModelError(
                "stage=ppo needs a reward model: stage.reward_from=<run>/reward/final (stage.reward_funcs names "
                "`model`; a reward function alone needs none, e.g. stage.reward_funcs=[rlhf.data.builtin:gold_reward])"
            )
        self.cfg = cfg
        if not dist.is_initialized():  # used from Python rather than through `rlhf`
            dist.configure_process(cfg, 1)
            dist.init(dist.backend(cfg))
        self.tokenizer = models.load_tokenizer(cfg.model, root)
        self.actor_zero = engine.zero_stage_of(cfg, stage.actor_zero_stage)
        critic_zero = engine.zero_stage_of(cfg, stage.critic_zero_stage)
        started = time.perf_counter()
        optimizer_steps = total_steps * stage.ppo_epochs * stage.mini_batches
        accumulation = engine.ppo_accumulation(cfg)

        actor = models.load_causal_lm(cfg.model, self.tokenizer, cfg.seed, stage.init_from, root)
        if stage.disable_dropout:
            models.disable_dropout(actor)
        reference = copy.deepcopy(actor) if stage.kl_coef > 0 else None  # no KL penalty: no reference to hold
        self.lora_modules = models.prepare_for_training(actor, cfg.model)
        self.actor = engine.initialize(
            actor,
            cfg,
            optimizer_steps,
            lr=cfg.optimizer.actor_lr,
            zero_stage=self.actor_zero,
            accumulation=accumulation,
        )
        self.reference = engine.initialize_frozen(reference, cfg, self.actor_zero) if reference is not None else None
        self.generation_model = rollout.GenerationModel(self.actor.module, self.actor_zero)

        self.reward_model, self.reward_tokenizer, self.reward_stats = None, self.tokenizer, {"mean": 0.0, "std": 1.0}
        if uses_model:
            reward = models.load_reward_model(stage.reward_from, "stage.reward_from")
            if stage.disable_dropout:
                models.disable_dropout(reward)
            self.reward_model = engine.initialize_frozen(reward, cfg, cfg.hardware.zero_stage)
            self.reward_tokenizer = load_saved_tokenizer(stage.reward_from)
            self.reward_stats = models.reward_stats(stage.reward_from)
        self.critic = None  # the group estimators' baseline is the prompt's other samples: no critic
        if stage.advantage == "gae":
            critic = self._build_critic()
            self.critic = engine.initialize(
                critic,
                cfg,
                optimizer_steps,
                lr=cfg.optimizer.critic_lr,
                zero_stage=critic_zero,
                accumulation=accumulation,
            )
        log.info(
            "ppo engines ready in %.1f s: actor ZeRO-%d (%d LoRA modules), %s, %s, reward %s",
            time.perf_counter() - started,
            self.actor_zero,
            self.lora_modules,
            "reference" if self.reference is not None else "no reference (kl_coef 0)",
            f"critic ZeRO-{critic_zero}" if self.critic else f"no critic ({stage.advantage})",
            ", ".join(f"{r.name} x {r.weight:g}" for r in self.reward_funcs),
        )

    def _build_critic(self) -> models.RewardModel:
        """The critic: the reward model (or `stage.critic_from`) on the normalised scores' scale, else a fresh
        head on the reward_model backbone."""
        cfg, stage = self.cfg, self.cfg.stage
        critic_source = stage.critic_from or stage.reward_from
        if critic_source:
            critic_vocab = (
                self.reward_tokenizer
                if critic_source == stage.reward_from and self.reward_model is not None
                else load_saved_tokenizer(critic_source)
            ).get_vocab()
            key = "stage.critic_from" if stage.critic_from else "stage.reward_from"
            if critic_vocab != self.tokenizer.get_vocab():
                raise models.ModelError(
                    f"{key}={critic_source} (the critic's start) uses another tokenizer than the actor, and the "
                    "critic reads the actor's token ids: set stage.critic_from to a model with the actor's tokenizer"
                )
            critic = models.load_reward_model(critic_source, key)
            if stage.normalize_reward and self.reward_model is not None:  # on the scale of the scores it predicts
                critic_stats = self.reward_stats if critic_source == stage.reward_from else None
                critic_stats = critic_stats or models.reward_stats(critic_source)
                critic.normalize_output(critic_stats["mean"], critic_stats["std"])
        else:  # a reward function and no reward model: a fresh head on the reward_model backbone
            lm = models.load_causal_lm(cfg.reward_model, self.tokenizer, cfg.seed, "", cache_dir(cfg))
            critic = models.reward_model_from_lm(lm)
        if stage.disable_dropout:
            models.disable_dropout(critic)
        models.prepare_for_training(critic, cfg.reward_model)
        return critic

    def generation_mode(self):
        """The actor to generate with (see rollout.GenerationModel): eval mode, LoRA folded in, gathered under
        ZeRO-3 into a plain copy once per call."""
        return self.generation_model()

    def eval_mode(self) -> None:
        """Actor and critic without dropout: experience and evaluation must see the policy PPO compares against."""
        for model in (self.actor, self.critic):
            if model is not None:
                model.module.eval()

    def train_mode(self) -> None:
        for model in (self.actor, self.critic):
            if model is not None:
                model.module.train()

    @torch.no_grad()
    def generate(self, prompts: dict[str, torch.Tensor], greedy: bool = False) -> rollout.Rollout:
        """Prompt + response ids; responses stop at EOS (padded after it) or at max_new_tokens. `stage.rollout`
        picks the sampler of rlhf.rollout (`engine`, the default, which also gives the sampled tokens' log-probs) or
        `transformers.generate` (`generate`, no log-probs)."""
        stage = self.cfg.stage
        input_ids = prompts["input_ids"].to(self.actor.device)
        attention_mask = prompts["attention_mask"].to(self.actor.device)
        with self.generation_mode() as model:
            if stage.rollout == "engine":
                return rollout.generate(
                    model,
                    input_ids,
                    attention_mask,
                    stage.max_new_tokens,
                    self.tokenizer.eos_token_id,
                    self.tokenizer.pad_token_id,
                    temperature=0.0 if greedy else stage.temperature,
                    top_p=stage.top_p,
                    min_new_tokens=0 if stage.stop_at_eos else stage.max_new_tokens,
                )
            sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": stage.temperature}
            if not greedy:
                sampling |= {"top_p": stage.top_p, "top_k": 0}
            if not stage.stop_at_eos:
                sampling["min_new_tokens"] = stage.max_new_tokens
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=stage.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                **sampling,
            )
            return rollout.Rollout(sequences, None)

    def reward(
        self,
        prompts: list,
        responses: list[str],
        columns: dict[str, list] | None = None,
        sequences: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward of each response, the weighted sum of the reward functions (the reward model's score
        normalised with its saved statistics under `stage.normalize_reward`), and each function's own values by its
        key (nan where it returned None). `columns`: the data rows' other fields, by name, for the functions."""
        parts = {
            r.key: self._reward_model_scores(prompts, responses, sequences, mask)
            if r.fn is None
            else rewards.call(r, prompts, responses, columns or {})
            for r in self.reward_funcs
        }
        weighted = dict(parts)
        if rewards.MODEL in parts and self.cfg.stage.normalize_reward:
            mean, std = self.reward_stats["mean"], max(self.reward_stats["std"], 1e-8)
            weighted[rewards.MODEL] = (parts[rewards.MODEL] - mean) / std
        return rewards.combine(self.reward_funcs, weighted, prompts), parts

    def _reward_model_scores(
        self, prompts: list, responses: list[str], sequences: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The reward model's raw score: on these token ids (shared tokenizer), or on the texts tokenised with the
        reward model's tokenizer (without `sequences`)."""
        if sequences is not None and self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab():
            device = self.reward_model.device
            return self.reward_model(sequences.to(device), mask.to(device)).float().cpu()
        fmt = PromptFormat.for_tokenizer(self.reward_tokenizer, self.cfg.data)
        batch = response_batch(self.reward_tokenizer, fmt, prompts, responses, self.cfg.data)
        device = self.reward_model.device
        return self.reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()


def load_saved_tokenizer(path: str):
    """The tokenizer saved beside a trained model, or a ModelError naming the folder."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise models.ModelError(f"cannot load the tokenizer saved in {path}: {err}") from err


def actor_logprobs(
    model, sequences: torch.Tensor, mask: torch.Tensor, prompt_width: int, temperature: float, entropy: bool = False
):
    """Log-probs of the response tokens under the sampling distribution (logits / temperature, as they were
    sampled) and, if asked, the entropy there (a figure to log: no autograd graph), from one log-softmax."""
    logits = models.response_logits(model, sequences, mask, prompt_width) / temperature
    labels = sequences[:, prompt_width:].to(logits.device)
    if entropy:
        return ppo_math.logprobs_and_entropy(logits, labels)
    return ppo_math.logprobs_of(logits, labels)
