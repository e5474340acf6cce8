"""`${if_gpu:${trainer.accelerator},<value on a GPU>,<value on CPU>}`: one command, sized for where it runs.

`make demo` (python train.py experiment=avsr_decorr) trains for minutes on CPU and, where a GPU is present,
uses it with more steps and bigger batches. The trainer runs on a GPU when its accelerator is `gpu`/`cuda`,
or `auto` with CUDA available; `trainer.accelerator=cpu` on a GPU machine gives the CPU values back.
"""

from __future__ import annotations

GPU_ACCELERATORS = ("gpu", "cuda")


def runs_on_gpu(accelerator: str) -> bool:
    if accelerator in GPU_ACCELERATORS:
        return True
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def if_gpu(accelerator: str, on_gpu, on_cpu):
    """on_gpu if a trainer with this accelerator runs on a GPU, else on_cpu."""
    return on_gpu if runs_on_gpu(str(accelerator)) else on_cpu
