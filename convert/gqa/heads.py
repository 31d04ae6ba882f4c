"""Per-head views of attention weights shared by the calibrated merging methods.

Rows are augmented [W | b] and rotary pairs complex, as `kvshrink.convert.maths` writes them; RoPE multiplies a
pair by e^{i·θ_j·position}, so a complex gain on a pair commutes with RoPE.
"""

from __future__ import annotations

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.maths import augmented, from_complex, pair_halves, split_augmented, to_complex


def per_head(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[heads * d, cols] -> [heads, d, cols]."""
    return rows.reshape(-1, head_dim, rows.shape[-1])


# Query heads handled at once where a product per head under the [hidden + 1]² moment would otherwise be alive for
# all of them (a 70B-width layer's 64 heads: 537 MB per float64 copy of the query rows).
HEAD_CHUNK = 8


def head_chunks(heads: int) -> tuple[torch.Tensor, ...]:
    """Head indices HEAD_CHUNK at a time."""
    return torch.arange(heads).split(HEAD_CHUNK)


def head_rows(rows: torch.Tensor, index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of heads `index` (one head's d rows each, in that order) of [heads·d, c] rows."""
    return rows.reshape(-1, head_dim, rows.shape[-1])[index].reshape(-1, rows.shape[-1])


def head_bias(bias: torch.Tensor | None, index: torch.Tensor, head_dim: int) -> torch.Tensor | None:
    return None if bias is None else bias.reshape(-1, head_dim)[index].reshape(-1)


def output_columns(o: torch.Tensor, index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj's columns of query heads `index` as float64 [len(index), hidden, d]."""
    return o.reshape(o.shape[0], -1, head_dim)[:, index].permute(1, 0, 2).double()


def permute_kv_heads(attention: AttentionWeights, order: list[int]) -> AttentionWeights:
    """KV head p of the result is source KV head order[p], and its query heads (q rows, q bias, o columns) move
    with it, so the stock pairing i // (H / KV) still holds: the model computes exactly the same function."""
    if order == sorted(order):  # the stock grouping: nothing moves, and a copy of a wide layer costs its size
        return attention
    d, ratio = attention.head_dim, attention.queries_per_kv_head
    kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in order])
    q_rows = torch.cat([torch.arange(h * ratio * d, (h + 1) * ratio * d) for h in order])

    def take(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
        return None if tensor is None else tensor[index]

    return attention.with_kv(
        q=attention.q[q_rows], q_bias=take(attention.q_bias, q_rows),
        k=attention.k[kv_rows], k_bias=take(attention.k_bias, kv_rows),
        v=attention.v[kv_rows], v_bias=take(attention.v_bias, kv_rows),
        o=attention.o[:, q_rows],
    )


def consecutive_groups(num_kv_heads: int, groups: int) -> list[list[int]]:
    """The stock grouping: runs of num_kv_heads / groups consecutive heads."""
    size = num_kv_heads // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


def fold_key_gains(attention: AttentionWeights, gains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Query rows and bias that keep every logit when each key pair k̃_hj is replaced by k̃_hj / gains[h, j].

    The logit of pair j is Re(q̃ conj(k̃) e^{iθ(m−n)}); multiplying q̃ by conj(gain) compensates exactly, at every
    relative position, because a complex gain commutes with RoPE's rotation.
    """
    d = attention.head_dim
    per_query = gains.repeat_interleave(attention.queries_per_kv_head, dim=0)  # [H, d/2]
    real, imag = per_query.real[..., None], per_query.imag[..., None]

    def folded(rows: torch.Tensor) -> torch.Tensor:  # (r + i r')·conj(a + ib) = (a r + b r') + i (a r' − b r)
        result = torch.empty_like(rows)
        for heads in head_chunks(attention.num_heads):  # in float64, a few heads at a time
            block = rows.reshape(attention.num_heads, d, -1)[heads].double()
            pair, partner = pair_halves(block, 1)
            mixed = torch.cat(
                [real[heads] * pair + imag[heads] * partner, real[heads] * partner - imag[heads] * pair], 1
            )
            result.view(attention.num_heads, d, -1)[heads] = mixed.to(rows.dtype)
        return result

    q_bias = attention.q_bias
    return folded(attention.q), None if q_bias is None else folded(q_bias[:, None])[:, 0]


def rotate_keys(attention: AttentionWeights, gains: torch.Tensor) -> AttentionWeights:
    """Divide each key pair k̃_hj by gains[h, j] (complex, [KV, d/2]) and compensate in the queries: same logits."""
    keys = to_complex(augmented(attention.k, attention.k_bias), attention.head_dim) / gains[..., None]
    k, k_bias = split_augmented(from_complex(keys), attention.k_bias is not None)
    q, q_bias = fold_key_gains(attention, gains)
    return attention.with_kv(q=q, q_bias=q_bias, k=k, k_bias=k_bias)


def rotate_values(attention: AttentionWeights, rotations: torch.Tensor) -> AttentionWeights:
    """Rotate each KV head's values by an orthogonal [KV, d, d] matrix and absorb its transpose into the o_proj
    columns of that head's query heads: o_proj · v is unchanged."""
    d = attention.head_dim
    values = rotations @ per_head(augmented(attention.v, attention.v_bias), d)
    v, v_bias = split_augmented(values.reshape(-1, values.shape[-1]), attention.v_bias is not None)
    per_query = rotations.repeat_interleave(attention.queries_per_kv_head, dim=0)  # [H, d, d]
    outputs = attention.o.double().reshape(attention.o.shape[0], attention.num_heads, d).permute(1, 0, 2)
    o = (outputs @ per_query.mT).permute(1, 0, 2).reshape(attention.o.shape[0], -1)
    return attention.with_kv(v=v, v_bias=v_bias, o=o.float().contiguous())
