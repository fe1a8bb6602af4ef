"""Process setup (threads, accelerator, backend) and process-group helpers: rank, world size, reductions, and
gathering full weights under ZeRO-3."""

from __future__ import annotations

import logging
import os
import re
import resource
import socket
from contextlib import nullcontext

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig

from rlhf.config import Accelerator

SHM_COMM_OP = "deepspeed_shm_comm"


def configure_process(cfg: DictConfig, local_procs: int) -> None:
    """Accelerator and thread settings; must run before DeepSpeed is imported."""
    if cfg.hardware.accelerator == Accelerator.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        threads = cfg.hardware.threads_per_proc or max(1, (os.cpu_count() or 1) // local_procs)
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op probes log every gcc call


def backend(cfg: DictConfig) -> str:
    return "gloo" if cfg.hardware.accelerator == Accelerator.cpu else "nccl"


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def rank_seed(seed: int) -> int:
    """This rank's sampling seed: ranks draw different responses for the same prompt (one seed for all would give
    every rank the same draws), and a run with the same seed draws the same ones again."""
    return seed + 1_000_003 * rank()


def all_gather_objects(value: object) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not is_initialized() or world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def reset_peak_memory() -> None:
    """Start a new peak for `peak_memory`: the process's peak resident memory (Linux) and CUDA's allocated peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass  # the peak then runs from the process's start
    if torch.cuda.is_initialized():  # a CPU run on a GPU host must not start a CUDA context
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory since `reset_peak_memory` (`peak_rss_gb`; since the process started where
    the peak cannot be reset) and, on CUDA, the device's peak allocated memory (`peak_device_gb`), in GB."""
    try:
        with open("/proc/self/status") as status:
            kib = int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))
    except (OSError, AttributeError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"peak_rss_gb": kib * 1024 / 1e9}
    if torch.cuda.is_initialized():
        peaks["peak_device_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return peaks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init(backend: str) -> None:
    """Join (or, in a single process, create) the process group DeepSpeed expects."""
    import deepspeed

    if is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # DeepSpeed's shared-memory all-reduce serves only its inference path; left on, it compiles for minutes on a
        # fresh machine and leaves 66 MiB per rank in /dev/shm after every run. Training all-reduces over gloo.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def destroy() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums of `values` over all ranks (the values themselves in a single process)."""
    return _all_reduce(values, torch_dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Maxima of `values` over all ranks (the values themselves in a single process)."""
    return _all_reduce(values, torch_dist.ReduceOp.MAX)


def _all_reduce(values: list[float], op) -> list[float]:
    if not is_initialized() or world_size() == 1:
        return values
    device = f"cuda:{torch.cuda.current_device()}" if torch_dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def gather_objects(value: object) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others); every rank must call it."""
    if not is_initialized() or world_size() == 1:
        return [value]
    gathered = [None] * world_size() if rank() == 0 else None
    torch_dist.gather_object(value, gathered, dst=0)
    return gathered


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The module's full state dict on CPU at rank 0 (empty elsewhere); every rank must call it.

    Trained parameters come from the fp32 master weights (or the bf16 weights with their Kahan compensation) when
    training ran in bf16/fp16, so the saved model is not rounded to 16 bits; under ZeRO-3 each parameter is gathered
    in turn rather than the whole model at once.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from rlhf.optim import KahanAdamW, MasterWeightAdamW

    module = engine.module
    masters = engine.bfloat16_enabled() or engine.fp16_enabled()
    own = engine.optimizer if isinstance(engine.optimizer, (MasterWeightAdamW, KahanAdamW)) else None
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if own is not None:
            value = own.master_of(param)
        else:
            value = safe_get_full_fp32_param(param) if masters and param.requires_grad else None
        if value is None:
            gathered = (
                deepspeed.zero.GatheredParameters([param], modifier_rank=None) if zero_stage == 3 else nullcontext()
            )
            with gathered:
                value = param.data.detach().cpu().clone() if rank() == 0 else None
        if rank() == 0:
            state[name] = value.detach().cpu()
    if rank() == 0:
        persistent = set(module.state_dict())
        state.update({k: v.detach().cpu().clone() for k, v in module.named_buffers() if k in persistent})
    return state
