"""TripoSG DiT as used by MIDI-3D (rectified-flow transformer over VAE shape latents).

The module path and class name are fixed by the released ``model_index.json``
(``midi.models.transformers.triposg_transformer.TripoSGDiTModel``). Architecture facts follow
upstream (VAST-AI-Research/MIDI-3D, TripoSG); see the project's notes in README/TRAINING_README.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.utils import apply_lora_scale
from torch import nn

from midi.models.attention_processor import TripoSGAttnProcessor2_0


def _attention(width: int, heads: int, cross_dim: int | None, qk_norm: str | None, cross_norm: str | None):
    return Attention(query_dim=width, cross_attention_dim=cross_dim, dim_head=width // heads, heads=heads,
                     qk_norm=qk_norm, eps=1e-6, bias=False, out_bias=True, cross_attention_norm=cross_norm,
                     processor=TripoSGAttnProcessor2_0())


class DiTBlock(nn.Module):
    """One pre-norm transformer block (shared by the DiT and the VAE).

    Args:
        width: channels.
        num_heads: attention heads.
        self_attention: add ``norm1``/``attn1`` (self-attention).
        cross_attention_dim: add ``norm2``/``attn2`` attending to this many channels.
        cross_attention_2_dim: add ``norm2_2``/``attn2_2`` (a second cross-attention computed in
            parallel with the first from the same input).
        qk_norm: per-head q/k normalisation (``"rms_norm"`` in the DiT, None in the VAE).
        cross_attention_norm: LayerNorm on the key/value input (``"layer_norm"`` in the VAE).
        skip: add a U-ViT long skip: ``skip_norm(skip_linear(cat[skip, x]))`` (norm after linear).
    """

    def __init__(self, width: int, num_heads: int, self_attention: bool = True, cross_attention_dim: int | None = None,
                 cross_attention_2_dim: int | None = None, qk_norm: str | None = "rms_norm",
                 cross_attention_norm: str | None = None, skip: bool = False) -> None:
        super().__init__()
        norm = functools.partial(FP32LayerNorm, width, eps=1e-5)

        def branch(enabled: bool, cross_dim: int | None, cross_norm: str | None) -> tuple:
            """``(norm, attention)`` of one attention branch, ``(None, None)`` when the block has none."""
            return (norm(), _attention(width, num_heads, cross_dim, qk_norm, cross_norm)) if enabled else (None, None)

        # The assignment order is the state-dict order of the released checkpoints.
        self.norm1, self.attn1 = branch(self_attention, None, None)
        self.norm2, self.attn2 = branch(cross_attention_dim is not None, cross_attention_dim, cross_attention_norm)
        self.norm2_2, self.attn2_2 = branch(cross_attention_2_dim is not None, cross_attention_2_dim,
                                            cross_attention_norm)
        self.norm3, self.ff = norm(), FeedForward(width, mult=4, activation_fn="gelu", bias=True)
        self.skip_norm, self.skip_linear = (norm(), nn.Linear(2 * width, width)) if skip else (None, None)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_hidden_states_2: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                image_rotary_emb: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        kwargs = attention_kwargs or {}
        if self.skip_linear is not None:
            # Skip first, then Linear(2W -> W), then the norm: the order the weights were trained with.
            hidden_states = self.skip_norm(self.skip_linear(torch.cat([skip, hidden_states], dim=-1)))
        if self.attn1 is not None:
            hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), **kwargs)
        if self.attn2 is not None:
            cross = self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states, **kwargs)
            if self.attn2_2 is not None:
                # Both cross-attentions read the same input and are summed (parallel, not stacked).
                cross = cross + self.attn2_2(
                    self.norm2_2(hidden_states), encoder_hidden_states=encoder_hidden_states_2, **kwargs
                )
            hidden_states = hidden_states + cross
        return hidden_states + self.ff(self.norm3(hidden_states))


class TripoSGDiTModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    """The TripoSG/MIDI-3D diffusion transformer.

    Args:
        num_attention_heads (int, default 16): heads in every attention.
        width (int, default 2048): channels; also the number of latent tokens the MIDI pipeline
            draws.
        in_channels (int, default 64): latent channels (= output channels).
        num_layers (int, default 21): blocks; blocks ``i > num_layers // 2`` take a long skip from
            block ``num_layers - 1 - i`` (LIFO).
        cross_attention_dim (int, default 768): CLIP image-embedding channels (``attn2``).
        cross_attention_2_dim (int, default 1024): DINOv2 token channels (``attn2_2``).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, width: int = 2048, in_channels: int = 64, num_layers: int = 21,
                 cross_attention_dim: int = 768, cross_attention_2_dim: int = 1024) -> None:
        super().__init__()
        if width % num_attention_heads != 0:
            raise ValueError(f"width={width} must be divisible by num_attention_heads={num_attention_heads}")
        self.out_channels = in_channels
        self.time_embed = Timesteps(width, flip_sin_to_cos=False, downscale_freq_shift=0)
        self.time_proj = TimestepEmbedding(in_channels=width, time_embed_dim=4 * width, act_fn="gelu", out_dim=width)
        self.proj_in = nn.Linear(in_channels, width, bias=True)
        self.blocks = nn.ModuleList(
            DiTBlock(width, num_attention_heads, cross_attention_dim=cross_attention_dim,
                     cross_attention_2_dim=cross_attention_2_dim, qk_norm="rms_norm", skip=layer > num_layers // 2)
            for layer in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, in_channels, bias=True)
        self.gradient_checkpointing = False

    @apply_lora_scale("attention_kwargs")  # pops attention_kwargs["scale"] and scales the LoRA layers for the call
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor | None = None, encoder_hidden_states_2: torch.Tensor | None = None,
                image_rotary_emb: torch.Tensor | None = None, attention_kwargs: dict[str, Any] | None = None,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predicts the flow ``x0 - eps`` for noisy latents.

        Args:
            hidden_states: noisy latents ``(B, N, C_in)``.
            timestep: ``(B,)`` on the 0..1000 scale (``1000 * sigma``); a scalar is broadcast.
            encoder_hidden_states: CLIP image embeddings ``(B, T1, cross_attention_dim)``.
            encoder_hidden_states_2: DINOv2 tokens ``(B, T2, cross_attention_2_dim)``.
            image_rotary_emb: unused by MIDI (kept for signature compatibility).
            attention_kwargs: ``scale`` (LoRA scale; pass it by keyword) and multi-instance arguments
                (``num_instances``, ``num_instances_per_batch``) forwarded to every attention.
            return_dict: return a ``Transformer2DModelOutput`` instead of a 1-tuple.

        Returns:
            ``sample`` of shape ``(B, N, C_in)``.
        """
        if encoder_hidden_states is None or encoder_hidden_states_2 is None:
            raise ValueError("TripoSGDiTModel needs both encoder_hidden_states (CLIP) and encoder_hidden_states_2 (DINOv2)")
        x, attention_kwargs = hidden_states, attention_kwargs or {}
        batch, num_tokens, _ = x.shape
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0 or timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(batch)
        temb = self.time_embed(timestep).to(x.dtype)  # (B, W), sinusoid computed in fp32
        temb = self.time_proj(temb).unsqueeze(1)  # (B, 1, W)
        h = torch.cat([temb, self.proj_in(x)], dim=1)  # time token first: (B, N + 1, W)

        num_layers = len(self.blocks)
        skips: list[torch.Tensor] = []
        for layer, block in enumerate(self.blocks):
            skip = skips.pop() if layer > num_layers // 2 else None
            args = (h, encoder_hidden_states, encoder_hidden_states_2, None, image_rotary_emb, skip, attention_kwargs)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, *args)
            else:
                h = block(*args)
            if layer < num_layers // 2:
                skips.append(h)

        out = self.proj_out(self.norm_out(h)[:, -num_tokens:])  # the time token dropped: (B, N, C_in)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
