"""`rlhf-bench`: PPO step 3 or GRPO on a fixed workload, timed by phase, against a matmul peak measured on the spot.

The PPO workload (`--workload ppo`, `experiment=bench`) is the one `../shared/bench` runs TRL and DeepSpeed-Chat on:
SmolLM2-135M as actor and reference, the same backbone with a fresh 1-output head as reward model and critic, 64
prompts left-padded to 64 tokens, responses of exactly 32 tokens, batch 8, one PPO epoch of one mini-batch. The GRPO
workload (`--workload grpo`, `experiment=bench-grpo`) is the one `bench/trl_grpo_bench.py` runs TRL's GRPOTrainer on:
actor and reference only, built-in word problems, 4 responses of exactly 32 tokens per prompt graded by the verifier,
8 responses per iteration. After `--warmup` iterations it times `--iterations`
more and reports samples/s, generated and training tokens/s, the time split (generation / experience forwards /
training), each phase's model FLOP utilisation (MFU) against the measured matmul peak of the run's dtype, and peak
memory, as JSON, a markdown table and a W&B run.

FLOPs are the work a phase computes, counted from the model's shape and each iteration's widths: 2 per weight per
token for every matmul, the attention products (QK^T and AV over the full context), and the LM head only where its
logits are used (the last prompt position in generation, the response positions elsewhere); one actor pass fewer
in the experience phase when the rollout's log-probs are reused; backward counts twice the forward.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf.progress import markdown_table

log = logging.getLogger("rlhf.bench")

WORKLOADS = {"ppo": "bench", "grpo": "bench-grpo"}  # --workload: its experiment preset
PROMPTS_FILE = Path(__file__).with_name("bench_prompts.json")  # the first 64 prompts of ../shared/bench


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a decoder-only transformer."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    gated_mlp: bool = True  # llama: gate, up and down projections

    @classmethod
    def of(cls, config) -> Shape:
        """The shape of a transformers config (llama-style names, with OPT's as fallbacks)."""
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=getattr(config, "intermediate_size", None) or config.ffn_dim,
            vocab=config.vocab_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            gated_mlp=hasattr(config, "intermediate_size"),
        )

    @property
    def body_matmul_params(self) -> int:
        """Weights used in matmuls per token by the transformer layers (no embedding lookup, no LM head)."""
        kv = self.hidden * self.hidden * self.kv_heads // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * kv
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return self.layers * (attention + mlp)


def forward_flops(shape: Shape, batch: int, tokens: int, context: int, head_tokens: int) -> float:
    """FLOPs of one forward pass over `tokens` new positions per row that attend to `context` positions, with the
    LM head applied at `head_tokens` positions per row (0 for a value or reward model)."""
    matmuls = 2 * shape.body_matmul_params * tokens + 2 * shape.hidden * shape.vocab * head_tokens
    attention = 4 * shape.layers * shape.hidden * tokens * context
    return float(batch * (matmuls + attention))


def phase_flops(
    actor: Shape,
    critic: Shape | None,
    batch: int,
    prompt: int,
    response: int,
    actor_passes: int = 2,
    reward: Shape | None = None,
    critic_folded: bool = False,
) -> dict[str, float]:
    """The FLOPs one PPO iteration needs per phase: `generation` (the prompt pass, then one token per step with the
    KV cache), `experience` (the reference, and the critic and reward model where there are any, over prompt +
    response, and the actor unless its rollout log-probs are reused: `actor_passes` 1 or 2) and `training` (actor
    and critic forward and backward, one epoch; the critic's backward alone when its experience forward is reused,
    `critic_folded`). A reward function or a critic-free estimator counts no FLOPs."""
    total = prompt + response
    generation = forward_flops(actor, batch, prompt, prompt, 1) + sum(
        forward_flops(actor, batch, 1, prompt + step, 1) for step in range(1, response)
    )
    actor_pass = forward_flops(actor, batch, total, total, response)
    critic_pass = forward_flops(critic, batch, total, total, 0) if critic else 0.0
    reward_pass = forward_flops(reward, batch, total, total, 0) if reward else 0.0
    return {
        "generation": generation,
        "experience": actor_passes * actor_pass + critic_pass + reward_pass,
        "training": 3 * actor_pass + (2 if critic_folded else 3) * critic_pass,
    }


def matmul_peak(dtype: torch.dtype, device: str = "cpu", seconds: float = 1.0) -> float:
    """The best matmul rate (FLOP/s) of square products at a few sizes, warm, in `dtype` on `device`."""
    best = 0.0
    for n in (1024, 2048):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        runs, started = 0, time.perf_counter()
        while True:
            a @ b
            runs += 1
            if device != "cpu":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, 2 * n**3 * runs / elapsed)
    return best


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and the peak CUDA allocation when a GPU is in use."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def bench_prompts(tokenizer, count: int, width: int) -> list[dict]:
    """The benchmark's prompt rows ({prompt, input_ids}): " " + prompt, tokenised without a chat template (as
    ../shared/bench does), cut to `width` tokens if `width` > 0; PPO left-pads them to `width` (stage.prompt_width)
    or, with 0, to the longest prompt of each batch."""
    prompts = json.loads(PROMPTS_FILE.read_text())[:count]
    rows = [tokenizer(" " + p)["input_ids"] for p in prompts]
    return [{"prompt": p, "input_ids": ids[-width:] if width else ids} for p, ids in zip(prompts, rows, strict=True)]


def word_problem_prompts(tokenizer, count: int) -> list[dict]:
    """The GRPO workload's prompt rows ({prompt, input_ids}): built-in word problems (seed 1234, as
    bench/trl_grpo_bench.py draws them), " " + prompt tokenised without a chat template (as TRL does with
    plain-text prompts), graded by the verifier; PPO pads each batch to its longest prompt."""
    from rlhf.data import builtin

    prompts = [" " + pair.prompt for pair in builtin.generate(count, seed=1234, families=["word_problem"])]
    return [{"prompt": p, "input_ids": tokenizer(p)["input_ids"]} for p in prompts]


def reward_model_folder(cfg) -> Path:
    """A reward model of the `reward_model` backbone with a fresh (seeded) 1-output head, saved once in the cache:
    the benchmark's reward model and critic."""
    from rlhf import models
    from rlhf.config import DType, cache_dir

    root = cache_dir(cfg)
    target = root / "bench" / f"{cfg.reward_model.name}-fresh-head-{cfg.seed}"
    if (target / "config.json").is_file():
        return target
    tokenizer = models.load_tokenizer(cfg.reward_model, root)
    model = models.reward_model_from_lm(models.load_causal_lm(cfg.reward_model, tokenizer, cfg.seed, "", root))
    models.save_reward_model(model, model.state_dict(), tokenizer, target, DType.fp32, {"mean": 0.0, "std": 1.0})
    return target


@dataclass
class Iteration:
    generation_s: float
    experience_s: float  # the four experience forward passes, GAE and the rest of the experience step
    training_s: float
    generated_tokens: int
    training_tokens: int


def summarise(
    iterations: list[Iteration], flops: dict[str, float], peak_flops: float, batch: int, loop_s: float
) -> dict[str, float]:
    """The figures of the timed iterations: throughput, time split, per-phase MFU (FLOPs / time / peak)."""
    n = len(iterations)
    gen = sum(i.generation_s for i in iterations)
    exp = sum(i.experience_s for i in iterations)
    train = sum(i.training_s for i in iterations)
    total = gen + exp + train
    figures = {
        "iterations": n,
        "samples_per_s": n * batch / loop_s,
        "gen_tokens_per_s": sum(i.generated_tokens for i in iterations) / gen,
        "train_tokens_per_s": sum(i.training_tokens for i in iterations) / train,
        "loop_s": loop_s,
        "s_per_iteration": loop_s / n,
        "gen_s": gen,
        "exp_fwd_s": exp,
        "train_s": train,
        "gen_frac": gen / total,
        "exp_fwd_frac": exp / total,
        "train_frac": train / total,
        "peak_gflops": peak_flops / 1e9,
        "tflop_per_iteration": sum(flops.values()) / 1e12,
    }
    for phase, seconds in (("generation", gen), ("experience", exp), ("training", train)):
        figures[f"mfu_{phase}"] = flops[phase] * n / seconds / peak_flops
    figures["mfu_total"] = sum(flops.values()) * n / total / peak_flops
    return figures


def run(cfg, iterations: int, warmup: int, run_dir: Path, workload: str = "ppo", profiled: bool = False) -> dict:
    """Build the models, run `warmup` + `iterations` PPO iterations on the benchmark prompts and return the
    figures of the timed ones (also logged to W&B); with `profiled`, one more iteration under torch's profiler,
    written to `<run_dir>/profile.md`."""
    from rlhf import dist
    from rlhf.config import world_size
    from rlhf.models import TORCH_DTYPES
    from rlhf.stages.ppo import PPOTrainer
    from rlhf.stages.ppo_models import PPOModels
    from rlhf.tracking import Tracker

    stage = cfg.stage
    load_started = time.perf_counter()
    ppo_models = PPOModels(cfg, total_steps=warmup + iterations)
    load_s = time.perf_counter() - load_started
    with Tracker(cfg, "bench", run_dir, dist.rank()) as tracker:
        trainer = PPOTrainer(cfg, run_dir, tracker, models=ppo_models)
        needed = stage.global_batch * (warmup + iterations + 1)
        if workload == "ppo":
            prompts = bench_prompts(ppo_models.tokenizer, needed, stage.prompt_width)
        else:
            prompts = word_problem_prompts(ppo_models.tokenizer, 64)
        rows = [prompts[j % len(prompts)] for j in range(needed)]  # the 64 prompts again for longer runs
        samples = stage.samples_per_prompt
        rollouts = stage.global_batch * samples
        dtype = TORCH_DTYPES[cfg.hardware.precision]
        device = "cpu" if cfg.hardware.accelerator == "cpu" else "cuda"
        peak_before = matmul_peak(dtype, device)
        log.info("matmul peak (%s, %d threads): %.1f GFLOP/s", dtype, torch.get_num_threads(), peak_before / 1e9)
        timed: list[Iteration] = []
        shapes: list[tuple[int, int]] = []  # (prompt, response) widths computed on in each timed iteration
        loop_started = 0.0
        for i in range(warmup + iterations):
            if i == warmup:
                loop_started = time.perf_counter()
            batch = [row for row in rows[i * stage.global_batch : (i + 1) * stage.global_batch] for _ in range(samples)]
            started = time.perf_counter()
            exp = trainer.generate_experience(batch)
            experience_done = time.perf_counter()
            trainer.train_step(exp)
            done = time.perf_counter()
            record = Iteration(
                generation_s=exp.generation_s,
                experience_s=experience_done - started - exp.generation_s,
                training_s=done - experience_done,
                generated_tokens=int(exp.response_mask.sum()),
                training_tokens=int(exp.attention_mask.sum()) * stage.ppo_epochs,
            )
            kind = "warm-up" if i < warmup else "timed"
            log.info(
                "bench iteration %d/%d (%s): generation %.2f s, experience %.2f s, training %.2f s",
                i + 1, warmup + iterations, kind, record.generation_s, record.experience_s, record.training_s,
            )  # fmt: skip
            tracker.log({f"bench/{k}": v for k, v in asdict(record).items()}, step=i + 1)
            if i >= warmup:
                timed.append(record)
                shapes.append((exp.sequences.shape[1] - exp.response_mask.shape[1], exp.response_mask.shape[1]))
        loop_s = time.perf_counter() - loop_started
        if profiled:
            profile_iteration(trainer, rows[-stage.global_batch :], samples, run_dir / "profile.md")
        # measured again after the loop: a shared machine's rate drifts, and a low reading would inflate every MFU
        peak_after = matmul_peak(dtype, device)
        peak = max(peak_before, peak_after)
        log.info("matmul peak before the loop %.1f, after %.1f GFLOP/s", peak_before / 1e9, peak_after / 1e9)
        reused = stage.rollout == "engine" and stage.reuse_rollout_logprobs
        actor = Shape.of(ppo_models.actor.module.config)
        critic, reward = (
            Shape.of(m.module.config) if m is not None else None for m in (ppo_models.critic, ppo_models.reward_model)
        )
        per_iteration = [
            phase_flops(actor, critic, rollouts, prompt, response, 1 if reused else 2, reward, trainer.fold_critic)
            for prompt, response in shapes
        ]
        flops = {phase: sum(f[phase] for f in per_iteration) / len(per_iteration) for phase in per_iteration[0]}
        figures = {
            "system": "rlhf",
            "model": cfg.model.name,
            "dtype": cfg.hardware.precision.value,
            "workload": workload,
            "rollout": stage.rollout,
            "reused_rollout_logprobs": reused,
            "threads": torch.get_num_threads(),
            "world_size": world_size(cfg),
            "batch": rollouts,
            "group": samples,
            "prompt_width": stage.prompt_width,
            "prompt_len": sum(prompt for prompt, _ in shapes) / len(shapes),
            "resp_len": sum(response for _, response in shapes) / len(shapes),
            "warmup_iterations": warmup,
            "load_s": load_s,
            **summarise(timed, flops, peak, rollouts, loop_s),
            "peak_gflops_before": peak_before / 1e9,
            "peak_gflops_after": peak_after / 1e9,
            **peak_memory_mb(),
        }
        tracker.summary({f"bench/{k}": v for k, v in figures.items()})
    return figures


def profile_iteration(trainer, prompts: list[dict], samples: int, path: Path) -> None:
    """One iteration under torch's profiler, its rollout and training phases by operator, written to `path`."""
    from rlhf.bench_profile import PhaseProfile

    phases = PhaseProfile()
    with phases.phase("rollout (generation and experience passes)"):
        exp = trainer.generate_experience([row for row in prompts for _ in range(samples)])
    with phases.phase("training"):
        trainer.train_step(exp)
    path.write_text(phases.markdown())
    log.info("profile of one more iteration: %s", path)


def trl_row(path: Path) -> dict:
    """A row of the table from the JSON `../shared/bench/trl_ppo_bench.py` or `bench/trl_grpo_bench.py` writes."""
    trl = json.loads(path.read_text())
    return {
        "system": f"{trl.get('system', 'trl')} {trl.get('trl', '')}".strip(),
        "rollout": "generate",
        "dtype": trl["dtype"],
        "prompt_len": trl.get("prompt_len", ""),
        "samples_per_s": trl["samples_per_s(train_loop)"],
        "gen_tokens_per_s": trl["gen_tokens_per_s(generation_only)"],
        "s_per_iteration": trl["train_loop_s"] / trl["iters"],
        "gen_s": trl["gen_s"],
        "exp_fwd_s": trl["exp_other_fwd_s"],
        "train_s": trl["train_s(fwd+bwd+step)"],
        "peak_rss_mb": trl["peak_rss_mb"],
    }


TABLE_COLUMNS = (
    "system", "dtype", "rollout", "prompt_len", "samples_per_s", "gen_tokens_per_s", "train_tokens_per_s",
    "s_per_iteration", "gen_s", "exp_fwd_s", "train_s", "mfu_generation", "mfu_experience", "mfu_training",
    "mfu_total", "peak_gflops", "peak_rss_mb",
)  # fmt: skip


def table(rows: list[dict]) -> str:
    """The comparison table: our run first, then any TRL (or other) runs given with --compare."""
    return markdown_table([{k: row.get(k, "") for k in TABLE_COLUMNS} for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-bench",
        description="PPO step 3 or GRPO on a fixed benchmark workload (see ../shared/bench): throughput, time split, "
        "MFU per phase and peak memory, as JSON, a markdown table and a W&B run. Other arguments are config overrides, "
        "e.g. hardware.precision=bf16 or stage.rollout=generate.",
    )
    parser.add_argument("--iterations", type=int, default=4, help="timed PPO iterations (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="ppo",
        help="ppo: experiment=bench, beside trl_ppo_bench.py; grpo: experiment=bench-grpo, beside "
        "bench/trl_grpo_bench.py (default ppo)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one more iteration by phase and operator (profile.md)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.md")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="a JSON file of trl_ppo_bench.py or bench/trl_grpo_bench.py (repeatable)",
    )
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlhf.compose import compose
    from rlhf.config import ConfigError
    from rlhf.data import DataError
    from rlhf.dist import configure_process
    from rlhf.models import ModelError

    try:
        cfg = compose([f"experiment={WORKLOADS[args.workload]}", *overrides])
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"rlhf-bench: invalid config: {err}", file=sys.stderr)
        return 2
    try:
        compared = [trl_row(path) for path in args.compare]  # read first: a bad file should not cost a run
    except (OSError, ValueError, KeyError) as err:
        print(
            f"rlhf-bench: --compare: cannot read a TRL benchmark result: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return 2
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    out = args.out or Path("outputs") / "bench" / f"{stamp}-{cfg.model.name}-{cfg.hardware.precision.value}"
    out.mkdir(parents=True, exist_ok=True)
    configure_process(cfg, 1)
    try:
        if not cfg.stage.reward_from and "model" in cfg.stage.reward_funcs:
            cfg.stage.reward_from = str(reward_model_folder(cfg))
        figures = run(cfg, args.iterations, args.warmup, out, args.workload, args.profile)
    except (ModelError, DataError) as err:
        print(f"rlhf-bench: {err}", file=sys.stderr)
        return 2
    rows = [figures, *compared]
    (out / "bench.json").write_text(json.dumps({"rlhf": figures, "compare": rows[1:]}, indent=1))
    text = table(rows)
    (out / "bench.md").write_text(text + "\n")
    print(text)
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
