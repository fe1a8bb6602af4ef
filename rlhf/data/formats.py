"""Adapters from published preference-dataset schemas to rows of (prompt, chosen, rejected).

Each adapter follows its dataset card (the same sources DeepSpeed-Chat reads) and maps one raw row to a row whose
`prompt` is a list of chat messages (multi-turn transcripts keep their turns) and whose `chosen`/`rejected` are the
final assistant answers. A row that cannot be used raises ValueError with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Messages = list[dict[str, str]]
TURN_RE = re.compile(r"(?:^|\s+)(Human|Assistant):[ \t]?")
CITATION_RE = re.compile(r"\s?(\[\d+(?:,\s*\d+)*\])+")  # webgpt's reference marks: [1], [2][3], [1, 2]
ASSISTANT_PREFIX_RE = re.compile(r"^\s*Assistant:\s*")


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
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected transcripts differ before their last answer")
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
    """yitingxie/rlhf-reward-datasets: a transcript prompt (with or without the closing 'Assistant:'); answers
    prefixed with 'Assistant:'."""
    return {
        "prompt": prompt_turns(_text(raw, "prompt")),
        "chosen": ASSISTANT_PREFIX_RE.sub("", _text(raw, "chosen")),
        "rejected": ASSISTANT_PREFIX_RE.sub("", _text(raw, "rejected")),
    }


def webgpt(raw: Mapping) -> dict:
    """openai/webgpt_comparisons: the higher-scored of two answers is chosen; ties (score 0, the card's 'soft 50%')
    are skipped rather than given to answer_0 as DeepSpeed-Chat does; reference marks like [1] are cut."""
    question = raw.get("question")
    text = question.get("full_text") if isinstance(question, Mapping) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing or empty field: 'question.full_text'")
    try:
        scores = (float(raw["score_0"]), float(raw["score_1"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError("missing field: 'score_0'/'score_1' must be numbers") from err
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
    try:
        label = int(raw["labels"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError("missing field: 'labels' (0 or 1)") from err
    if label not in (0, 1):
        raise ValueError(f"wrong value: 'labels' is {label}, not 0 or 1")
    a, b = _text(raw, "human_ref_A"), _text(raw, "human_ref_B")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return {"prompt": [{"role": "user", "content": _text(raw, "history")}], "chosen": chosen, "rejected": rejected}


def local_jsonfile(raw: Mapping) -> dict:
    """DeepSpeed-Chat's local/jsonfile: `prompt` is usually written as ' Human: ... Assistant:' (its turns are
    parsed so the chat template does not wrap the labels again); a prompt without labels is one user turn."""
    prompt = _text(raw, "prompt")
    messages = prompt_turns(prompt) if TURN_RE.search(prompt) else [{"role": "user", "content": prompt}]
    return {"prompt": messages, "chosen": _text(raw, "chosen"), "rejected": _text(raw, "rejected")}


ADAPTERS: dict[str, Callable[[Mapping], dict]] = {
    "Anthropic/hh-rlhf": hh_rlhf,
    "Dahoas/rm-static": dahoas_prompt_response,
    "Dahoas/full-hh-rlhf": dahoas_prompt_response,
    "Dahoas/synthetic-instruct-gptj-pairwise": dahoas_synthetic,
    "yitingxie/rlhf-reward-datasets": yitingxie,
    "openai/webgpt_comparisons": webgpt,
    "stanfordnlp/SHP": shp,
    "local/jsonfile": local_jsonfile,  # DeepSpeed-Chat's local layout: data/{train,eval}.json
}
