"""Task towers: one MLP per task, from its mixture output to one logit."""

from torch import Tensor, nn


class TaskTower(nn.Module):
    """MLP -> one logit. forward: [B, D_exp] -> [B]."""

    def __init__(self, in_dim: int, dims: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in zip((in_dim, *dims), dims, strict=False):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(dims[-1] if dims else in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x).squeeze(-1)  # [B]

    def weight_matrices(self) -> list[Tensor]:
        """The weight matrices (not biases), for the L2 penalty on task weights."""
        return [m.weight for m in self.mlp if isinstance(m, nn.Linear)]
