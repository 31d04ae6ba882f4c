"""DeepSpeed ZeRO-3: parameters, gradients and optimizer state partitioned across processes, the teacher too.

Under `accelerate launch` with a DeepSpeed config, accelerate hands transformers a ZeRO-3 config, so every model
`from_pretrained` loads comes up partitioned: each process holds a flat slice of every parameter, and forward
gathers a module's weights while it runs. This module is what uptrain needs on top of that:

- the recipe decides the micro-batch, gradient accumulation and clipping (the DeepSpeed config must agree);
- full tensors one parameter at a time (the typical weight size, the transferred attention, the final weights);
- the teacher sharded like the student: its own DeepSpeed engine, without optimizer (as TRL's prepare_deepspeed
  does), so a teacher that does not fit on one device works;
- size-scaled rows (optimizer.py) on ZeRO-3's partitions: DeepSpeed steps its own flat fp32 copies, so after each
  optimizer step the off-scale rows' update is redone on this process's slice, through DeepSpeed's local API
  (deepspeed.utils.safe_get_local_fp32_param, safe_get_local_optimizer_state, safe_set_local_fp32_param).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.optimizer import adam_update, off_scale_rows
from kvshrink.uptrain.recipe import Recipe

ZERO_CONFIG = "recipes/accelerate/deepspeed-zero3.yaml"


def deepspeed_cpu_backend() -> str | None:
    """The process-group backend for DeepSpeed on CPU (gloo), None otherwise. accelerate names none there: its
    state would then count one process while DeepSpeed's own group spans them all."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.communication_backend_name() if accelerator.device_name() == "cpu" else None


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_zero3(accelerator: Accelerator, recipe: Recipe) -> None:
    """Check the DeepSpeed config is ZeRO-3 and agrees with the recipe; fill in what it leaves to `auto`
    (uptrain feeds batches itself, so accelerate cannot infer the micro-batch from a data loader)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise KvshrinkError(
            f"uptrain runs DeepSpeed at ZeRO stage 3 only, this config asks for stage {stage}: launch with "
            f"{ZERO_CONFIG}, or recipes/accelerate/ddp.yaml for plain data parallel"
        )
    wanted = {
        "train_micro_batch_size_per_gpu": recipe.micro_batch_size,
        "train_batch_size": recipe.micro_batch_size * recipe.gradient_accumulation * accelerator.num_processes,
        "gradient_clipping": recipe.optimizer.grad_clip or 0.0,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif float(given) != float(value):
            raise KvshrinkError(
                f"the DeepSpeed config sets {key} to {given} but the recipe asks for {value}: set it to auto in the "
                "DeepSpeed config (the recipe decides)"
            )


@contextlib.contextmanager
def whole_modules(accelerator: Accelerator):
    """Inside, transformers builds models whole, not ZeRO-3 partitioned: the attention_transfer stage builds its
    layers on the meta device and fills them one at a time, which zero.Init cannot partition. The config is
    handed back to transformers on the way out (accelerate's own set_deepspeed_weakref)."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """The whole tensors of ZeRO-3 partitioned `parameters` while inside (changes made on `modifier_rank` are
    kept); plain parameters as they are."""
    if not any(hasattr(parameter, "ds_id") for parameter in parameters):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
        yield


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every parameter, each whole until the next is asked for: gathered one at a time
    under ZeRO-3, so every process must iterate to the end."""
    for name, parameter in model.named_parameters():
        with gathered([parameter]):
            yield name, parameter


def full_state_dict(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors, on the CPU, where `keep` (the main process); every process calls
    this, since the parameters are gathered collectively."""
    saved = set(model.state_dict())  # persistent buffers only, as save_pretrained writes them
    tensors = {name: parameter.detach().cpu().clone() for name, parameter in full_parameters(model) if keep}
    tensors.update({name: buffer.detach().cpu() for name, buffer in model.named_buffers() if keep and name in saved})
    return tensors


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (full names) into the partitioned `model`, one parameter at a time."""
    by_name = dict(model.named_parameters())
    for name, tensor in tensors.items():
        with gathered([by_name[name]], modifier_rank=0), torch.no_grad():
            by_name[name].data.copy_(tensor)


def numel(parameter: torch.nn.Parameter) -> int:
    """Elements of the whole parameter (a ZeRO-3 partitioned one holds none outside forward)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def elements_held(model: torch.nn.Module) -> int:
    """Parameter elements this process owns: its ZeRO-3 slices plus the small parameters DeepSpeed keeps whole
    (not the whole copies forward gathers, which DeepSpeed caches up to stage3_max_live_parameters), its FSDP2
    shards, or the whole model."""
    held = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_tensor"):
            held += parameter.ds_tensor.numel() + (parameter.ds_numel if parameter.ds_persist else 0)
        else:
            to_local = getattr(parameter, "to_local", None)
            held += to_local().numel() if to_local is not None else parameter.numel()
    return held


def sharded_teacher(accelerator: Accelerator, teacher: torch.nn.Module) -> torch.nn.Module:
    """The (partitioned) teacher as a DeepSpeed ZeRO-3 engine without optimizer, in eval mode: its forward gathers
    one module's weights at a time, like the student's. Call after the student is prepared (its config is then
    complete)."""
    import deepspeed

    config: dict[str, Any] = {
        key: value for key, value in accelerator.state.deepspeed_plugin.deepspeed_config.items()
        if key not in ("optimizer", "scheduler")
    }
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike Module.eval
    return engine


class Zero3SizeScaledRows:
    """Size-scaled rows (optimizer.SizeScaledRows) on ZeRO-3: remember this process's slice of the watched
    matrices before an optimizer step, then redo the off-scale rows' step on it from the optimizer state.

    A slice is the flat elements [rank * slice, (rank + 1) * slice) of the flattened matrix (the last one padded),
    so element i belongs to row (rank * slice + i) // row length; a row's RMS sums its squares over every process.
    The redone values go to DeepSpeed's fp32 copy (through its local API), to the working slice, and to the whole
    copy DeepSpeed keeps of a small (persistent) parameter.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], reference: float):
        self.parameters = parameters
        self.reference = reference
        self.before: list[torch.Tensor] = []

    def remember(self) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        self.before = [safe_get_local_fp32_param(parameter).detach().clone() for parameter in self.parameters]

    @torch.no_grad()
    def rescale(self, group: dict[str, Any], step: int) -> None:
        """Redo the last step (number `step`, counted from 1) of the off-scale rows with `group`'s hyperparameters."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state, safe_set_local_fp32_param

        for parameter, old in zip(self.parameters, self.before):
            rows = self._rows_of_elements(parameter, old.numel())
            rms = self._row_rms(parameter, old, rows)
            off_scale = off_scale_rows(rms, self.reference)
            if not bool(off_scale.any()):  # the same on every process: the RMS is summed over them all
                continue
            selected = off_scale[rows]  # of this process's elements (maybe none: it still joins the gather below)
            new = safe_get_local_fp32_param(parameter).detach().clone()
            first, second = (safe_get_local_optimizer_state(parameter, key) for key in ("exp_avg", "exp_avg_sq"))
            factor = (rms / self.reference)[rows]
            new[selected] = adam_update(old[selected], first[selected], second[selected], factor[selected], group, step)
            safe_set_local_fp32_param(parameter, new)
            parameter.ds_tensor.data.copy_(new.to(parameter.ds_tensor.dtype))
            self._refresh_whole_copy(parameter)
        self.before = []

    @staticmethod
    def _refresh_whole_copy(parameter: torch.nn.Parameter) -> None:
        """A parameter below DeepSpeed's persistence threshold stays whole between steps, re-gathered at the end
        of the step: gather its redone slices again, or forward would use the plain step's values."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if parameter.ds_status != ZeroParamStatus.AVAILABLE:
            return
        slices = [torch.empty_like(parameter.ds_tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(slices, parameter.ds_tensor.data)
        parameter.data.copy_(torch.cat(slices)[: parameter.ds_numel].view(parameter.ds_shape))

    @staticmethod
    def _rows_of_elements(parameter: torch.nn.Parameter, count: int) -> torch.Tensor:
        """The row of each element of this process's slice; padding elements get a row past the last one."""
        start = torch.distributed.get_rank() * count
        row_length = parameter.ds_shape[1:].numel()
        elements = torch.arange(start, start + count, device=parameter.ds_tensor.device)
        return (elements // row_length).clamp(max=parameter.ds_shape[0])

    @staticmethod
    def _row_rms(parameter: torch.nn.Parameter, local: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Every row's RMS (one extra slot collects the padding), summed over the processes' slices."""
        squares = torch.zeros(parameter.ds_shape[0] + 1, dtype=torch.float64, device=local.device)
        squares.index_add_(0, rows, local.double().pow(2))
        torch.distributed.all_reduce(squares)
        return (squares / parameter.ds_shape[1:].numel()).sqrt().float()
