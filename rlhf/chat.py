"""`rlhf-chat`: talk to a trained actor (an SFT or PPO output, any causal-LM folder, or a LoRA adapter folder in peft's
format on its base model), tokens shown as they come.

    rlhf-chat outputs/<run>/ppo/final                  interactive: multi-turn, `clear` forgets, `quit` leaves
    rlhf-chat outputs/<run> --prompt "What is 2 + 3?"  one answer on stdout (a run folder picks its last actor)
    echo "What is 2 + 3?" | rlhf-chat outputs/<run>     each stdin line is answered on its own line

Prompts are rendered as in training: the tokenizer's chat template when it has one, else the plain template.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf.config import DataConfig
from rlhf.data.tokenize import PromptFormat

ACTOR_FOLDERS = ("ppo/final", "ppo/final-ema", "sft/final")  # in a run folder, the first one present is used
COMMANDS = "commands: clear (forget the conversation), quit (leave)"


class ChatError(ValueError):
    """A folder that holds no model to chat with; the message says what is there instead."""


def resolve_model_dir(path: Path) -> Path:
    """The actor folder to load: `path` itself (a model or an adapter folder), or in a run folder its PPO output,
    else its SFT output."""
    from rlhf.lora import is_adapter

    path = path.expanduser()
    if not path.exists():
        raise ChatError(f"{path} does not exist")
    if is_adapter(path):
        return path
    if not (path / "config.json").is_file():
        for sub in ACTOR_FOLDERS:
            if (path / sub / "config.json").is_file():
                return path / sub
        raise ChatError(f"{path} holds no model (no config.json, nor {', '.join(ACTOR_FOLDERS)})")
    from rlhf.models import saved_model_kind

    if (saved_model_kind(path) or ("",))[0] == "reward model":
        raise ChatError(f"{path} is a reward model, which scores answers rather than writing them: use rlhf-score")
    return path


class Chat:
    """A conversation with one model: the history, the prompt rendering and sampling settings."""

    def __init__(self, model_dir: Path, template: str = "auto", system: str = "", **sampling) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf import lora
        from rlhf.models import adapter_base, from_pretrained, merged_adapter

        adapter = lora.is_adapter(model_dir)
        base = adapter_base(model_dir, "rlhf-chat") if adapter else model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = from_pretrained(AutoModelForCausalLM, base, "the model")
        if adapter:
            self.model = merged_adapter(self.model, model_dir)
        self.model.eval()
        self.format = PromptFormat.for_tokenizer(self.tokenizer, DataConfig(name="chat", template=template))
        self.system = system
        self.sampling = sampling
        self.history: list[dict[str, str]] = []

    def clear(self) -> None:
        self.history = []

    @torch.no_grad()
    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to `message` after the conversation so far; `on_text` gets each new piece of text."""
        from transformers.generation.streamers import BaseStreamer

        turns = [*self.history, {"role": "user", "content": message}]
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + turns
        text = self.format.prompt_text(self.tokenizer, messages)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        tokenizer, width = self.tokenizer, ids["input_ids"].shape[1]

        class Printer(BaseStreamer):  # decodes the answer so far and hands on what is new
            def __init__(self) -> None:
                self.tokens: list[int] = []
                self.shown = ""
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate passes the prompt once before decoding starts
                    self.prompt_seen = True
                    return
                self.tokens.append(int(value.reshape(-1)[0]))
                text = tokenizer.decode(self.tokens, skip_special_tokens=True)
                if on_text is not None and not text.endswith("\ufffd"):  # wait for a whole multi-byte character
                    on_text(text[len(self.shown) :])
                    self.shown = text

            def end(self) -> None:
                pass

        greedy = self.sampling["temperature"] == 0
        options = {"do_sample": False} if greedy else {"do_sample": True, "top_k": 0}
        if not greedy:
            options |= {"temperature": self.sampling["temperature"], "top_p": self.sampling["top_p"]}
        output = self.model.generate(
            **ids,
            max_new_tokens=self.sampling["max_new_tokens"],
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.eos_token_id
            if self.tokenizer.pad_token_id is None
            else self.tokenizer.pad_token_id,
            streamer=Printer(),
            **options,
        )
        answer = self.tokenizer.decode(output[0, width:], skip_special_tokens=True).strip()
        self.history = [*turns, {"role": "assistant", "content": answer}]
        return answer


def interactive(chat: Chat) -> None:
    print(f"chatting with {chat.model.config.name_or_path}; {COMMANDS}", file=sys.stderr)
    while True:
        try:
            message = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if message == "quit":
            return
        if message == "clear":
            chat.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not message:
            continue
        print("model> ", end="", flush=True)
        chat.reply(message, on_text=lambda piece: print(piece, end="", flush=True))
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-chat", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("model", type=Path, help="an SFT/PPO output, a run folder, a causal LM or a LoRA adapter")
    parser.add_argument("--prompt", help="answer this one message and exit (else stdin lines, else interactive)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--system", default="", help="a system message before the conversation")
    parser.add_argument("--template", choices=["auto", "chat", "plain"], default="auto")
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    try:
        model_dir = resolve_model_dir(args.model)
    except ChatError as err:
        print(f"rlhf-chat: {err}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    from rlhf.models import ModelError

    try:
        chat = Chat(
            model_dir,
            template=args.template,
            system=args.system,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
        )
    except ModelError as err:
        print(f"rlhf-chat: {err}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        print(chat.reply(args.prompt))
    elif not sys.stdin.isatty():
        for line in sys.stdin:
            if line.strip():
                chat.clear()
                print(chat.reply(line.strip()), flush=True)
    else:
        interactive(chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
