"""AdamW over fp32 master weights for a model that computes in bf16, without ZeRO.

DeepSpeed's bf16 optimizer for ZeRO 0 (`FP16_UnfusedOptimizer`) works tensor by tensor and allocates fresh fp32
gradients at every step; this one keeps its fp32 gradient buffers (4 bytes a parameter more between steps), copies
with one vectorised call per direction and steps with fused AdamW, several times faster (docs/performance.md).
"""

from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """Fused AdamW that steps fp32 copies of the given parameters and writes the result back to them rounded to
    their dtype. Gradients are read from the model's parameters and clipped to `max_grad_norm` (0: no clipping) in
    fp32; a parameter without a gradient is left alone, as plain AdamW does."""

    def __init__(self, groups: list[dict], max_grad_norm: float = 0.0, **adamw) -> None:
        self.model_params: list[torch.nn.Parameter] = []
        self.grad_buffers: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            masters = []
            for param in group["params"]:
                master = torch.nn.Parameter(param.detach().float().clone())
                self.model_params.append(param)
                self.grad_buffers.append(torch.zeros_like(master))
                masters.append(master)
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, fused=True, **adamw)
        self.masters = [m for group in self.param_groups for m in group["params"]]
        self.max_grad_norm = max_grad_norm
        self._master_by_param = {id(p): m for p, m in zip(self.model_params, self.masters, strict=True)}

    def master_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The fp32 master of a model parameter (None if this optimizer does not train it)."""
        return self._master_by_param.get(id(param))

    @torch.no_grad()
    def step(self, closure=None):
        pairs = [
            (model_param, master, buffer)
            for model_param, master, buffer in zip(self.model_params, self.masters, self.grad_buffers, strict=True)
            if model_param.grad is not None
        ]
        for master in self.masters:
            master.grad = None
        if not pairs:
            return None
        for _, master, buffer in pairs:
            master.grad = buffer
        torch._foreach_copy_([b for _, _, b in pairs], [p.grad for p, _, _ in pairs])
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([m for _, m, _ in pairs], self.max_grad_norm, foreach=True)
        super().step(closure)
        torch._foreach_copy_([p.data for p, _, _ in pairs], [m for _, m, _ in pairs])
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            param.grad = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masters": [m.detach() for m in self.masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, saved, model_param in zip(self.masters, masters, self.model_params, strict=True):
                master.copy_(saved)
                model_param.copy_(saved)
