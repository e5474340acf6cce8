"""Trainable parameters as views of one flat buffer per (dtype, device): the optimizer step, gradient
clipping and zero_grad each see one tensor instead of hundreds (`model.flat_params=true`, single device).

LoRA on every linear layer of SmolLM2-135M is 420 small tensors. On an H200 its fast step is bound by host
time (about 35 ms a step against 9 ms of GPU work: benchmarks/RESULTS.md), and the per-tensor Python of
AdamW's `_init_group`, clipping's total norm, `_group_tensors_by_device_and_dtype` and zero_grad is part of it.
Here every trainable parameter's data and gradient are views into two flat buffers, and the optimizer gets
the flat parameter, whose `.grad` is the flat gradient buffer: same maths, elementwise (AdamW, weight decay
and the global-norm clip are all elementwise or global), one tensor per buffer.

Contract, kept by `FlatParameters.zero_grad` (the recipe's `optimizer_zero_grad`): before each accumulation
window the gradient buffer is zeroed in place and the views re-attached if anything replaced them (a
`module.zero_grad()` or `optimizer.zero_grad(set_to_none=True)`, which the non-finite guard uses to skip a
step: the flat `.grad` is None for that step, so the optimizer skips it, as without flattening).
Checkpoints: parameters are saved as views of one storage (torch.save writes it once); the optimizer state
holds one tensor per buffer, so a run resumes with the same setting.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class FlatParameters:
    """Flatten `params` (leaf tensors that require grad) in place; `.flat` are what the optimizer gets."""

    def __init__(self, params: list[torch.nn.Parameter]):
        if not params:
            raise ValueError("FlatParameters needs at least one parameter")
        groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        for param in params:
            groups.setdefault((param.dtype, param.device), []).append(param)
        self.flat: list[torch.nn.Parameter] = []
        self.members: list[list[torch.nn.Parameter]] = []
        self.grads: list[torch.Tensor] = []
        for (dtype, device), members in groups.items():
            total = sum(p.numel() for p in members)
            data = torch.empty(total, dtype=dtype, device=device)
            grad = torch.zeros(total, dtype=dtype, device=device)
            offset = 0
            for param in members:
                n = param.numel()
                data[offset : offset + n].copy_(param.detach().reshape(-1))
                if param.grad is not None:
                    grad[offset : offset + n].copy_(param.grad.reshape(-1))
                offset += n
            flat = torch.nn.Parameter(data)
            flat.grad = grad
            self.flat.append(flat)
            self.members.append(members)
            self.grads.append(grad)
            self._attach(len(self.flat) - 1)
        log.info(
            "flat parameters: %d tensors in %d buffer(s) of %s elements",
            len(params),
            len(self.flat),
            ", ".join(str(f.numel()) for f in self.flat),
        )

    def _attach(self, index: int) -> None:
        """Point every member's data and grad at its slice of buffer `index` (keeping current values)."""
        data, grad = self.flat[index].data, self.grads[index]
        offset = 0
        for param in self.members[index]:
            n = param.numel()
            if param.data.data_ptr() != data[offset:].data_ptr():
                data[offset : offset + n].copy_(param.detach().reshape(-1))
                param.data = data[offset : offset + n].view_as(param)
            view = grad[offset : offset + n].view_as(param)
            if param.grad is None or param.grad.data_ptr() != view.data_ptr():
                if param.grad is not None:
                    view.copy_(param.grad)
                param.grad = view
            offset += n

    def attached(self) -> bool:
        """Host-only check (no GPU sync) that the first and last member of each buffer still use their views."""
        for index, members in enumerate(self.members):
            grad = self.grads[index]
            first, last = members[0], members[-1]
            end = grad.numel() - last.numel()
            if first.grad is None or first.grad.data_ptr() != grad.data_ptr():
                return False
            if last.grad is None or last.grad.data_ptr() != grad[end:].data_ptr():
                return False
            if self.flat[index].grad is not grad:
                return False
        return True

    def zero_grad(self) -> None:
        """Zero the gradient buffers in place and restore the views (and each flat `.grad`) if replaced."""
        for index, grad in enumerate(self.grads):
            grad.zero_()
            self.flat[index].grad = grad
        if not self.attached():
            for index in range(len(self.flat)):
                for param in self.members[index]:
                    param.grad = None  # stale values: the buffer was just zeroed
                self._attach(index)
