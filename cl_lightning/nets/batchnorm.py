"""Batch norm whose training statistics are those of the global batch under DDP, on any device.

Under DDP each process sees one shard of the global batch, so ordinary batch norm normalises with shard
statistics and updates its running statistics from them: the run no longer matches one process on the
same global batches. ``torch.nn.SyncBatchNorm`` fixes that on GPUs only (it refuses CPU tensors), and it
cannot be used for a target network that runs on generated weights. :class:`GlobalBatchNorm` computes the
mean and the variance over all processes (two exact passes, each one ``all_reduce`` that gradients flow
through), so normalisation, gradients and running statistics equal those of one process on the whole
batch. Without a process group of more than one process, or in eval mode, it is plain batch norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm1d/2d/3d`` with global-batch statistics in training under DDP (the module docstring).

    Build it with :func:`convert_to_global_batchnorm`; it keeps the converted layer's parameters, buffers
    and options, so state dicts are interchangeable with ordinary batch norm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = x.new_tensor([x.numel() // x.shape[1]])                   # values per channel here
        summed = _AllReduceSum.apply(torch.cat([x.sum(dims), local]))      # [C + 1]: sums, count
        count = summed[-1]
        mean = summed[:-1] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count        # biased, as for normalising
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            assert self.num_batches_tracked is not None and self.running_mean is not None and \
                self.running_var is not None  # buffers of a layer that tracks running statistics
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)), alpha=factor)
        return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over all processes; the gradient of every process's input is the sum of all processes' output
    gradients (each process's loss depends on every process's input through the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` in ``module`` (in place, and returned) by a
    :class:`GlobalBatchNorm` with the same options, parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            new = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                  affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_to_global_batchnorm(child)
    return module
