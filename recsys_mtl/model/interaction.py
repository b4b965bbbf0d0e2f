"""Explicit feature crosses (DCN-v2) before the mixture: an MLP alone learns products such as user x item poorly."""

import torch
from torch import Tensor, nn


class CrossNet(nn.Module):
    """x_{l+1} = x_0 * (W_l x_l + b_l) + x_l (Wang et al., DCN-v2). forward: [B, D_in] -> [B, D_in], in the autocast
    dtype under autocast (bf16 rounding in the sums as well: 3 seeds of the demo config within a std of fp32's,
    README)."""

    def __init__(self, dim: int, num_layers: int, rank: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_cross_matrix(dim, rank) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        device = x0.device.type
        if torch.is_autocast_enabled(device):  # all layers in the autocast dtype: one cast, not two a layer
            x0 = x0.to(torch.get_autocast_dtype(device))
        x = x0
        for layer in self.layers:
            x = torch.addcmul(x, x0, layer(x))  # x0 * (W x + b) + x, one pass: [B, D_in]
        return x


def _cross_matrix(dim: int, rank: int) -> nn.Module:
    """W x + b: [B, D_in] -> [B, D_in]; W full (rank 0) or U V with V: D_in -> rank, U: rank -> D_in."""
    out = nn.Linear(rank or dim, dim)
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.Linear(dim, rank, bias=False), out) if rank else out
