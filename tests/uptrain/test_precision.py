"""precision: auto takes bf16 only where the device multiplies bf16 natively, and the run reports what it used."""

from __future__ import annotations

import pytest
import torch

from kvshrink.convert import precision as precision_module
from kvshrink.convert.precision import resolved_precision
from kvshrink.uptrain import load_recipe, uptrain


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")],
)
def test_auto_on_cpu_follows_the_cpus_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolved_precision("auto", torch.device("cpu")) == expected


def test_auto_keeps_fp32_where_it_cannot_tell(monkeypatch):
    """A torch without the private CPU probes, and devices other than CPU and CUDA, stay in fp32."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolved_precision("auto", torch.device("cpu")) == "fp32"
    assert resolved_precision("auto", torch.device("mps")) == "fp32"


@pytest.mark.parametrize("given", ["fp32", "bf16"])
def test_a_named_precision_is_kept_whatever_the_device(monkeypatch, given):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: given == "fp32")
    assert resolved_precision(given, torch.device("cpu")) == given


@pytest.mark.parametrize("native", [False, True])
def test_an_auto_run_reports_and_uses_the_precision_it_resolved(monkeypatch, tiny_llama_dir, write_recipe, native):
    """Distilling a model from itself: in fp32 the first KL is exactly zero; in bf16 the teacher is held in bf16
    and the student multiplies under bf16 autocast, so the two differ by bf16 rounding."""
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    report = uptrain(load_recipe(write_recipe(
        model=str(tiny_llama_dir), teacher=str(tiny_llama_dir), loss={"kind": "distill"}, max_steps=1,
        precision="auto",
    )))
    assert report["precision"] == ("bf16" if native else "fp32")
    if native:
        assert 0.0 < report["loss_start"] < 0.05
    else:
        assert report["loss_start"] == 0.0
