"""Config resolvers for one command sized for where it runs (`make demo` on CPU or on a GPU).

- `${gpu_if_available:}`: "gpu" when CUDA is available, else "cpu" (unlike Lightning's `auto`, never MPS,
  so a Mac runs the CPU demo as before).
- `${if_gpu:${trainer.accelerator},<value on a GPU>,<value on CPU>}`: the trainer runs on a GPU when its
  accelerator is `gpu`/`cuda`, or `auto` with CUDA available; `trainer.accelerator=cpu` on a GPU machine
  gives the CPU values back.
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
    """on_gpu if a trainer with this accelerator runs on a GPU, else on_cpu. A list or dict value (`[q_proj,
    v_proj]`) comes back as a config node: `OmegaConf.resolve`, which Hydra's instantiate calls, cannot store a
    plain Python list where the interpolation was."""
    from omegaconf import OmegaConf

    value = on_gpu if runs_on_gpu(str(accelerator)) else on_cpu
    return OmegaConf.create(value) if isinstance(value, (list, dict)) else value


def gpu_if_available() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"
