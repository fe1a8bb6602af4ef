"""AdamW for a model that computes in bf16, without ZeRO: over fp32 master weights, or on the bf16 weights with a
Kahan compensation (`optimizer.master_weights=false`).

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


class KahanAdamW(torch.optim.Optimizer):
    """AdamW on bf16 weights without fp32 masters (as pure-bf16 training does, e.g. TRL's), kept as accurate by
    Kahan summation: each weight w carries a bf16 compensation c, the part of its value that bf16 cannot hold, so
    w + c is the weight to 16 significant bits and updates far below w's rounding step accumulate instead of
    vanishing. A step computes x = w + c in fp32, steps x with fused AdamW (fp32 moments), clips the gradients to
    `max_grad_norm` (0: no clipping) with one fused norm, then splits x into w = bf16(x) and c = bf16(x - w).
    Between steps it keeps 2 + 8 bytes a parameter besides the weight, against MasterWeightAdamW's 16 (during a step,
    fp32 copies of the weights and gradients: 8 more). Build it over the fp32 weights, then cast the model to bf16:
    the compensation starts from the rounding of that cast."""

    def __init__(self, groups: list[dict], max_grad_norm: float = 0.0, **adamw) -> None:
        adamw.setdefault("weight_decay", 0.01)
        super().__init__(groups, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, **adamw})
        self.max_grad_norm = max_grad_norm
        for param in self.params():
            weight = param.detach().float()
            self.state[param] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(weight),
                "exp_avg_sq": torch.zeros_like(weight),
                "compensation": (weight - weight.to(torch.bfloat16).float()).to(torch.bfloat16),
            }

    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def _state_on_device(self, param: torch.Tensor) -> dict:
        """The parameter's state, moved to its device first if need be (the optimizer is built before DeepSpeed
        moves the model to its device)."""
        state = self.state[param]
        if state["compensation"].device != param.device:
            state.update({key: value.to(param.device) for key, value in state.items()})
        return state

    def master_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """A parameter's full-precision value, weight + compensation in fp32 (None if this optimizer does not train
        it): what a saved model holds."""
        state = self.state.get(param)
        return None if state is None else param.detach().float() + state["compensation"].to(param.device).float()

    @torch.no_grad()
    def step(self, closure=None):
        grads = {p: p.grad.float() for p in self.params() if p.grad is not None}
        if grads and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(grads.values()), self.max_grad_norm, foreach=True)
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads]
            if not params:
                continue
            states = [self._state_on_device(p) for p in params]
            compensations = [s["compensation"] for s in states]
            values = torch._foreach_add([p.float() for p in params], [c.float() for c in compensations])
            beta1, beta2 = group["betas"]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                values,
                [grads[p] for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
            torch._foreach_copy_(params, values)  # rounded to bf16
            torch._foreach_sub_(values, [p.float() for p in params])
            torch._foreach_copy_(compensations, values)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params():
            param.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype (bf16): the moments are put back in fp32
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param, saved_id in zip(self.params(), saved_ids, strict=True):
            for key, value in state_dict["state"][saved_id].items():
                self.state[param][key] = value.to(param.device).clone()
