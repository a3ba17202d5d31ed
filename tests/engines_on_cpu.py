"""`fimtune` under `accelerate launch` on CPU processes, with the engine the launcher's config names.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/engines_on_cpu.py train ...

Accelerate (1.15) selects FSDP and DeepSpeed only for GPU-style process groups (fimtune asks it for
the CPU when there is no CUDA, which makes a run plain DDP over gloo). torch's FSDP2 (`fully_shard`)
and DeepSpeed's CPU accelerator do run on CPU processes over gloo, so this stands in for GPUs:

    FSDP        (ACCELERATE_USE_FSDP) fimtune's Accelerator is made an FSDP one, with the plugin the
                launcher's environment describes (from the config file)
    DeepSpeed   (ACCELERATE_USE_DEEPSPEED; needs `pip install deepspeed`) the Accelerator is built
                without `cpu=True` and with the gloo backend, so DeepSpeed sets it up

Everything else is fimtune's own code path. Used by tests/test_distributed.py and by
benchmarks/scaleout_gpu.py on machines without CUDA.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def install() -> None:
    """Replace `fimtune.train.make_accelerator` by the engine's CPU stand-in, when the launcher asks for one."""
    import fimtune.train

    make_accelerator = fimtune.train.make_accelerator

    def fsdp_accelerator(cfg: Any) -> Any:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        acc = make_accelerator(cfg)
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        # AcceleratorState copies PartialState's type whenever it is built again: set both.
        PartialState._shared_state["distributed_type"] = acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        return acc

    def deepspeed_accelerator(cfg: Any) -> Any:
        import accelerate
        from accelerate.utils import InitProcessGroupKwargs

        real = accelerate.Accelerator  # fimtune's make_accelerator, with this Accelerator while it runs

        def gloo_accelerator(*args: Any, cpu: bool = False, **kwargs: Any) -> Any:
            return real(*args, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)

        accelerate.Accelerator = gloo_accelerator
        try:
            return make_accelerator(cfg)
        finally:
            accelerate.Accelerator = real

    if _flag("ACCELERATE_USE_FSDP"):
        fimtune.train.make_accelerator = fsdp_accelerator
    elif _flag("ACCELERATE_USE_DEEPSPEED"):
        fimtune.train.make_accelerator = deepspeed_accelerator


if __name__ == "__main__":
    install()
    from fimtune.cli import main

    sys.exit(main())
