"""Stage 2: the reward model — a backbone with a scalar head trained on chosen/rejected pairs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from rlhf import dist, engine, gold, lora, models, stats
from rlhf.checkpoint import Checkpointer
from rlhf.config import cache_dir, grad_accum_steps
from rlhf.data import DataError, batch_indices, builtin, datasets, onpolicy, plan_steps, stage_rows
from rlhf.data.tokenize import PromptFormat, encode_pair, pad_right
from rlhf.guard import StepGuard
from rlhf.progress import StepLog, describe_plan, eval_due, loss_figures
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin): the Bradley-Terry preference loss."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


ONPOLICY_FILE = "onpolicy_pairs.json"
PAIR_KINDS = (*onpolicy.KINDS, "data")  # the policy's answers (see rlhf.data.onpolicy), or the data's own pair


def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch, so one forward pass scores both."""
    rows = [{"input_ids": p[k], "labels": p[k]} for k in ("chosen", "rejected") for p in pairs]
    batch = pad_right(rows, pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def policy_scores(pair: dict, chosen: float, rejected: float) -> list[float]:
    """The scores of those answers of a pair that the policy wrote."""
    return [
        score for score, own in ((chosen, pair.get("policy_chosen")), (rejected, pair.get("policy_rejected"))) if own
    ]


class RewardTrainer:
    """Setup, train (with held-out pairwise accuracy), save (with score mean/std), and checkpoint state."""

    name = "reward"

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        self.out_dir = run_dir / self.name
        self.step = 0
        self.rank, self.world = dist.rank(), dist.world_size()
        self.score_stats = {"mean": 0.0, "std": 1.0}
        self.progress: dict = {"history": [], "evals": {}, "train_seconds": 0.0, "train_tokens": 0, "samples": 0}
        self.guard = StepGuard(self.name, cfg.checkpoint.max_skipped_in_a_row)
        self.checkpoints: Checkpointer | None = None  # set by the stage runner; None: no checkpoints

    # 1. setup: tokenizer, pairs, backbone + head (+ LoRA, checkpointing), DeepSpeed engine
    def setup(self) -> None:
        cfg = self.cfg
        model_cfg = cfg.model if cfg.stage.from_policy else cfg.reward_model  # the backbone's model option
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(model_cfg, cache_dir(cfg))
        processed = datasets.processed(cfg, self.name, self.tokenizer)
        self.train_pairs, self.eval_pairs = processed["train"], processed["eval"]
        self.tracker.summary({f"data/{self.name}/{source}": n for source, n in processed["counts"].items()})
        if cfg.stage.onpolicy.samples_per_prompt > 0:
            self._use_onpolicy_pairs()

        start = cfg.stage.init_from or (cfg.stage.policy_from if cfg.stage.from_policy else "")
        lm = models.load_causal_lm(model_cfg, self.tokenizer, cfg.seed, start, cache_dir(cfg))
        model = models.reward_model_from_lm(lm)
        del lm
        if cfg.stage.disable_dropout:
            models.disable_dropout(model)
        self.lora_modules = models.prepare_for_training(model, model_cfg)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        self.global_batch, self.micro_batch = cfg.stage.global_batch, cfg.hardware.micro_batch
        self.accum = grad_accum_steps(cfg)
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.train_pairs), cfg.stage, "reward training pairs")
        if len(self.eval_pairs) < self.world:
            raise DataError(f"{len(self.eval_pairs)} held-out pairs: the reward model needs some to evaluate")
        self.engine = engine.initialize(model, cfg, self.total_steps)
        log.info(
            describe_plan("reward", "pairs", len(self.train_pairs), len(self.eval_pairs), model, self.lora_modules, cfg)
        )
        log.info("reward: %d optimizer steps", self.total_steps)

    def _use_onpolicy_pairs(self) -> None:
        """Replace the built-in static pairs by pairs of the policy's own answers (see rlhf.data.onpolicy), keeping
        `static_fraction` of the training pairs static and other sources' pairs as they are."""
        cfg, op = self.cfg, self.cfg.stage.onpolicy
        fmt = PromptFormat.for_tokenizer(self.tokenizer, cfg.data)
        sampled = self._onpolicy_rows()

        def encode(rows: list[dict]) -> list[dict]:
            return [
                encode_pair(self.tokenizer, fmt, r["prompt"], r["chosen"], r["rejected"], cfg.data)
                | {k: r[k] for k in ("kind", "policy_chosen", "policy_rejected")}
                for r in rows
            ]

        train, evaluation = encode(sampled["train"]), encode(sampled["eval"])
        static_only = op.static_fraction >= 1
        if not evaluation or not (train or static_only):
            raise DataError(
                f"on-policy reward pairs: {len(train)} training and {len(evaluation)} held-out pairs from the policy's "
                "answers; the policy needs right and wrong answers (more prompts or samples, or a higher temperature)"
            )
        static = [p for p in self.train_pairs if p["builtin"]]
        rng = random.Random(cfg.seed)
        n_static = len(static) if static_only else round(len(train) * op.static_fraction / (1 - op.static_fraction))
        train += rng.sample(static, min(n_static, len(static)))
        self.train_pairs = train + [p for p in self.train_pairs if not p["builtin"]]
        rng.shuffle(self.train_pairs)
        self.eval_pairs = evaluation + [p for p in self.eval_pairs if not p["builtin"]]
        counts = {f"onpolicy_{k}": n for k, n in onpolicy.kind_counts(sampled["train"]).items()}
        counts |= {f"onpolicy_eval_{k}": n for k, n in onpolicy.kind_counts(sampled["eval"]).items()}
        self.tracker.summary({f"data/{self.name}/{k}": n for k, n in counts.items()})
        log.info(
            "reward: on-policy pairs, train %s + %d static, held-out %s",
            onpolicy.kind_counts(sampled["train"]),
            min(n_static, len(static)),
            onpolicy.kind_counts(sampled["eval"]),
        )

    def _onpolicy_rows(self) -> dict[str, list[dict]]:
        """Pairs of the policy's graded answers to the reward share's built-in prompts (train and held-out). Sampled
        once per policy and settings: kept in the data cache (other runs from the same policy reuse them) and in
        `<run>/reward/onpolicy_pairs.json` (a resumed run reads them back)."""
        cfg = self.cfg
        path = self.out_dir / ONPOLICY_FILE
        if path.is_file():
            return json.loads(path.read_text())
        cache = cache_dir(cfg) / "data" / f"onpolicy-{self._onpolicy_key()}.json"
        if cache.is_file() and not cfg.data.rebuild:
            log.info("reward: on-policy pairs from the data cache: %s", cache)
            pairs = json.loads(cache.read_text())
        else:
            pairs = self._sample_onpolicy()
        if self.rank == 0:
            for target in (cache, path):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(pairs))
                os.replace(tmp, target)
        dist.barrier()
        return pairs

    def _onpolicy_key(self) -> str:
        """What the sampled pairs depend on: the policy (its folder's files, or the model option and seed), the
        on-policy settings, the data, the world size (ranks sample apart), the precision and the code that samples
        and grades."""
        cfg, op = self.cfg, self.cfg.stage.onpolicy
        folder = Path(cfg.stage.policy_from or models.model_location(cfg.model, cache_dir(cfg)))
        files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*")) if f.is_file()]
        settings = OmegaConf.to_container(op)
        payload = {
            "policy": [str(folder.resolve()), files, OmegaConf.to_container(cfg.model, enum_to_str=True), cfg.seed],
            "onpolicy": settings,
            "data": OmegaConf.to_container(cfg.data, enum_to_str=True) | {"rebuild": False},
            "world": self.world,
            "precision": cfg.hardware.precision.value,
            "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (onpolicy, builtin, gold)],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def _sample_onpolicy(self) -> dict[str, list[dict]]:
        """Every rank answers its share of the prompts `samples_per_prompt` times; the graded answers become pairs
        (rlhf.data.onpolicy.build_pairs), gathered on every rank."""
        cfg, op = self.cfg, self.cfg.stage.onpolicy
        started = time.perf_counter()
        data = stage_rows(cfg.data, self.name)
        policy_tokenizer = models.load_tokenizer(cfg.model, cache_dir(cfg))
        policy = models.load_causal_lm(cfg.model, policy_tokenizer, cfg.seed, cfg.stage.policy_from, cache_dir(cfg))
        policy = policy.to(models.TORCH_DTYPES[cfg.hardware.precision]).eval()  # sampled as PPO samples it
        torch.manual_seed(dist.rank_seed(cfg.seed))
        fmt = PromptFormat.for_tokenizer(policy_tokenizer, cfg.data)
        out = {}
        train_rows = [] if op.static_fraction >= 1 else data.train  # static pairs only: the held-out ones alone
        for split, rows, count in (("train", train_rows, op.train_prompts), ("eval", data.eval, op.eval_prompts)):
            gradable = [r for r in rows if "family" in r and builtin.reference_answer(r["prompt"]) is not None]
            encoded = gold.encode_rows(gradable[: count or None], policy_tokenizer, fmt, cfg.data.max_prompt_len)
            mine = encoded[self.rank :: self.world]
            answers: dict[str, list[str]] = {}
            for batch in gold.answers(
                policy, policy_tokenizer, mine, op.batch, op.max_new_tokens, op.temperature, op.samples_per_prompt
            ):
                for row, text in zip(batch.rows, batch.texts, strict=True):
                    answers.setdefault(row["prompt"], []).append(text)
                if self.rank == 0:
                    elapsed = time.perf_counter() - started
                    log.info(
                        "reward: the policy answered %d/%d %s prompts x %d (%.1f answers/s)",
                        min(len(answers) * self.world, len(encoded)),
                        len(encoded),
                        split,
                        op.samples_per_prompt,
                        len(answers) * op.samples_per_prompt / elapsed,
                    )
            rng = random.Random(dist.rank_seed(cfg.seed))
            pairs = [
                pair
                for row in mine
                for pair in onpolicy.build_pairs(
                    row,
                    answers[row["prompt"]],
                    [builtin.score(row["prompt"], a) for a in answers[row["prompt"]]],
                    op.pairs_per_prompt,
                    rng,
                )
            ]
            out[split] = [p for share in dist.all_gather_objects(pairs) for p in share]
        log.info("reward: on-policy pairs sampled in %.0f s", time.perf_counter() - started)
        return out

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of pairs for optimizer step `step` (a pure function of seed and step)."""
        mine = batch_indices(len(self.train_pairs), self.global_batch, self.cfg.seed, step, self.rank, self.world)
        pad = self.tokenizer.pad_token_id
        return [
            pair_batch([self.train_pairs[i] for i in mine[m : m + self.micro_batch]], pad)
            for m in range(0, len(mine), self.micro_batch)
        ]

    def _scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        eng = self.engine
        scores = eng(**{k: v.to(eng.device) for k, v in batch.items()})
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    # 2. train: numbered optimizer steps over `accum` micro-batches of pairs; eval at 0, every interval and the end;
    # a checkpoint when due (see rlhf.checkpoint); a step with a non-finite loss is skipped and counted
    def train(self) -> dict:
        cfg, eng, progress = self.cfg, self.engine, self.progress
        steplog = StepLog("reward", self.total_steps, cfg.stage.log_interval, log, enabled=self.rank == 0)
        evals = progress["evals"]
        if self.step == 0 and cfg.stage.eval_start:
            start = self.evaluate()
            evals |= {"eval_acc_start": start["reward/acc"], "eval_loss_start": start["reward/eval_loss"]}
            self.tracker.log(start, step=0)
        eng.train()
        while self.step < self.total_steps:
            started = time.perf_counter()
            loss_sum, correct, pairs, tokens = 0.0, 0, 0, 0
            for batch in self.micro_batches(self.step):
                chosen, rejected = self._scores(batch)
                loss = pairwise_loss(chosen, rejected, cfg.stage.margin)
                if self.guard.backward_step(eng, loss):
                    loss_sum += loss.item() * len(chosen)
                    correct += int((chosen > rejected).sum())
                    pairs += len(chosen)
                tokens += int(batch["attention_mask"].sum())
            loss_sum, correct, pairs, tokens = dist.all_reduce_sum([loss_sum, correct, pairs, tokens])
            step_s = time.perf_counter() - started
            self.step += 1
            skipped = self.guard.end_step(self.step)
            progress["train_seconds"] += step_s
            progress["train_tokens"] += int(tokens)
            progress["samples"] += self.global_batch
            metrics = {
                "reward/lr": eng.get_lr()[0],
                "guard/skipped_steps": self.guard.skipped,
                "perf/tokens_per_s": tokens / step_s,
                "perf/step_s": step_s,
                "perf/samples_per_s": self.global_batch / step_s,
            }
            if not skipped:
                progress["history"].append(loss_sum / pairs)
                metrics |= {"reward/loss": loss_sum / pairs, "reward/train_acc": correct / pairs}
            if eval_due(self.step, self.total_steps, cfg.stage.eval_interval, self.checkpoints):
                metrics |= self.evaluate()
                evals |= {"eval_loss": metrics["reward/eval_loss"], "eval_pairs": metrics["reward/eval_pairs"]}
                evals |= {f"eval_{k[len('reward/') :]}": v for k, v in metrics.items() if k.startswith("reward/acc")}
                evals |= {k.split("/")[1]: metrics[k] for k in ("reward/chosen_mean", "reward/rejected_mean")}
            self.tracker.log(metrics, step=self.step)
            shown = {k: metrics.get(k, float("nan")) for k in ("reward/loss", "reward/train_acc", "reward/lr")}
            steplog.step(self.step, shown, tokens / step_s, step_s)
            if self.checkpoints is not None:
                self.checkpoints.step_done(self.total_steps)
        history = progress["history"]
        return {
            "steps": self.step,
            **loss_figures(history, progress["samples"], progress["train_seconds"], progress["train_tokens"]),
            **evals,
            "gap": evals.get("chosen_mean", 0.0) - evals.get("rejected_mean", 0.0),
            "score_mean": self.score_stats["mean"],
            "score_std": self.score_stats["std"],
            "skipped_steps": self.guard.skipped,
            "params": self.n_params,
            "trainable_params": self.n_trainable,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pairwise accuracy (a tie counts as wrong) with its 95% interval, per pair kind, the loss and the
        mean chosen/rejected scores. The mean and std of the scores of the policy's own answers among them (all
        answers when none is the policy's) become the normalisation saved with the model, so PPO's normalised
        rewards are centred on what the policy writes."""
        eng = self.engine
        eng.eval()
        usable = self.eval_pairs[: self.cfg.stage.eval_pairs or None]
        mine = usable[: len(usable) - len(usable) % self.world][self.rank :: self.world]
        chosen_all, rejected_all = [], []
        for start in range(0, len(mine), self.micro_batch):
            chosen, rejected = self._scores(
                pair_batch(mine[start : start + self.micro_batch], self.tokenizer.pad_token_id)
            )
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
        eng.train()
        chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
        right = (chosen > rejected).tolist()
        kinds = [p["kind"] for p in mine]
        own = [
            s for p, c, r in zip(mine, chosen.tolist(), rejected.tolist(), strict=True) for s in policy_scores(p, c, r)
        ]
        if not any(p.get("policy_chosen") or p.get("policy_rejected") for p in self.eval_pairs):
            own = chosen.tolist() + rejected.tolist()  # no answer of the policy's among them: all answers
        per_kind = []  # pairs and right ones of each kind
        for kind in PAIR_KINDS:
            per_kind += [kinds.count(kind), sum(r for r, k in zip(right, kinds, strict=True) if k == kind)]
        n, correct, loss_sum, c_sum, r_sum, s_n, s_sum, s_sq, *per_kind = dist.all_reduce_sum(
            [
                len(chosen),
                sum(right),
                pairwise_loss(chosen, rejected, self.cfg.stage.margin).item() * len(chosen),
                chosen.sum().item(),
                rejected.sum().item(),
                len(own),
                sum(own),
                sum(x * x for x in own),
                *per_kind,
            ]
        )
        mean = s_sum / max(s_n, 1)
        std = max(s_sq / max(s_n, 1) - mean**2, 0.0) ** 0.5
        self.score_stats = {"mean": mean, "std": std, "pairs": int(n), "answers": int(s_n)}
        accuracy = stats.wilson_interval(correct, int(n))
        metrics = {
            "reward/acc": accuracy.value,
            "reward/acc_ci_low": accuracy.low,
            "reward/acc_ci_high": accuracy.high,
            "reward/eval_pairs": n,
            "reward/eval_loss": loss_sum / n,
            "reward/chosen_mean": c_sum / n,
            "reward/rejected_mean": r_sum / n,
            "reward/gap": (c_sum - r_sum) / n,
        }
        for kind, count, hits in zip(PAIR_KINDS, per_kind[::2], per_kind[1::2], strict=True):
            if count:
                metrics[f"reward/acc_{kind}"] = hits / count
        if self.rank == 0:
            by_kind = ", ".join(
                f"{k} {metrics[f'reward/acc_{k}']:.3f}" for k in PAIR_KINDS if f"reward/acc_{k}" in metrics
            )
            log.info(
                "reward eval at step %d: acc %s on %d pairs (%s), loss %.4f, chosen %.3f, rejected %.3f",
                self.step,
                accuracy.text(),
                int(n),
                by_kind,
                metrics["reward/eval_loss"],
                metrics["reward/chosen_mean"],
                metrics["reward/rejected_mean"],
            )
        return metrics

    # 3. save: backbone + head as a sequence-classification folder with the score statistics, LoRA merged
    def save(self) -> Path:
        state = dist.full_state_dict(self.engine, self.cfg.hardware.zero_stage)
        target = self.out_dir / "final"
        if self.rank == 0:
            state = lora.merge_lora_state_dict(state, lora.lora_scalings(self.engine.module))
            models.save_reward_model(
                self.engine.module, state, self.tokenizer, target, self.cfg.reward_model.dtype, self.score_stats
            )
            stats = self.score_stats
            log.info("reward: final model saved to %s (score mean %.4f, std %.4f)", target, stats["mean"], stats["std"])
        dist.barrier()
        return target

    # 4. checkpoints (rlhf.checkpoint): the engine, and the loop state that a resumed run continues from
    def engines(self) -> dict:
        return {"model": self.engine}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "progress": self.progress,
            "score_stats": self.score_stats,
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.progress, self.score_stats = state["step"], state["progress"], state["score_stats"]
        self.guard.load_state_dict(state["guard"])
