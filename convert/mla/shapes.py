"""The MLA shape (kv_lora_rank, rope dim) from the user's size option, checked against the source and the engine.

Exactly one of --kv-rank, --kv-budget, --mla-shape sets the size. Under a serving target whose engine takes only
some shapes (vLLM: 512+64 and 256+64, see `engines`), a budget snaps to the largest servable shape whose KV
fraction is at most the budget, and an explicit shape or rank must be one of them; the rope dim is the engine's
(64). Every refusal names the nearest servable choice, or --target transformers, which takes any shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvshrink.convert.attention import HeadCounts
from kvshrink.convert.engines import EngineRules
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.options import MLA_SHAPE, MlaOptions

ENGINE_ROPE_DIM = 64  # every shape vLLM's MLA kernels take has a 64-dim rope key


@dataclass(frozen=True)
class MlaShape:
    kv_rank: int  # R: latent width (kv_lora_rank)
    rope_dim: int  # D: shared rope key width (qk_rope_head_dim)
    nope_dim: int  # qk_nope_head_dim: the source head_dim, or 0 when every rotary component keeps RoPE
    head_dim: int  # source head_dim = v_head_dim


def _parse_mla_shape(request: MlaOptions) -> tuple[int | str | None, int | str | None]:
    """(kv rank, rope dim) as requested (`MlaOptions` has checked that exactly one size was given, well formed)."""
    if request.mla_shape is None:
        return request.kv_rank, request.rope_dim
    rank, rope = MLA_SHAPE.match(request.mla_shape).groups()
    return int(rank), int(rope)


def _full_rank(counts: HeadCounts, rope_dim: int, latent_inputs: int) -> tuple[int, int]:
    """(qk_nope_head_dim, the largest useful latent rank) for this rope dim."""
    nope_dim = 0 if rope_dim == counts.num_kv_heads * counts.head_dim else counts.head_dim
    return nope_dim, min(counts.num_kv_heads * (nope_dim + counts.head_dim), latent_inputs)


def _check_rank(kv_rank: int, full_rank: int, counts: HeadCounts, nope_dim: int, latent_inputs: int) -> None:
    if not 1 <= kv_rank <= full_rank:
        raise KvshrinkError(
            f"kv rank {kv_rank} is impossible here: the joint K/V latent has rank at most {full_rank} "
            f"({counts.num_kv_heads} KV heads x {nope_dim + counts.head_dim} K_nope+V dims, {latent_inputs} inputs); "
            f"pass 1..{full_rank} or 'full'"
        )


def free_shape(counts: HeadCounts, request: MlaOptions, latent_inputs: int, one_per_frequency: bool) -> MlaShape:
    """Any shape the source allows (--target transformers, or an engine with no shape list).

    `one_per_frequency`: the rope key may hold one component per frequency only (default RoPE of serving engines).
    """
    d, kv_heads = counts.head_dim, counts.num_kv_heads
    all_rope = kv_heads * d
    max_rope = d if one_per_frequency else all_rope
    kv_rank, rope_dim = _parse_mla_shape(request)
    if rope_dim is None:
        # At most half a head: 64-wide heads keep more latent rank, which trained better (SmolLM2 at 50% KV: README,
        # "Shipped recipes"); under a serving layout heads of 128 and wider get the 64 of DeepSeek's shapes.
        half_head = max(2, d // 2)
        rope_dim = min(ENGINE_ROPE_DIM, half_head) if one_per_frequency else half_head
    elif rope_dim == "all":
        if one_per_frequency and kv_heads > 1:
            raise KvshrinkError(
                f"--rope-dim all needs {all_rope} rope dims ({kv_heads} KV heads x {d}), but serving engines take "
                f"at most one component per frequency ({d} dims): pass --rope-dim {d} or less, or --target "
                "transformers for the exact form"
            )
        rope_dim = all_rope
    rope_dim = int(rope_dim)
    if rope_dim < 2 or rope_dim % 2:
        raise KvshrinkError(f"--rope-dim {rope_dim} must be an even number >= 2 (rotary dims come in pairs)")
    if rope_dim > max_rope:
        where = ("serving engines take one component per frequency" if one_per_frequency
                 else f"the source has {kv_heads} KV heads x {d}")
        raise KvshrinkError(
            f"--rope-dim {rope_dim} is more than the {max_rope} rotary dims available ({where}): pass at most "
            f"{max_rope}"
            + (", or --target transformers" if one_per_frequency and kv_heads > 1 else "")
        )
    nope_dim, full_rank = _full_rank(counts, rope_dim, latent_inputs)
    if request.kv_budget is not None:
        values = round(float(request.kv_budget) * 2 * kv_heads * d)
        if values - rope_dim < 1:
            raise KvshrinkError(
                f"--kv-budget {request.kv_budget} leaves no latent: {values} values per token per layer are not more "
                f"than --rope-dim {rope_dim}; raise the budget or lower --rope-dim"
            )
        kv_rank = min(values - rope_dim, full_rank)
    elif kv_rank == "full":
        kv_rank = full_rank
    _check_rank(int(kv_rank), full_rank, counts, nope_dim, latent_inputs)
    return MlaShape(kv_rank=int(kv_rank), rope_dim=rope_dim, nope_dim=nope_dim, head_dim=d)


def _fraction(rank: int, rope: int, counts: HeadCounts) -> float:
    return (rank + rope) / (2 * counts.num_kv_heads * counts.head_dim)


def reachable_shapes(counts: HeadCounts, rules: EngineRules, latent_inputs: int) -> list[tuple[int, int, float]]:
    """(kv rank, rope dim, KV fraction) of the engine's shapes this source can fill and that shrink its cache."""
    reachable = []
    for rank, rope in rules.shapes or ():
        nope_dim, full_rank = _full_rank(counts, rope, latent_inputs)
        if rope <= counts.head_dim and nope_dim + rope <= rules.max_qk_head_dim and rank <= full_rank:
            if _fraction(rank, rope, counts) < 1:
                reachable.append((rank, rope, _fraction(rank, rope, counts)))
    return sorted(reachable, key=lambda shape: shape[2])


def _no_shape_reason(counts: HeadCounts, rules: EngineRules, latent_inputs: int) -> str:
    d, values = counts.head_dim, 2 * counts.num_kv_heads * counts.head_dim
    if d < ENGINE_ROPE_DIM:
        return (f"head_dim {d} has {d // 2} rotary frequencies, fewer than the {ENGINE_ROPE_DIM // 2} a "
                f"{ENGINE_ROPE_DIM}-dim rope key needs")
    if d + ENGINE_ROPE_DIM > rules.max_qk_head_dim:
        return f"head_dim {d} + rope {ENGINE_ROPE_DIM} exceeds the {rules.max_qk_head_dim} QK head dim its prefill runs"
    _, full_rank = _full_rank(counts, ENGINE_ROPE_DIM, latent_inputs)
    why = [f"{rank}+{rope} is {rank + rope} values, not fewer than the source's {values}" if rank + rope >= values
           else f"{rank}+{rope} needs a latent of rank {rank}, more than this source's {full_rank}"
           for rank, rope in rules.shapes or ()]
    return "; ".join(why)


def _describe(shapes: list[tuple[int, int, float]]) -> str:
    return ", ".join(f"{rank}+{rope} ({fraction:.1%} KV)" for rank, rope, fraction in shapes)


def engine_shape(counts: HeadCounts, request: MlaOptions, rules: EngineRules, latent_inputs: int) -> MlaShape:
    """A shape the engine runs: a budget snaps down to one, an explicit shape or rank must be one."""
    reachable = reachable_shapes(counts, rules, latent_inputs)
    if not reachable:
        raise KvshrinkError(
            f"no shape {rules.name} runs fits this source: {_no_shape_reason(counts, rules, latent_inputs)}; "
            "pass --target transformers"
        )
    kv_rank, rope_dim = _parse_mla_shape(request)
    if rope_dim is not None and rope_dim != ENGINE_ROPE_DIM:
        asked = f"--mla-shape {request.mla_shape}" if request.mla_shape else f"--rope-dim {rope_dim}"
        raise KvshrinkError(
            f"{asked}: {rules.name}'s MLA kernels take a {ENGINE_ROPE_DIM}-dim rope key; servable "
            f"shapes for this source: {_describe(reachable)}; or pass --target transformers"
        )
    if request.kv_budget is not None:
        fitting = [shape for shape in reachable if shape[2] <= float(request.kv_budget) + 1e-9]
        if not fitting:
            raise KvshrinkError(
                f"--kv-budget {request.kv_budget} has no shape {rules.name} runs: this source reaches "
                f"{_describe(reachable)}; pass --kv-budget {reachable[0][2]:.3f} or more, or --target transformers"
            )
        kv_rank = fitting[-1][0]
    elif kv_rank == "full" or (int(kv_rank), ENGINE_ROPE_DIM) not in {(r, p) for r, p, _ in reachable}:
        asked = f"--mla-shape {request.mla_shape}" if request.mla_shape else f"--kv-rank {kv_rank}"
        raise KvshrinkError(
            f"{asked} has no {rules.name} backend: servable shapes for this source are {_describe(reachable)}; "
            "pass one of them, or --target transformers for any shape"
        )
    nope_dim, _ = _full_rank(counts, ENGINE_ROPE_DIM, latent_inputs)
    return MlaShape(kv_rank=int(kv_rank), rope_dim=ENGINE_ROPE_DIM, nope_dim=nope_dim, head_dim=counts.head_dim)


def resolve_shape(counts: HeadCounts, request: MlaOptions, rules: EngineRules | None, latent_inputs: int) -> MlaShape:
    """The shape to convert to: free under --target transformers (`rules` None), else what the engine runs."""
    if rules is None or rules.shapes is None:
        return free_shape(counts, request, latent_inputs, one_per_frequency=rules is not None)
    return engine_shape(counts, request, rules, latent_inputs)
