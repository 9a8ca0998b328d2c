"""TripoSG shape VAE: surface points + normals -> latent token set -> signed occupancy field.

The module path and class name are fixed by the released ``model_index.json``
(``midi.models.autoencoders.autoencoder_kl_triposg.TripoSGVAEModel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from midi.models.transformers.triposg_transformer import DiTBlock


class FrequencyPositionalEmbedding(nn.Module):
    """``x -> [x, sin(x f), cos(x f)]`` with ``f_j = 2^j`` (times pi if ``include_pi``).

    The products are laid out dimension-major (all frequencies of x, then y, then z), so the
    output has ``input_dim * (2 * num_freqs + 1)`` channels. The frequencies are a
    non-persistent buffer (no state-dict key).
    """

    def __init__(self, num_freqs: int = 8, input_dim: int = 3, include_pi: bool = False) -> None:
        super().__init__()
        freqs = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        if include_pi:
            freqs = freqs * torch.pi
        self.register_buffer("frequencies", freqs, persistent=False)
        self.out_dim = input_dim * (2 * num_freqs + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., None] * self.frequencies).reshape(*x.shape[:-1], -1)  # (..., D*F)
        return torch.cat([x, angles.sin(), angles.cos()], dim=-1)


def farthest_point_sampling(points: torch.Tensor, num_samples: int, random_start: bool = False,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy farthest point sampling of ``points (B, P, 3)``, batched, with no compiled extension: indices
    ``(B, num_samples)`` into ``P`` (``num_samples <= P``), in pick order.

    Matches torch_cluster's CPU kernel: the first pick is point 0 (with ``random_start``, a random point per
    item drawn with ``generator``), the distance is the squared euclidean one in the input dtype, each next
    pick is the first argmax of the running minimum distance.
    """
    batch, num_points, _ = points.shape
    idx = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    if random_start:
        current = torch.randint(num_points, (batch,), generator=generator, device="cpu").to(points.device)
    else:
        current = torch.zeros(batch, dtype=torch.long, device=points.device)
    rows = torch.arange(batch, device=points.device)
    min_dist = torch.full((batch, num_points), float("inf"), dtype=points.dtype, device=points.device)
    for i in range(num_samples):
        idx[:, i] = current
        dist = (points - points[rows, current][:, None]).pow(2).sum(-1)  # (B, P)
        min_dist = torch.minimum(min_dist, dist)
        current = min_dist.argmax(dim=1)
    return idx


class DiagonalGaussianDistribution:
    """Diagonal Gaussian over the last axis of ``parameters = [mean | logvar]``."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=-1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), averaged over tokens and channels: ``(B,)``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).mean(dim=(1, 2))


@dataclass
class TripoSGEncoderOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class TripoSGDecoderOutput(BaseOutput):
    sample: torch.Tensor


def _cross_block(width: int, num_heads: int) -> DiTBlock:
    """The VAE's cross-attention block (no self-attention, LayerNorm on the key/value input)."""
    return DiTBlock(width, num_heads, self_attention=False, cross_attention_dim=width, qk_norm=None,
                    cross_attention_norm="layer_norm")


class TripoSGEncoder(nn.Module):
    """Cross-attention from FPS query points to all points, then self-attention blocks."""

    def __init__(self, in_channels: int, width: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_channels, width)
        selfs = [DiTBlock(width, num_heads, qk_norm=None) for _ in range(num_layers)]
        self.blocks = nn.ModuleList([_cross_block(width, num_heads), *selfs])
        self.norm_out = nn.LayerNorm(width)

    def forward(self, queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(queries)
        kv = self.proj_in(points)  # one projection for queries and keys/values
        h = self.blocks[0](h, encoder_hidden_states=kv)
        for block in self.blocks[1:]:
            h = block(h)
        return self.norm_out(h)


class TripoSGDecoder(nn.Module):
    """Self-attention over latent tokens, then a cross-attention queried by embedded points."""

    def __init__(self, in_channels: int, width: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        selfs = [DiTBlock(width, num_heads, qk_norm=None) for _ in range(num_layers)]
        self.blocks = nn.ModuleList([*selfs, _cross_block(width, num_heads)])
        self.proj_query = nn.Linear(in_channels, width)
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 1)

    def latent_features(self, z: torch.Tensor) -> torch.Tensor:
        """The per-token features queried by points (computed once per decode)."""
        for block in self.blocks[:-1]:
            z = block(z)
        return z

    def query(self, features: torch.Tensor, embedded_points: torch.Tensor) -> torch.Tensor:
        """Signed values ``(B, Q, 1)``, positive inside (the raw output is negated)."""
        h = self.blocks[-1](self.proj_query(embedded_points), encoder_hidden_states=features)
        return -self.proj_out(self.norm_out(h))


class TripoSGVAEModel(ModelMixin, ConfigMixin):
    """TripoSG's point-cloud VAE.

    Args:
        in_channels (int, default 3): position channels (xyz); further input channels (normals)
            are appended after the frequency embedding.
        latent_channels (int, default 64): channels per latent token.
        num_attention_heads (int, default 8): heads everywhere.
        width_encoder (int, default 512), width_decoder (int, default 1024): block widths.
        num_layers_encoder (int, default 8), num_layers_decoder (int, default 16): self-attention
            blocks (each side also has one cross-attention block).
        embedding_type (str, default "frequency"): only "frequency" exists.
        embed_frequency (int, default 8): frequencies ``2^0 .. 2^(F-1)``.
        embed_include_pi (bool, default False): multiply the frequencies by pi.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 64, num_attention_heads: int = 8,
                 width_encoder: int = 512, width_decoder: int = 1024, num_layers_encoder: int = 8,
                 num_layers_decoder: int = 16, embedding_type: str = "frequency", embed_frequency: int = 8,
                 embed_include_pi: bool = False) -> None:
        super().__init__()
        if embedding_type != "frequency":
            raise ValueError(f"embedding_type={embedding_type!r} is not supported (only 'frequency')")
        self.embedder = FrequencyPositionalEmbedding(embed_frequency, in_channels, embed_include_pi)
        self.encoder = TripoSGEncoder(in_channels + self.embedder.out_dim, width_encoder,
                                      num_attention_heads, num_layers_encoder)
        self.decoder = TripoSGDecoder(self.embedder.out_dim, width_decoder, num_attention_heads, num_layers_decoder)
        self.quant = nn.Linear(width_encoder, 2 * latent_channels)
        self.post_quant = nn.Linear(latent_channels, width_decoder)
        self.use_slicing = False
        self.slicing_length = 1

    def enable_slicing(self, slicing_length: int = 1) -> None:
        """Encode/decode ``slicing_length`` items at a time to bound memory."""
        self.use_slicing = True
        self.slicing_length = slicing_length

    def _point_features(self, x: torch.Tensor) -> torch.Tensor:
        pos_channels = self.config.in_channels
        return torch.cat([self.embedder(x[..., :pos_channels]), x[..., pos_channels:]], dim=-1)

    def sample_query_points(self, x: torch.Tensor, num_tokens: int = 2048, seed: int | None = None) -> torch.Tensor:
        """Upstream's query selection, ``(B, num_tokens, C)`` rows of ``x``: one random subset of ``4 * num_tokens``
        points shared by the batch (numpy ``default_rng(seed)``), then FPS down to ``num_tokens`` per item."""
        num_points = x.shape[1]
        subset = np.random.default_rng(seed).choice(num_points, 4 * num_tokens, replace=4 * num_tokens > num_points)
        selected = x[:, torch.from_numpy(subset).to(x.device)]  # (B, 4T, C)
        generator = torch.Generator().manual_seed(seed) if (self.training and seed is not None) else None
        idx = farthest_point_sampling(selected[..., :3], num_tokens, random_start=self.training, generator=generator)
        return torch.gather(selected, 1, idx[..., None].expand(-1, -1, x.shape[-1]))

    def _encode(self, x: torch.Tensor, num_tokens: int = 2048, seed: int | None = None) -> torch.Tensor:
        queries = self.sample_query_points(x, num_tokens, seed)
        h = self.encoder(self._point_features(queries), self._point_features(x))
        return self.quant(h)  # (B, T, 2 * latent_channels)

    def encode(self, x: torch.Tensor, return_dict: bool = True, num_tokens: int = 2048, seed: int | None = None
               ) -> TripoSGEncoderOutput | tuple[DiagonalGaussianDistribution]:
        """Encodes surface samples ``(B, P, 3 + extra)`` (xyz + normals) into a latent distribution.

        Args:
            x: points with features, ``(B, P, 6)`` for the released model.
            return_dict: wrap in an output object.
            num_tokens: latent tokens per item (2048 for the released model).
            seed: seed of the random point subset; None is not reproducible (as upstream).

        Returns:
            ``latent_dist`` with ``mean``/``logvar`` of shape ``(B, num_tokens, latent_channels)``.
        """
        if x.ndim != 3 or x.shape[-1] < self.config.in_channels:
            raise ValueError(f"expected points of shape (B, P, >= {self.config.in_channels}), got {tuple(x.shape)}")
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode(part, num_tokens, seed) for part in x.split(self.slicing_length)])
        else:
            h = self._encode(x, num_tokens, seed)
        posterior = DiagonalGaussianDistribution(h)
        return TripoSGEncoderOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode(self, z: torch.Tensor, points: torch.Tensor, num_chunks: int, to_cpu: bool) -> torch.Tensor:
        features = self.decoder.latent_features(self.post_quant(z))
        outs = []
        # Query points never interact, so chunking over them is exact.
        for start in range(0, points.shape[1], num_chunks):
            chunk = points[:, start : start + num_chunks].to(device=z.device, dtype=z.dtype)
            out = self.decoder.query(features, self.embedder(chunk))
            outs.append(out.cpu() if to_cpu else out)
        return torch.cat(outs, dim=1)

    def decode(self, z: torch.Tensor, sampled_points: torch.Tensor, return_dict: bool = True, num_chunks: int = 50000,
               to_cpu: bool = False) -> TripoSGDecoderOutput | tuple[torch.Tensor]:
        """Evaluates the field of latents ``z (B, T, C)`` at ``sampled_points (B, Q, 3)``.

        Returns:
            ``sample (B, Q, 1)``: positive inside, negative outside, surface at 0.
        """
        if self.use_slicing and z.shape[0] > 1:
            parts = zip(z.split(self.slicing_length), sampled_points.split(self.slicing_length))
            decoded = torch.cat([self._decode(zi, pi, num_chunks, to_cpu) for zi, pi in parts])
        else:
            decoded = self._decode(z, sampled_points, num_chunks, to_cpu)
        return TripoSGDecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("use TripoSGVAEModel.encode(...) or .decode(...)")
