"""`rlhf-data`: what a data option gives each stage — per-source counts, skipped rows and rendered examples.

Takes the same overrides as `rlhf`, e.g. `rlhf-data data=builtin model=tiny 'data.sources=[...]'`.
"""

from __future__ import annotations

import logging
import sys

from rlhf.compose import compose, composition_problem
from rlhf.config import ConfigError
from rlhf.data import STAGE_INDEX, DataError, ptx_texts, source_label, source_rows, stage_rows
from rlhf.data.tokenize import PromptFormat, encode_prompts, text_blocks
from rlhf.progress import markdown_table


def report(overrides: list[str], examples: int = 2) -> str:
    """The inspection report of the composed data option as markdown."""
    from rlhf.models import load_tokenizer

    cfg = compose(overrides)
    data = cfg.data
    lines = [f"# data option `{data.name}`", "", "## Sources"]
    rows = []
    for source in data.sources:
        kept, read = source_rows(source, data)
        skipped = ", ".join(f"{k} {v}" for k, v in read.skipped.items()) or "-"
        rows.append({"source": source_label(source), "weight": source.weight, "rows": len(kept), "skipped": skipped})
    lines += [markdown_table(rows), "", "## Training rows per stage (after the split and the blend)"]
    per_stage, empty = {}, []
    for stage in STAGE_INDEX:  # a mix may feed only some stages (an SFT-only source): preview those
        try:
            per_stage[stage] = stage_rows(data, stage)
        except DataError as err:
            empty.append(f"{stage}: {err}")
    if not per_stage:
        raise DataError("; ".join(empty))
    table = []
    for source in data.sources:
        label = source_label(source)
        table.append({"source": label, **{s: d.counts.get(label, 0) for s, d in per_stage.items()}})
    table.append({"source": "eval rows", **{s: len(d.eval) for s, d in per_stage.items()}})
    lines += [markdown_table(table), ""]
    lines += [f"No rows for {line}" for line in empty] + ([""] if empty else [])
    tokenizer = load_tokenizer(cfg.model)
    fmt = PromptFormat.for_tokenizer(tokenizer, data)
    if "ppo" in per_stage:
        prompts = [row["prompt"] for row in per_stage["ppo"].train]
        _, dropped = encode_prompts(tokenizer, fmt, prompts, data.max_prompt_len)
        lines.append(f"PPO prompts longer than data.max_prompt_len={data.max_prompt_len} tokens (dropped): {dropped}")
    if data.ptx.path or data.ptx.name:
        texts = ptx_texts(data)
        blocks = text_blocks(tokenizer, texts, data.max_prompt_len + data.max_answer_len)
        lines.append(f"PTX source {source_label(data.ptx)}: {len(texts)} documents, {len(blocks)} blocks")
    lines.append("")
    lines.append(f"## Rendered examples ({'chat template of ' + cfg.model.name if fmt.use_chat else 'plain template'})")
    for stage, stage_data in per_stage.items():
        for row in stage_data.train[:examples]:
            prompt = fmt.prompt_text(tokenizer, row["prompt"])
            lines += ["", f"### {stage}", "```", prompt + fmt.answer_text(tokenizer, row["prompt"], row["chosen"])]
            if "rejected" in row:
                lines += ["--- rejected:", row["rejected"]]
            lines.append("```")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__.strip())
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    problem = composition_problem(args)
    if problem:
        print(f"error: invalid config: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        print(report(args))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
