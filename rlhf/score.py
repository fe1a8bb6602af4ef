"""`rlhf-score`: score (prompt, response) pairs with a trained reward model, from a file or the command line.

    rlhf-score outputs/.../reward/final --prompt "What is 2 + 3?" --response "5"
    rlhf-score outputs/.../reward/final --file pairs.jsonl [--out scored.jsonl]

A file holds rows of `prompt` + `response` (or `prompt` + `chosen` + `rejected`: both are scored and the pairwise
accuracy printed), in any format the data layer reads (.jsonl, .json, .csv, .parquet; prompts may be chat messages).
Scores are raw; `normalised` divides the distance from the saved mean by the saved std (what PPO uses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rlhf.config import DataConfig
from rlhf.data.sources import RowError, read_local
from rlhf.data.tokenize import Prompt, PromptFormat, response_batch
from rlhf.models import ModelError, load_reward_model, reward_stats


@torch.no_grad()
def score(model, tokenizer, data_cfg, prompts: list[Prompt], responses: list[str], batch_size: int = 8) -> list[float]:
    """The reward model's raw score of each (prompt, response), tokenised as in training."""
    fmt = PromptFormat.for_tokenizer(tokenizer, data_cfg)
    model.eval()
    scores: list[float] = []
    pairs = list(zip(prompts, responses, strict=True))
    for start in range(0, len(pairs), batch_size):
        prompt_part, response_part = zip(*pairs[start : start + batch_size], strict=True)
        batch = response_batch(tokenizer, fmt, list(prompt_part), list(response_part), data_cfg)
        scores += model(batch["input_ids"], batch["attention_mask"]).tolist()
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf-score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved reward model folder (<run>/reward/final)")
    parser.add_argument("--file", help="rows of prompt + response (or prompt + chosen + rejected)")
    parser.add_argument("--prompt")
    parser.add_argument("--response")
    parser.add_argument("--out", help="write the scored rows here as JSON Lines (default: standard output)")
    parser.add_argument("--template", choices=["auto", "chat", "plain"], default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if bool(args.file) == bool(args.prompt is not None and args.response is not None):
        parser.error("give either --file, or both --prompt and --response")
    try:
        from transformers import AutoTokenizer

        model = load_reward_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        stats = reward_stats(args.model)
        data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig(name="score")), {"template": args.template})
        PromptFormat.for_tokenizer(tokenizer, data_cfg)  # fails early on a template the tokenizer lacks
        rows = read_rows(Path(args.file)) if args.file else [{"prompt": args.prompt, "response": args.response}]
    except (ModelError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    fields = ["chosen", "rejected"] if "rejected" in rows[0] else ["response"]
    for name in fields:
        raw = score(model, tokenizer, data_cfg, [r["prompt"] for r in rows], [r[name] for r in rows], args.batch_size)
        for row, value in zip(rows, raw, strict=True):
            row[f"{name}_score"] = value
            row[f"{name}_normalised"] = (value - stats["mean"]) / max(stats["std"], 1e-8)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 — stdout must not be closed
    for row in rows:
        out.write(json.dumps(row) + "\n")
    if args.out:
        out.close()
    if "rejected" in rows[0]:
        accuracy = sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows)
        print(f"pairwise accuracy {accuracy:.4f} over {len(rows)} pairs", file=sys.stderr)


def read_rows(path: Path) -> list[dict]:
    """Rows of a scoring file: pairs (prompt, chosen, rejected) or (prompt, response); a bad row is an error."""
    try:
        rows, _ = read_local(path, "pairs", {}, strict=True)
    except RowError as err:
        if "missing field: 'chosen'" not in str(err):
            raise
        rows, _ = read_local(path, "sft", {"answer": "response"}, strict=True)
        rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows]
    if not rows:
        raise ValueError(f"{path}: no rows to score")
    return rows


if __name__ == "__main__":
    main()
