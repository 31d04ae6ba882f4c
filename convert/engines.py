"""What the serving engines accept in a DeepseekV2/V3 checkpoint: rules as data, each read from the engine's source.

A DeepseekV3 folder that stock transformers loads is not automatically one vLLM or SGLang runs correctly: their MLA
kernels take few cache widths, they rewrite RoPE types, they ignore layout flags and biases. Each rule below names
the file and commit it was read from (vllm-project/vllm, sgl-project/sglang), so a rule can be re-checked when an
engine changes. `engine_problems` reads a converted config.json against one engine's rules; `valid_engines` is
what the report, the printed summary and the model card say. `class_engines` says the same for an
`add-sliding-window` output (which engines run its class with the per-layer windows of `layer_types`) and an
`add-linear-attention` output (which run its GraniteMoeHybrid layers as written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvshrink.convert.errors import KvshrinkError

TRANSFORMERS_LATENT_EPS = 1e-6  # transformers' DeepseekV3 builds kv_a_layernorm with its default eps, not config's

VLLM_MLA = "vllm-project/vllm vllm/model_executor/layers/attention/mla_attention.py"
VLLM_PREFILL = "vllm-project/vllm vllm/v1/attention/backends/mla/prefill/flash_attn.py @0307fc6ced17"
VLLM_TRITON = "vllm-project/vllm vllm/v1/attention/backends/mla/triton_mla.py @0155494b1dca"
VLLM_MODEL = "vllm-project/vllm vllm/model_executor/models/deepseek_v2.py @b863fe5bf4e1"
VLLM_QWEN2 = "vllm-project/vllm vllm/model_executor/models/qwen2.py @cb24295ecafd"
VLLM_QWEN3 = "vllm-project/vllm vllm/model_executor/models/qwen3.py @002456df36fc"
VLLM_REGISTRY = "vllm-project/vllm vllm/model_executor/models/registry.py @0002bff0b6cb"
VLLM_TRANSFORMERS_BACKEND = "vllm-project/vllm vllm/model_executor/models/transformers/base.py @810fb5d66ecb"
VLLM_ENGINE_ARGS = "vllm-project/vllm vllm/engine/arg_utils.py @99d7eb5d6a51"
SGLANG_QWEN2 = "sgl-project/sglang python/sglang/srt/models/qwen2.py @36ce1f99e8ea"
VLLM_GRANITE_HYBRID = "vllm-project/vllm vllm/model_executor/models/granitemoehybrid.py @0195c9ec6ea9"
SGLANG_GRANITE_HYBRID_CONFIG = "sgl-project/sglang python/sglang/srt/configs/granitemoehybrid.py @7f1ce9b58bf7"
SGLANG_MODEL = "sgl-project/sglang python/sglang/srt/models/deepseek_v2.py @00114aef19bb"
SGLANG_DECODE = "sgl-project/sglang python/sglang/srt/layers/attention/triton_ops/decode_attention.py @83ea222010e3"


@dataclass(frozen=True)
class Rule:
    """One constraint and where it was read."""

    text: str
    source: str


@dataclass(frozen=True)
class EngineRules:
    """What one engine runs correctly in a DeepseekV2/V3 checkpoint (dense attention, q_lora_rank any)."""

    name: str
    shapes: tuple[tuple[int, int], ...] | None  # (kv_lora_rank, qk_rope_head_dim) some MLA backend runs; None: any
    max_qk_head_dim: int  # prefill attention runs at head dim qk_nope + qk_rope
    v_within_qk: bool  # V is zero-padded to the QK head dim in prefill, so v_head_dim <= qk_nope + qk_rope
    rope_types: tuple[str, ...]  # run as written; every other rope_type is rewritten to deepseek_yarn
    interleaved_rope_only: bool  # RoPE always on pairs (2i, 2i+1): rope_interleave is ignored
    attention_bias: bool  # whether q/kv_a/o projections may carry biases
    latent_eps_from_config: bool  # kv_a_layernorm runs at config.rms_norm_eps
    rules: tuple[Rule, ...]


VLLM = EngineRules(
    name="vllm",
    shapes=((512, 64), (256, 64)),
    max_qk_head_dim=256,
    v_within_qk=True,
    rope_types=("default", "yarn", "deepseek_yarn"),
    interleaved_rope_only=True,
    attention_bias=False,
    latent_eps_from_config=True,
    rules=(
        Rule("MLA backends take cache widths kv_lora_rank + qk_rope_head_dim of 576 (512+64) and, on current main, "
             "320 (256+64): MLACommonBackend.get_supported_head_sizes(); at commit 90b0a26e0e1a it returned [576] "
             "only, and FlashMLA / the sparse backends take 576 (or 512 without rope) only",
             f"{VLLM_MLA} @90b0a26e0e1a (and main, late 2026)"),
        Rule("prefill runs flash-attention at head dim qk_nope + qk_rope (at most 256) and zero-pads V to it",
             VLLM_PREFILL),
        Rule("DeepseekV2MLAAttention rewrites every rope_type but 'default' to 'deepseek_yarn' and multiplies the "
             "softmax scale by yarn_get_mscale(factor, mscale_all_dim)^2", VLLM_MODEL),
        Rule("get_rope(..., is_neox_style=False): RoPE on interleaved pairs whatever rope_interleave says",
             VLLM_MODEL),
        Rule("q_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj are built with bias=False", VLLM_MODEL),
        Rule("kv_a_layernorm = RMSNorm(kv_lora_rank, eps=config.rms_norm_eps)", VLLM_MODEL),
        Rule("TritonMLABackend.supported_dtypes = [float16, bfloat16]", VLLM_TRITON),
    ),
)

SGLANG = EngineRules(
    name="sglang",
    shapes=None,
    max_qk_head_dim=256,
    v_within_qk=True,
    rope_types=("default", "yarn", "deepseek_yarn"),
    interleaved_rope_only=True,
    attention_bias=False,
    latent_eps_from_config=True,
    rules=(
        Rule("the absorbed path runs RadixAttention at head dim kv_lora_rank + qk_rope_head_dim with no width rule "
             "in the model (the Triton backend serves it when no FlashInfer/FA3 backend is chosen)", SGLANG_MODEL),
        Rule("the Triton MLA decode takes any width (block = next power of two of it; 576 and 288 have tuned "
             "splits); FlashMLA-based backends were not read and are not promised: pass --attention-backend "
             "triton for widths other than 576", SGLANG_DECODE),
        Rule("the prefill path (attn_mha) runs at head dim qk_nope + qk_rope with V at v_head_dim", SGLANG_MODEL),
        Rule("any rope_scaling is rewritten to rope_type 'deepseek_yarn' and the softmax scale multiplied by "
             "yarn_get_mscale(factor, mscale_all_dim)^2", SGLANG_MODEL),
        Rule("get_rope(..., is_neox_style=False): interleaved pairs", SGLANG_MODEL),
        Rule("q_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj are built with bias=False", SGLANG_MODEL),
        Rule("kv_a_layernorm = RMSNorm(kv_lora_rank, eps=config.rms_norm_eps)", SGLANG_MODEL),
    ),
)

ENGINES = {rules.name: rules for rules in (VLLM, SGLANG)}
TARGETS = ("vllm", "sglang", "transformers")
ENGINE_NAMES = ("vllm", "sglang")


@dataclass(frozen=True)
class ClassServing:
    """Whether one engine runs an output's class with its per-layer `layer_types` (windows, Mamba-2 mixers), as
    read."""

    runs: bool
    how: str


# Per output class (model_type), what each engine's code does with layer_types; a class not listed was not read.
# Llama and Mistral are no output class: vLLM's Llama model (llama.py @e06c9ba2a6ea, which MistralForCausalLM maps to
# in the registry read) windows each 'sliding_attention' layer, but transformers 5.23's Llama has no window and its
# Mistral slides every layer; Ministral is the same layer (no biases) and runs layer_types in both.
CLASS_ENGINES: dict[str, dict[str, ClassServing]] = {
    "ministral": {
        "vllm": ClassServing(True, (
            f"no native class registers MinistralForCausalLM ({VLLM_REGISTRY}), so with the default --model-impl auto "
            "it falls back to the Transformers backend when transformers has the class and it is backend-compatible "
            f"(transformers 5.23: it is); that backend ({VLLM_TRANSFORMERS_BACKEND}, create_attention_instances) "
            "gives each layer whose layer_types entry is 'sliding_attention' the config's sliding_window and the other "
            f"layers none, and {VLLM_ENGINE_ARGS} leaves CacheConfig.sliding_window unset for mixed layer_types, so "
            "the full layers stay full")),
    },
    "qwen2": {
        "vllm": ClassServing(False, (
            f"the native Qwen2 model read ({VLLM_QWEN2}) raises 'Sliding window for some but all layers is not "
            "supported' when cache_config.sliding_window is set and the config has max_window_layers (a Qwen2Config "
            "always has), and otherwise builds every layer's Attention with no per-layer window, so every layer "
            "attends to all tokens; --model-impl transformers would run it through the Transformers backend "
            f"({VLLM_TRANSFORMERS_BACKEND}), which reads layer_types per layer (not run here)")),
        "sglang": ClassServing(False, (
            f"the Qwen2 model read ({SGLANG_QWEN2}) builds every layer's RadixAttention with no sliding window")),
    },
    "qwen3": {
        "vllm": ClassServing(False, (
            f"the native Qwen3 model read ({VLLM_QWEN3}) builds every layer's Attention with no per-layer window "
            "(its Qwen3Model subclasses qwen2.py's Qwen2Model); --model-impl transformers would run it through the "
            f"Transformers backend ({VLLM_TRANSFORMERS_BACKEND}), which reads layer_types per layer (not run here)")),
    },
}
CLASS_ENGINES["granitemoehybrid"] = {
    "vllm": ClassServing(False, (
        f"its GraniteMoeHybrid model ({VLLM_GRANITE_HYBRID}) builds these layers (a dense shared_mlp when "
        "num_local_experts is 0, MambaMixer2 with in/out biases from mamba_proj_bias, attention scaled by "
        "attention_multiplier) and keys its layer table by the 'attention'/'mamba' spelling written here, but it "
        "reads layer_types from the config transformers loads, and transformers 5 renames them on load to "
        "'full_attention'/'linear_attention', which that table lacks; it also takes head_dim as hidden_size // "
        "num_attention_heads: not run here, so not claimed")),
    "sglang": ClassServing(False, (
        f"its GraniteMoeHybridConfig ({SGLANG_GRANITE_HYBRID_CONFIG}) accepts the 'mamba'/'attention' layer_types "
        "written here, but reads RoPE from top-level rope_theta/rope_scaling, which this output's rope_parameters "
        "does not set, so it would rotate at its default theta of 10000: not claimed")),
}
NOT_READ = "not verified: kvshrink has not read this engine's model code for the class"


def class_engines(model_type: str) -> tuple[list[str], dict[str, str], list[str]]:
    """For a `model_type` checkpoint with per-layer `layer_types` (windows, Mamba-2 mixers): (engines that run it as
    written, transformers first; {other engine: why not}; how each listed engine runs it), for the report and the
    model card."""
    valid, excluded, how = ["transformers"], {}, []
    read = CLASS_ENGINES.get(model_type, {})
    for engine in ENGINE_NAMES:
        serving = read.get(engine)
        if serving and serving.runs:
            valid.append(engine)
            how.append(f"{engine}: {serving.how}")
        else:
            excluded[engine] = serving.how if serving else NOT_READ
    return valid, excluded, how


def target_rules(target: str) -> EngineRules | None:
    """The rules a conversion for `target` must satisfy; None for transformers, which loads any DeepseekV3 shape."""
    if target not in TARGETS:
        raise KvshrinkError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    return ENGINES.get(target)


def _rope_problem(rope: dict[str, Any], rules: EngineRules) -> str | None:
    rope_type = rope.get("rope_type", "default")
    if rope_type not in rules.rope_types:
        return f"rope_type {rope_type!r} is rewritten to deepseek_yarn there, so its frequencies would be wrong"
    if rope_type != "default":
        if float(rope.get("mscale", 0) or 0) != float(rope.get("mscale_all_dim", 0) or 0):
            return "yarn with mscale != mscale_all_dim scales cos/sin there"
        if float(rope.get("mscale_all_dim", 0) or 0) and float(rope.get("factor", 1)) > 1:
            return "yarn with a nonzero mscale_all_dim rescales attention there"
    return None


def engine_problems(config: dict[str, Any], rules: EngineRules) -> list[str]:
    """Why `rules.name` would not run the DeepseekV3 `config` (a config.json dict) as transformers does; [] if it
    would."""
    rank, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    nope, value = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    problems = []
    if rules.shapes is not None and (rank, rope) not in rules.shapes:
        accepted = ", ".join(f"{r}+{d}" for r, d in rules.shapes)
        problems.append(f"no MLA backend takes kv_lora_rank+rope {rank}+{rope} (accepted: {accepted})")
    if nope + rope > rules.max_qk_head_dim:
        problems.append(f"prefill cannot run QK head dim {nope + rope} (at most {rules.max_qk_head_dim})")
    if rules.v_within_qk and value > nope + rope:
        problems.append(f"prefill pads V to the QK head dim, so v_head_dim {value} must not exceed {nope + rope}")
    rope_problem = _rope_problem(config.get("rope_parameters") or {}, rules)
    if rope_problem:
        problems.append(rope_problem)
    if rules.interleaved_rope_only and config.get("rope_interleave") is False:
        problems.append("rope_interleave is False, but the engine always rotates interleaved pairs")
    if not rules.attention_bias and config.get("attention_bias"):
        problems.append("attention_bias is set, but the engine builds its attention projections without biases")
    eps = float(config.get("rms_norm_eps", TRANSFORMERS_LATENT_EPS))
    if rules.latent_eps_from_config and eps != TRANSFORMERS_LATENT_EPS:
        problems.append(f"its latent norm runs at rms_norm_eps {eps:g}, transformers' at {TRANSFORMERS_LATENT_EPS:g}")
    return problems


def valid_engines(config: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(engines that run `config` as transformers does, transformers first; {excluded engine: why})."""
    valid, excluded = ["transformers"], {}
    for name, rules in ENGINES.items():
        problems = engine_problems(config, rules)
        if problems:
            excluded[name] = "; ".join(problems)
        else:
            valid.append(name)
    return valid, excluded


def engine_rules_table() -> list[dict[str, str]]:
    """Every rule with its engine and source, for the report and the model card."""
    return [{"engine": rules.name, "rule": rule.text, "source": rule.source} for rules in ENGINES.values()
            for rule in rules.rules]
