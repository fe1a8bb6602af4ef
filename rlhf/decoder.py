"""A lean decoder for llama-family models, built on the weights of the moment for one rollout.

`transformers` runs a decoding step through generic modules: per layer, separate q/k/v and gate/up products, a mask
prepared for every call and CPU matrix products that repack their weight at each call. At batch 8 these products
stream every weight for 8 rows, so the repacking and the call overheads dominate. This decoder fuses q/k/v and
gate/up, packs every weight once per rollout into oneDNN's blocked layout on CPU (faster small-batch products, see
docs/performance.md), keeps a preallocated KV cache with left padding handled through positions and one boolean column
mask, and lets the caller drop finished rows. It computes the same function as the model's own forward, up to the
rounding of the changed order of operations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf import lora

Linear = Callable[[torch.Tensor], torch.Tensor]


def packed_linear(weight: torch.Tensor, rows: int) -> Linear:
    """`x -> x @ weight.T`. On CPU the weight is reordered once for oneDNN (the layout its product kernels use,
    tuned for `rows` rows), instead of at every call; elsewhere a plain `F.linear`."""
    weight = weight.detach()
    packable = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _mkldnn_bf16())
    if weight.device.type == "cpu" and packable and _mkldnn_linear():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, weight)


def _mkldnn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _mkldnn_bf16() -> bool:
    """oneDNN packs bf16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def unsupported(model: torch.nn.Module) -> str | None:
    """Why this decoder cannot run `model` (None when it can): a llama-family causal LM without biases, with SiLU
    gating and default rotary embeddings."""
    config = model.config
    if config.model_type != "llama":
        return f"model_type {config.model_type} (the decoder covers llama)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biases in attention or MLP"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope_type {rope.get('rope_type', rope.get('type'))}"
    return None


class LlamaDecoder:
    """The model's weights fused and packed, and a KV cache for `batch` rows of up to `max_len` positions."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int) -> None:
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.layers = []
        weight = lora.base_weight  # a LoRA layer's merged base weight, else the Linear's
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = torch.cat([weight(attn.q_proj), weight(attn.k_proj), weight(attn.v_proj)])
                gate_up = torch.cat([weight(mlp.gate_proj), weight(mlp.up_proj)])
                self.layers.append(
                    (
                        layer.input_layernorm.weight.detach(),
                        packed_linear(qkv, batch),
                        packed_linear(weight(attn.o_proj), batch),
                        layer.post_attention_layernorm.weight.detach(),
                        packed_linear(gate_up, batch),
                        packed_linear(weight(mlp.down_proj), batch),
                    )
                )
        self.norm = inner.norm.weight.detach()
        self.head = packed_linear(weight(model.lm_head), batch)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        half = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.device).float() / self.head_dim
        angles = torch.arange(max_len, device=self.device).float()[:, None] / theta**half
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the cache (finished rows leave the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.dtype) * weight

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, allowed: torch.Tensor) -> torch.Tensor:
        """Logits at the last position of each row for `ids` [B, S] written at cache columns start..start+S-1.
        `positions` [B, S] are the rotary positions; `allowed` [B, S, start+S] says which columns each query sees."""
        batch, width = ids.shape
        end = start + width
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=self.device).masked_fill_(~allowed, float("-inf"))
        bias = bias[:, None, None]  # [B, 1, 1, S, end], shared by the head groups
        scale = dim**-0.5
        x = self.embed[ids]
        for layer, (norm_in, qkv_proj, out_proj, norm_post, gate_up_proj, down_proj) in enumerate(self.layers):
            qkv = qkv_proj(self._rms(x, norm_in)).view(batch, width, heads + 2 * kv_heads, dim)
            qk = self._rotate(qkv[:, :, : heads + kv_heads], cos, sin)
            self.keys[layer][:, :, start:end] = qk[:, :, heads:].transpose(1, 2)
            self.values[layer][:, :, start:end] = qkv[:, :, heads + kv_heads :].transpose(1, 2)
            q = qk[:, :, :heads].reshape(batch, width, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
            q = q.reshape(batch, kv_heads, groups * width, dim)
            scores = (q @ self.keys[layer][:, :, :end].transpose(-1, -2)).float() * scale
            scores = scores.view(batch, kv_heads, groups, width, end) + bias
            probs = torch.softmax(scores, dim=-1).to(self.dtype).view(batch, kv_heads, groups * width, end)
            context = (probs @ self.values[layer][:, :, :end]).view(batch, kv_heads, groups, width, dim)
            x = x + out_proj(context.permute(0, 3, 1, 2, 4).reshape(batch, width, heads * dim))
            gate, up = gate_up_proj(self._rms(x, norm_post)).chunk(2, dim=-1)
            x = x + down_proj(F.silu(gate) * up)
        return self.head(self._rms(x[:, -1], self.norm))
