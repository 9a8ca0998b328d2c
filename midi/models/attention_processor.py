"""Attention processors of the TripoSG DiT / VAE and MIDI's multi-instance attention.

Both processors plug into diffusers' :class:`~diffusers.models.attention_processor.Attention`
module (which owns ``to_q/to_k/to_v/to_out``, ``norm_q/norm_k`` and ``norm_cross``); only the way
q, k and v are cut from the projections and how tokens are grouped is ours.

The released weights expect a *head-major* layout (upstream-facts 3.1): for self-attention the
projections are concatenated ``[to_q(x) | to_k(x) | to_v(x)]`` and viewed as ``(B, T, H, 3D)``, so
head ``h`` takes its query, key and value from consecutive ``D``-wide slices of that concatenation.
For cross-attention the query is a plain ``to_q``, and ``[to_k(e) | to_v(e)]`` is viewed as
``(B, M, H, 2D)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

NumInstances = int | Sequence[int] | torch.Tensor | None


def project_qkv(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ``q (B, H, T, D)``, ``k, v (B, H, M, D)`` with the head-major split and the q/k RMS norms,
    from queries' input ``(B, T, C)`` and keys/values' input ``(B, M, C_enc)`` (None: self-attention)."""
    batch, num_tokens, _ = hidden_states.shape
    heads = attn.heads
    query = attn.to_q(hidden_states)
    kv_input = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross is not None:
        kv_input = attn.norm_cross(kv_input)
    key, value = attn.to_k(kv_input), attn.to_v(kv_input)
    head_dim = key.shape[-1] // heads

    if not attn.is_cross_attention:
        # (B, T, 3C) -> (B, T, H, 3D): head h reads [3hD, 3hD + 3D) of the concatenation.
        qkv = torch.cat([query, key, value], dim=-1).view(batch, num_tokens, heads, 3 * head_dim)
        query, key, value = qkv.split(head_dim, dim=-1)
    else:
        kv = torch.cat([key, value], dim=-1).view(batch, key.shape[1], heads, 2 * head_dim)  # (B, M, H, 2D)
        key, value = kv.split(head_dim, dim=-1)
        query = query.view(batch, num_tokens, heads, head_dim)

    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, T, D)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def project_out(attn: Attention, out: torch.Tensor, query_dtype: torch.dtype) -> torch.Tensor:
    """Merges heads ``(B, H, T, D) -> (B, T, H*D)`` and applies ``to_out``."""
    batch, heads, num_tokens, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim).to(query_dtype)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """Attention where each run of ``group`` consecutive rows shares one token set.

    Instead of repeating the group's keys/values once per instance (upstream), the group's rows
    are folded into a single sequence of ``group * T`` tokens and attended in one call: every
    query of instance i sees the tokens of all instances of its scene, itself included.
    """
    batch, heads, num_tokens, head_dim = q.shape
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v)

    def fold(t: torch.Tensor) -> torch.Tensor:
        # (G*n, H, T, D) -> (G, H, n*T, D), instance-major along the token axis.
        t = t.view(batch // group, group, heads, t.shape[2], head_dim).transpose(1, 2)
        return t.reshape(batch // group, heads, group * t.shape[3], head_dim)

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v))  # (G, H, n*T, D)
    out = out.view(batch // group, heads, group, num_tokens, head_dim).transpose(1, 2)
    return out.reshape(batch, heads, num_tokens, head_dim)


def _as_int_list(num_instances: NumInstances) -> list[int] | int:
    if isinstance(num_instances, torch.Tensor):
        num_instances = num_instances.tolist()
    if isinstance(num_instances, int | float) and not isinstance(num_instances, bool):
        return int(num_instances)
    if isinstance(num_instances, list | tuple):
        return [int(n) for n in num_instances]
    raise ValueError(f"num_instances must be an int or a list of per-scene ints, got {type(num_instances).__name__}")


def plan_instance_groups(batch_size: int, num_instances: NumInstances, num_instances_per_batch: int | None = None
                         ) -> list[tuple[int, int, int]]:
    """Splits the rows of a batch into runs that share multi-instance attention.

    Args:
        batch_size: rows fed to the attention.
        num_instances: an int ``n`` (consecutive groups of ``n`` rows are one scene, as at
            inference), or a list of per-scene counts. With ``num_instances_per_batch = M``
            every scene occupies ``M`` rows of which the first ``n_s`` are real instances and
            the rest padding (upstream's training layout); with ``num_instances_per_batch=None``
            scenes are packed back to back without padding. A list is repeated while rows
            remain, so a classifier-free-guidance batch ``[uncond; cond]`` reuses it.
        num_instances_per_batch: rows per scene in the padded layout, or None.

    Returns:
        ``(start, num_rows, group)`` runs covering the batch in order; ``group`` rows share keys.

    Raises:
        ValueError: when the counts do not tile the batch.
    """
    counts = _as_int_list(num_instances)
    if isinstance(counts, int):
        if counts < 1 or batch_size % counts != 0:
            raise ValueError(f"multi-instance attention got num_instances={counts} but a batch of {batch_size} rows; "
                             "the batch must be a whole number of scenes (a multiple of num_instances)")
        return [(0, batch_size, counts)]
    if not counts or min(counts) < 1:
        raise ValueError(f"num_instances must list positive per-scene counts, got {counts}")
    if num_instances_per_batch is not None and max(counts) > num_instances_per_batch:
        raise ValueError(f"num_instances {counts} has a scene with more instances than "
                         f"num_instances_per_batch={num_instances_per_batch}")
    rows_per_pass = len(counts) * num_instances_per_batch if num_instances_per_batch else sum(counts)
    if batch_size % rows_per_pass != 0:
        raise ValueError(f"multi-instance attention got num_instances={counts} (num_instances_per_batch="
                         f"{num_instances_per_batch}), which covers {rows_per_pass} rows, but the batch has "
                         f"{batch_size} rows (expected a multiple of {rows_per_pass})")
    runs: list[tuple[int, int, int]] = []
    start = 0
    while start < batch_size:
        for n in counts:
            runs.append((start, n, n))
            start += n
            if num_instances_per_batch:
                padding = num_instances_per_batch - n
                if padding:
                    runs.append((start, padding, 1))  # padding rows: plain self-attention
                start += padding
    return runs


def multi_instance_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_instances: NumInstances,
                             num_instances_per_batch: int | None = None) -> torch.Tensor:
    """Self-attention of ``q, k, v (B, H, T, D) -> (B, H, T, D)`` in which the instances of one scene attend to
    each other's tokens; ``num_instances``, ``num_instances_per_batch``: see :func:`plan_instance_groups`."""
    runs = plan_instance_groups(q.shape[0], num_instances, num_instances_per_batch)
    if len(runs) == 1:
        return _grouped_attention(q, k, v, runs[0][2])
    return torch.cat([_grouped_attention(q[s : s + n], k[s : s + n], v[s : s + n], group) for s, n, group in runs])


class TripoSGAttnProcessor2_0:
    """TripoSG's default processor: head-major q/k/v split, q/k RMS norm, plain SDPA.

    It accepts (and ignores) MIDI's multi-instance keyword arguments, so one
    ``attention_kwargs`` dict can be passed to every attention module without warnings.
    """

    use_mi = False  # MIAttnProcessor2_0(use_mi=True) turns multi-instance attention on

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None, num_instances: NumInstances = None,
                 num_instances_per_batch: int | None = None) -> torch.Tensor:
        if image_rotary_emb is not None:
            raise NotImplementedError("rotary embeddings are not used by TripoSG/MIDI-3D")
        if not self.use_mi:
            q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
            return project_out(attn, F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask), q.dtype)
        if encoder_hidden_states is not None:
            raise ValueError("multi-instance attention is only defined for self-attention modules")
        if num_instances is None:
            # Upstream silently returns garbage here; an explicit error is the only safe answer.
            raise ValueError(
                "multi-instance attention is enabled but no num_instances was given: pass "
                "attention_kwargs={'num_instances': <instances per scene>} to the transformer/pipeline"
            )
        q, k, v = project_qkv(attn, hidden_states, None)
        return project_out(attn, multi_instance_attention(q, k, v, num_instances, num_instances_per_batch), q.dtype)


class MIAttnProcessor2_0(TripoSGAttnProcessor2_0):
    """MIDI's processor; with ``use_mi=True`` the instances of a scene share keys/values.

    Args:
        use_mi: enable multi-instance attention (self-attention modules only). With False the
            processor computes exactly what :class:`TripoSGAttnProcessor2_0` computes.
    """

    def __init__(self, use_mi: bool = True) -> None:
        self.use_mi = use_mi

    def __repr__(self) -> str:
        return f"MIAttnProcessor2_0(use_mi={self.use_mi})"
