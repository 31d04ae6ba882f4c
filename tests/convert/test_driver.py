"""The conversion driver: a new converter is a method (refusals, sized targets, calibration, plan, convert_layer)
and nothing else. A method that changes nothing must give back the source, byte for byte, for every target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from safetensors.torch import load_file

from kvshrink.convert.calibration import AttentionInputs, Calibration
from kvshrink.convert.driver import LayerResult, Plan, TargetPlan, calibration_inputs, convert
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.fitting import UNCHANGED
from kvshrink.convert.frame import Conversion
from kvshrink.convert.layers import StockModel
from kvshrink.convert.options import FittedOptions


@dataclass(frozen=True)
class KeepEverything:
    """A method that writes each layer's attention as the source holds it, to the output and one scored copy."""

    options: FittedOptions
    refusal: str | None = None
    support: ClassVar[str] = "gqa"
    fits_every_tensor: ClassVar[bool] = False

    def refuse(self, conversion: Conversion) -> None:
        if self.refusal:
            raise KvshrinkError(self.refusal)

    def sized_targets(self, conversion: Conversion) -> list[StockModel]:
        return [conversion.target_model(conversion.checkpoint.config)] * 2

    def calibrate(self, conversion: Conversion) -> Calibration:
        return Calibration(conversion.source_model(), conversion.spec, calibration_inputs(conversion, self.options))

    def plan(self, conversion: Conversion, calibration: Calibration) -> Plan:
        config = conversion.checkpoint.config
        targets = [TargetPlan("converted", config), TargetPlan("copy", config)]
        return Plan(method="keep", targets=targets, calibration=calibration, summary={"kept": True})

    def convert_layer(self, conversion: Conversion, plan: Plan, layer: int,
                      inputs: AttentionInputs) -> list[LayerResult]:
        checkpoint = conversion.checkpoint
        names = [name for name in conversion.spec.attention_tensor_names(layer) if name in checkpoint]
        report = {"layer": layer, "inputs": list(inputs.inputs.shape)}
        return [({name: checkpoint.tensor(name).float() for name in names}, dict(report)) for _ in plan.targets]

    def report_check(self, plan: Plan, check: dict[str, Any]) -> dict[str, Any]:
        return {**check, "scored": sorted(key for key in check if key.endswith("_perplexity"))}


def test_a_method_that_changes_nothing_gives_back_the_source(tiny_checkpoint, tmp_path):
    source, out = tiny_checkpoint("llama", 4, 2, tokenizer=True), tmp_path / "out"
    options = FittedOptions(fit="attention", calibration_tokens=1536, check_tokens=256, progress=False)
    report = convert(source, out, KeepEverything(options))

    written, original = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(written[name].equal(original[name]) for name in original)
    assert report["new_parameters"] == [] and report["method"] == "keep" and report["kept"] is True
    layers = report["layers"]
    assert [entry["layer"] for entry in layers] == list(range(len(layers)))
    assert all(entry["inputs"] == [3, 512, 64] for entry in layers)  # 1,536 tokens: three 512-token windows
    assert all(entry["fit"]["kept_closed_form"] == UNCHANGED for entry in layers)  # nothing to fit, nothing measured
    check = report["check"]
    assert check["scored"] == ["converted_perplexity", "copy_perplexity", "source_perplexity"]
    assert check["converted_perplexity"] == pytest.approx(check["source_perplexity"], rel=1e-6)
    assert check["copy_perplexity"] == pytest.approx(check["source_perplexity"], rel=1e-6)
    assert report["family_support"]["family"] == "llama"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tiny-0"]  # no scratch or staging left
    assert not any(path.name.startswith(".") for path in out.iterdir())


def test_a_method_refusal_leaves_nothing_written(tiny_checkpoint, tmp_path):
    source, out = tiny_checkpoint("llama", 4, 2, tokenizer=True), tmp_path / "out"
    options = FittedOptions(fit="none", calibration_tokens=1024, progress=False)
    with pytest.raises(KvshrinkError, match="cannot keep this"):
        convert(source, out, KeepEverything(options, refusal="cannot keep this: pass another source"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-0"]
