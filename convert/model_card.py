"""README.md for every output folder: what the checkpoint is, what it costs, and where it runs.

Written from the report alone (as mergekit writes a card for each merge), so it says only what the conversion
measured or the engine rules state: source, method, shape, KV saving, the check's perplexities, the engines it is
valid for and why the others are not, and how to load and serve it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_FILE = "kvshrink_report.json"  # what a conversion writes beside its weights; uptrain and eval read it

CARD_FILE = "README.md"


def _shape_lines(report: dict[str, Any]) -> list[str]:
    if "mla" in report:
        mla = report["mla"]
        return [
            f"- attention: DeepSeek MLA, kv_lora_rank {mla['kv_lora_rank']} + rope {mla['qk_rope_head_dim']} "
            f"(qk_nope_head_dim {mla['qk_nope_head_dim']}, v_head_dim {mla['v_head_dim']})",
            f"- target: `{report['target']}`",
        ]
    if "linear_attention" in report:
        linear, bytes_held = report["linear_attention"], report["bytes_held_per_token_at_context"]
        return [
            f"- layers made Mamba-2 mixers (GraniteMoeHybrid `mamba`): {linear['linear_layers']} "
            f"({linear['layer_choice']}), initialized from their attention; the rest keep it exactly",
            f"- their state: {linear['recurrent_state_bytes']:,} bytes per sequence at any length",
            *[f"- cache + state per token at {int(n):,} tokens: {held['source']:,.0f} -> {held['target']:,.0f} bytes"
              for n, held in bytes_held.items()],
        ]
    heads = report.get("target_heads") or {}
    return [f"- attention: {report['source_heads']['kv']} -> {heads.get('kv', '?')} KV heads "
            f"({heads.get('query', report['source_heads']['query'])} query heads)"]


def _fit_lines(report: dict[str, Any]) -> list[str]:
    fit = report.get("fit")
    if not fit:
        return ["- layers: the closed-form conversion alone (not fitted)"]
    kept = fit["kept_closed_form"]
    return [
        f"- layers: {fit['layers_fitted']} converted layers fitted, one at a time, to the source attention's "
        f"output on the calibration text `{fit['text']}` (AdamW, at most {fit['steps']} steps of "
        f"{fit['micro_batch_size']} windows, early-stopped on {fit['heldout_windows']} held-out windows): mean "
        f"held-out relative error {fit.get('heldout_relative_start_mean', 0):.4f} -> "
        f"{fit.get('heldout_relative_end_mean', 0):.4f}"
        + (
            f"; {len(kept)} kept their closed form ({', '.join(f'layer {k}: {v}' for k, v in kept.items())})"
            if kept else ""
        )
    ]


def _check_lines(report: dict[str, Any]) -> list[str]:
    check = report.get("check")
    if not check:
        return ["Not checked (converted with --no-check)."]
    lines = [
        f"Perplexity on {check['tokens']} tokens of the {check.get('text', 'calibration text')} "
        f"({check['window']}-token windows): source "
        f"{check['source_perplexity']:.3f}, this checkpoint {check['converted_perplexity']:.3f}."
    ]
    other = check.get("other_target")
    if other and "perplexity" in other:
        lines.append(f"The same conversion for `--target {other['target']}` scores {other['perplexity']:.3f} "
                     f"(serving layout's cost: {check['serving_perplexity_cost']:+.3f}).")
    elif other:
        lines.append(f"`--target {other['target']}` refused this source: {other['refused']}")
    return lines


def _engine_lines(report: dict[str, Any], folder: str) -> list[str]:
    valid = report.get("valid_engines", ["transformers"])
    lines = [f"Valid in: {', '.join(valid)}." if "valid_engines" in report else
             "Loads in: transformers (its source class); kvshrink checks no serving engine for this format."]
    for engine, reason in (report.get("excluded_engines") or {}).items():
        lines.append(f"- not {engine}: {reason}")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype='bfloat16')",
              f"tokenizer = AutoTokenizer.from_pretrained({folder!r})", "```"]
    if "vllm" in valid:
        lines += ["", "```bash", f"vllm serve {folder} --dtype bfloat16", "```"]
    if "sglang" in valid:
        backend = "" if report.get("mla", {}).get("kv_lora_rank", 512) == 512 else " --attention-backend triton"
        lines += [
            "", "```bash", f"python -m sglang.launch_server --model-path {folder} --dtype bfloat16{backend}", "```"
        ]
    if "mla" in report:
        lines += ["", "Serve in bfloat16 (or float32): the latent norm is made linear by a tiny latent scale that "
                      "float16 would flush to subnormals."]
    return lines


def model_card(report: dict[str, Any], folder: str) -> str:
    """The card's markdown for the conversion `report` written to `folder`."""
    kv = report["kv_bytes_per_token"]
    lines = [
        f"# {Path(folder).name}", "",
        f"Converted by kvshrink {report['versions']['kvshrink']} from `{report['source']}` "
        f"({report['source_architecture']}) to {report['target_architecture']}; it loads in stock transformers "
        f"{report['versions']['transformers']} with no custom code.", "",
        "## Conversion", "",
        f"- method: `{report['method']}`",
        *_shape_lines(report),
        *(_fit_lines(report) if "fit" in report else []),
        f"- KV cache per token: {kv['source']:,} -> {kv['target']:,} bytes ({report['kv_fraction']:.1%} of the "
        f"source, {kv['source'] / kv['target']:.2f}x smaller)",
        *[f"- note: {note}" for note in report.get("notes", [])],
        "", "## Quality (no training)", "", *_check_lines(report),
        "", "## Where it runs", "", *_engine_lines(report, folder),
        "", "The full record, per-layer errors included, is `kvshrink_report.json` in this folder.", "",
    ]
    return "\n".join(lines)


def write_model_card(report: dict[str, Any], folder: Path, name: str) -> None:
    """Write README.md into `folder` (the staging folder), naming the model by its final `name`."""
    (folder / CARD_FILE).write_text(model_card(report, name))
