#!/usr/bin/env python
"""Baseline: TRL's GRPOTrainer (trl==1.16.0) on CPU, the GRPO counterpart of ../../shared/bench/trl_ppo_bench.py.

Workload (the one `rlhf-bench --workload grpo`, i.e. experiment=bench-grpo, runs; see conf/experiment/bench-grpo.yaml):
  policy = SmolLM2-135M-Instruct (fp32, or pure bf16 weights with --dtype bf16) and, since beta > 0, a frozen
  reference copy; no reward model, no critic. Prompts: the built-in word problems of rlhf/data/builtin.py
  (generate(64, seed=1234, families=["word_problem"]), " " + prompt as plain text, so no chat template), taken in
  order (no shuffle), 2 per optimizer step, left-padded to the longest of the step. Group size 4, so 8 completions
  per step, each of exactly 32 tokens (min_new_tokens = max_completion_length: no EOS, no early stop), sampled at
  temperature 0.7, top_p 1.0. Reward: the verifier builtin.grade (1.0 right, 0.0 wrong). Loss: Dr. GRPO
  (loss_type="dr_grpo", scale_rewards="none") with the k3 KL to the reference in the loss (beta 0.04), one pass of
  one mini-batch of the 8 completions (num_iterations 1, gradient_accumulation_steps 1), lr 1e-6, no gradient
  checkpointing (TRL 1.16 turns it on by default; --gradient_checkpointing restores that). No vLLM, no eval, no
  saving. `--warmup` untimed steps, then `--iters` timed ones.

Timing (monkeypatched on the trainer instance, no source edits): generation = `_generate_single_turn` (model.generate
plus TRL's EOS masking); experience forwards = the no-grad `_get_per_token_logps_and_entropies` calls (reference
log-probs; old-policy log-probs are not computed here since generation and optimizer steps line up); training =
`compute_loss` (the policy forward with the loss) + `accelerator.backward` + `optimizer.step` (between the
on_pre_optimizer_step / on_optimizer_step callbacks); the step loop = on_step_begin -> on_step_end of the timed steps.

Setup: bench/setup_trl.sh [VENV] [MODEL_DIR] (defaults /tmp/trl-grpo-venv, /tmp/trl-bench-smollm2).
Usage: <trl venv>/bin/python bench/trl_grpo_bench.py --model <HF folder of SmolLM2-135M-Instruct>
       [--iters 4] [--warmup 1] [--dtype fp32|bf16] [--threads N] [--json out.json]
Prints a RESULT_JSON line; `rlhf-bench --workload grpo --compare out.json` puts it beside our run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

T_START = time.time()
REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", required=True, help="Hugging Face folder of SmolLM2-135M-Instruct")
    ap.add_argument("--builtin", default=str(REPO / "rlhf" / "data" / "builtin.py"), help="the verifier module")
    ap.add_argument("--prompts", type=int, default=64, help="word problems drawn (seed 1234)")
    ap.add_argument("--iters", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before the timed ones")
    ap.add_argument("--batch", type=int, default=8, help="completions per optimizer step")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (num_generations)")
    ap.add_argument("--resp_len", type=int, default=32, help="tokens per completion, exactly")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0 loads a reference model)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in backward (TRL 1.16's default; off here, as in rlhf-bench and the PPO baseline)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="/tmp/trl-grpo-out", help="the trainer's output_dir (nothing is saved)")
    ap.add_argument("--json", default="", help="also write the result to this file")
    return ap.parse_args()


def load_builtin(path: str):
    """rlhf/data/builtin.py loaded by file path: it needs only the standard library, the rlhf package needs more."""
    spec = importlib.util.spec_from_file_location("rlhf_builtin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    args = parse_args()
    if args.batch % args.group:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --group {args.group}")

    import accelerate
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)

    builtin = load_builtin(args.builtin)
    pairs = builtin.generate(args.prompts, seed=1234, families=["word_problem"])
    prompts = [" " + pair.prompt for pair in pairs]

    # ---------------- per-step records, filled by the wrappers below ----------------
    steps: list[dict] = []  # one per optimizer step, warm-up ones included
    cur: dict = {}

    def add(key: str, value: float) -> None:
        cur[key] = cur.get(key, 0.0) + value

    def gold(prompts: list, completions: list, **_) -> list[float]:
        t = time.perf_counter()
        rewards = [builtin.grade(p, c) for p, c in zip(prompts, completions, strict=True)]
        add("reward_fn", time.perf_counter() - t)
        cur.setdefault("rewards", []).extend(rewards)
        return rewards

    # ---------------- models / data ----------------
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)  # TRL loads the reference like it
    t_load = time.time() - t0
    dataset = Dataset.from_dict({"prompt": prompts})

    cfg = GRPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_generations=args.group,  # generation_batch_size defaults to the 8 completions of one step
        num_iterations=1,
        max_steps=args.warmup + args.iters,
        max_completion_length=args.resp_len,
        generation_kwargs={"min_new_tokens": args.resp_len},  # EOS suppressed: every completion has resp_len tokens
        temperature=args.temperature,
        top_p=args.top_p,
        beta=args.beta,
        loss_type="dr_grpo",
        scale_rewards="none",
        learning_rate=args.lr,
        shuffle_dataset=False,  # the prompts in order, as rlhf-bench takes them
        use_vllm=False,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults it to True
        bf16=(args.dtype == "bf16"),  # set explicitly: TRL defaults it to True (pure bf16 weights come from dtype)
        fp16=False,
        use_cpu=True,
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=42,
    )

    trl_logs: list[dict] = []  # TRL's numeric logs, one per step

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, s, c, **k):
            cur.clear()
            cur["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, a, s, c, **k):
            cur["opt_t0"] = time.perf_counter()

        def on_optimizer_step(self, a, s, c, **k):
            add("opt_step", time.perf_counter() - cur.pop("opt_t0"))

        def on_step_end(self, a, s, c, **k):
            cur["step"] = time.perf_counter() - cur.pop("t0")
            steps.append(dict(cur))

        def on_log(self, a, s, c, logs=None, **k):
            if logs:
                trl_logs.append({key: v for key, v in logs.items() if isinstance(v, (int, float))})

    t0 = time.time()
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=gold,
        args=cfg,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    t_init = time.time() - t0

    # ---------------- timing instrumentation (instance attributes shadow the methods; no source edits) ----------
    orig_gen = trainer._generate_single_turn
    orig_logps = trainer._get_per_token_logps_and_entropies
    orig_loss = trainer.compute_loss
    orig_backward = trainer.accelerator.backward

    def timed_generate(prompt_ids, *a, **k):
        t = time.perf_counter()
        completion_ids, logprobs = orig_gen(prompt_ids, *a, **k)
        add("gen", time.perf_counter() - t)
        lengths = [len(ids) for ids in completion_ids]
        cur.setdefault("completion_lens", []).extend(lengths)
        cur.setdefault("prompt_lens", []).extend(len(ids) for ids in prompt_ids)
        cur["prompt_padded_len"] = max(len(ids) for ids in prompt_ids)
        add("gen_tokens", sum(lengths))
        return completion_ids, logprobs

    def timed_logps(model, *a, **k):
        t = time.perf_counter()
        out = orig_logps(model, *a, **k)
        if not torch.is_grad_enabled():  # the experience forwards; the training one is timed in compute_loss
            add("ref_fwd" if model is trainer.ref_model else "old_fwd", time.perf_counter() - t)
        return out

    def timed_loss(*a, **k):
        t = time.perf_counter()
        out = orig_loss(*a, **k)
        add("train_fwd", time.perf_counter() - t)
        return out

    def timed_backward(loss, **k):
        t = time.perf_counter()
        out = orig_backward(loss, **k)
        add("backward", time.perf_counter() - t)
        return out

    trainer._generate_single_turn = timed_generate
    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer.compute_loss = timed_loss
    trainer.accelerator.backward = timed_backward

    t0 = time.time()
    trainer.train()
    t_train = time.time() - t0

    # ---------------- figures of the timed steps ----------------
    timed = steps[args.warmup :]
    if len(timed) != args.iters:
        raise SystemExit(f"expected {args.warmup + args.iters} optimizer steps, got {len(steps)}")

    def total(key: str) -> float:
        return sum(s.get(key, 0.0) for s in timed)

    loop_s = total("step")
    gen_s = total("gen")
    exp_s = total("ref_fwd") + total("old_fwd")
    train_s = total("train_fwd") + total("backward") + total("opt_step")
    gen_tokens = int(total("gen_tokens"))
    completion_lens = [n for s in timed for n in s["completion_lens"]]
    prompt_lens = [n for s in timed for n in s["prompt_lens"]]
    rewards = [r for s in timed for r in s["rewards"]]
    n_samples = args.iters * args.batch
    res = {
        "system": "trl-grpo",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "warmup": args.warmup,
        "batch": args.batch,
        "group": args.group,
        "prompt_len": round(sum(prompt_lens) / len(prompt_lens), 2),  # mean prompt tokens, unpadded
        "prompt_padded_len": round(sum(s["prompt_padded_len"] for s in timed) / len(timed), 2),  # what is computed on
        "resp_len": round(sum(completion_lens) / len(completion_lens), 2),
        "resp_len_min": min(completion_lens),
        "resp_len_max": max(completion_lens),
        "beta": args.beta,
        "loss_type": cfg.loss_type,
        "scale_rewards": cfg.scale_rewards,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "load_s": round(t_load, 2),
        "init_s": round(t_init, 2),
        "train_loop_s": round(loop_s, 2),
        "train_call_s(incl_warmup)": round(t_train, 2),
        "total_wall_s": round(time.time() - T_START, 2),
        "gen_s": round(gen_s, 2),
        "exp_other_fwd_s": round(exp_s, 2),
        "ref_fwd_s": round(total("ref_fwd"), 2),
        "old_logp_fwd_s": round(total("old_fwd"), 2),
        "reward_fn_s": round(total("reward_fn"), 3),
        "train_s(fwd+bwd+step)": round(train_s, 2),
        "train_fwd_s": round(total("train_fwd"), 2),
        "backward_s": round(total("backward"), 2),
        "opt_step_s": round(total("opt_step"), 2),
        "other_s": round(loop_s - gen_s - exp_s - train_s, 2),  # grad clipping, reward fn, logging, bookkeeping
        "iter_times_s": [round(s["step"], 2) for s in timed],
        "warmup_times_s": [round(s["step"], 2) for s in steps[: args.warmup]],
        "samples_per_s(train_loop)": round(n_samples / loop_s, 3),
        "gen_tokens": gen_tokens,
        "gen_tokens_per_s(train_loop)": round(gen_tokens / loop_s, 2),
        "gen_tokens_per_s(generation_only)": round(gen_tokens / gen_s, 2),
        "reward_mean": round(sum(rewards) / len(rewards), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    keys = ("completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio")
    lengths_logged = [{k: log[k] for k in keys if k in log} for log in trl_logs if keys[0] in log]
    print("TRL completion lengths per step:", lengths_logged)
    print("TRL last log:", trl_logs[-1] if trl_logs else None)
    print("RESULT_JSON " + json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
