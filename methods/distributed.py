"""Collective helpers that are the identity in a single process, so every method runs on one CPU."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

# The autograd-aware collectives below are the supported way to differentiate through a gather;
# their replacement in torch.distributed._functional_collectives is private API.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers in rank order, without gradients (bank writes and
    indices); identity in one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers in rank order, keeping gradients.

    The backward pass sums each worker's gradient into the owner's slice, so a loss computed on
    the gathered (global) batch has the same gradient as on one worker with the whole batch once
    DDP averages the parameter gradients.
    """
    if world_size() == 1:
        return x_BD
    return torch.cat(dist_fn.all_gather(x_BD), dim=0)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all workers, on any device.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this is the same computation for CPU (gloo)
    workers: per-worker sums and sums of squares are all-reduced with gradients, so a DDP step
    on W workers normalises exactly like one worker on the whole batch. In one process it is
    plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (B, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        stats = dist_fn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = stats[-1]
        mean_C = stats[:c] / n
        var_C = (stats[c : 2 * c] / n - mean_C * mean_C).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean_C.detach())
                self.running_var.mul_(1 - m).add_(m * var_C.detach() * n / (n - 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean_C.view(shape)) * torch.rsqrt(var_C.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by a GlobalBatchNorm with the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        ref = module.running_mean if module.running_mean is not None else module.weight
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child))
    return module
