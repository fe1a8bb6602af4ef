"""Adapters from published preference-dataset schemas to rows of (prompt, chosen, rejected).

Each adapter follows its dataset card (the same sources DeepSpeed-Chat reads) and maps one raw row to a row whose
`prompt` is a list of chat messages (multi-turn transcripts keep their turns) and whose `chosen`/`rejected` are the
final assistant answers. A row that cannot be used raises ValueError with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Messages = list[dict[str, str]]
TURN_RE = re.compile(r"\n*(Human|Assistant):[ \t]?")
CITATION_RE = re.compile(r" ?[\(\[][^\)\]]*[\)\]]")


def parse_transcript(text: str) -> Messages:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]; an empty trailing turn is kept."""
    parts = TURN_RE.split(text)
    if len(parts) < 3:
        raise ValueError("no 'Human:'/'Assistant:' turns in the transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[speaker], "content": body.strip()}
        for speaker, body in zip(parts[1::2], parts[2::2], strict=True)
    ]


def prompt_turns(text: str) -> Messages:
    """A transcript that ends with the assistant's (empty) turn, as the messages before that turn."""
    turns = parse_transcript(text)
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the prompt transcript does not end with a user turn")
    return turns


def _text(raw: Mapping, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"missing or empty field: {key!r}")
    return value.strip()


def hh_rlhf(raw: Mapping) -> dict:
    """Anthropic/hh-rlhf: `chosen` and `rejected` are whole transcripts sharing all but the last assistant turn."""
    chosen, rejected = parse_transcript(_text(raw, "chosen")), parse_transcript(_text(raw, "rejected"))
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("a transcript does not end with an assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def dahoas_prompt_response(raw: Mapping) -> dict:
    """Dahoas/rm-static, Dahoas/full-hh-rlhf: `prompt` is a transcript ending in 'Assistant:'."""
    return {
        "prompt": prompt_turns(_text(raw, "prompt")),
        "chosen": _text(raw, "chosen"),
        "rejected": _text(raw, "rejected"),
    }


def dahoas_synthetic(raw: Mapping) -> dict:
    """Dahoas/synthetic-instruct-gptj-pairwise: a plain instruction and two answers."""
    return {
        "prompt": [{"role": "user", "content": _text(raw, "prompt")}],
        "chosen": _text(raw, "chosen"),
        "rejected": _text(raw, "rejected"),
    }


def yitingxie(raw: Mapping) -> dict:
    """yitingxie/rlhf-reward-datasets: a transcript prompt; answers prefixed with 'Assistant:'."""
    return {
        "prompt": prompt_turns(_text(raw, "prompt")),
        "chosen": _text(raw, "chosen").split("Assistant:")[-1].strip(),
        "rejected": _text(raw, "rejected").split("Assistant:")[-1].strip(),
    }


def webgpt(raw: Mapping) -> dict:
    """openai/webgpt_comparisons: the higher-scored of two answers is chosen; ties are unusable; citations cut."""
    question = raw.get("question")
    text = question.get("full_text") if isinstance(question, Mapping) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing or empty field: 'question.full_text'")
    scores = (raw.get("score_0"), raw.get("score_1"))
    if not all(isinstance(s, (int, float)) for s in scores):
        raise ValueError("missing field: 'score_0'/'score_1'")
    if scores[0] == scores[1]:
        raise ValueError("tie: equal scores")
    answers = [CITATION_RE.sub("", _text(raw, f"answer_{i}")).strip() for i in (0, 1)]
    best = 0 if scores[0] > scores[1] else 1
    return {
        "prompt": [{"role": "user", "content": text.strip()}],
        "chosen": answers[best],
        "rejected": answers[1 - best],
    }


def shp(raw: Mapping) -> dict:
    """stanfordnlp/SHP: `labels` is 1 when human_ref_A is preferred over human_ref_B."""
    label = raw.get("labels")
    if label not in (0, 1):
        raise ValueError("missing field: 'labels' (0 or 1)")
    a, b = _text(raw, "human_ref_A"), _text(raw, "human_ref_B")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return {"prompt": [{"role": "user", "content": _text(raw, "history")}], "chosen": chosen, "rejected": rejected}


ADAPTERS: dict[str, Callable[[Mapping], dict]] = {
    "Anthropic/hh-rlhf": hh_rlhf,
    "Dahoas/rm-static": dahoas_prompt_response,
    "Dahoas/full-hh-rlhf": dahoas_prompt_response,
    "Dahoas/synthetic-instruct-gptj-pairwise": dahoas_synthetic,
    "yitingxie/rlhf-reward-datasets": yitingxie,
    "openai/webgpt_comparisons": webgpt,
    "stanfordnlp/SHP": shp,
    "local/jsonfile": dahoas_synthetic,  # DeepSpeed-Chat's local layout: data/{train,eval}.json with these fields
}
