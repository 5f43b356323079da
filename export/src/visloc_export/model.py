"""The visloc network in PyTorch, with state_dict keys that load the upstream files unchanged.

* ``backbone``: EfficientNet-B4 of ``efficientnet_pytorch`` 0.7.x, ``include_top=False``
  (static "same" padding computed for its default image size 380), global average pool.
* ``cell_head``: the MvMF head; at inference ``softmax(Linear(1792 -> M))`` are the cell
  probabilities. ``mvmf.mus`` ``[2, M]`` (float64) are the cell centres.
* ``rrm_head``: LayerNorm -> residual MLP -> LayerNorm -> L2 normalisation.

:class:`VislocNet` takes the decoded, resized image as uint8 NHWC and does cast, scale and
normalisation inside, so the ONNX graph has the same contract as the service.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet
from torch import nn

from swc_service.bundle import EMBEDDING_DIM
from visloc_client.preprocessing import MEAN, STD


def build_backbone() -> EfficientNet:
    """EfficientNet-B4 exactly as upstream builds it, without downloading anything."""
    return EfficientNet.from_name("efficientnet-b4", include_top=False)


class _VMF(nn.Module):
    def __init__(self, num_cells: int):
        super().__init__()
        self.mus = nn.Parameter(torch.zeros(2, num_cells, dtype=torch.float64), requires_grad=False)
        self.kappas = nn.Parameter(torch.zeros(num_cells, dtype=torch.float64), requires_grad=False)


class _MixtureWeights(nn.Module):
    def __init__(self, in_features: int, num_cells: int):
        super().__init__()
        self.seq_model = nn.Sequential(nn.Linear(in_features, num_cells))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq_model(x)


class CellHead(nn.Module):
    """Keys: ``mvmf.mus``, ``mvmf.kappas``, ``mixture_weights.seq_model.0.{weight,bias}``."""

    def __init__(self, num_cells: int, in_features: int = EMBEDDING_DIM):
        super().__init__()
        self.mvmf = _VMF(num_cells)
        self.mixture_weights = _MixtureWeights(in_features, num_cells)

    @property
    def centres(self) -> torch.Tensor:
        """``[M, 2]`` (lat, lon) float64."""
        return self.mvmf.mus.detach().t().contiguous()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mixture_weights(features), dim=1)


class _Residual(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dims)
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.relu(self.fc1(x))) + x)


class RetrievalHead(nn.Module):
    """Keys: ``norm.*``, ``res.norm.*``, ``res.fc1.*``, ``res.fc2.*``."""

    def __init__(self, dims: int = EMBEDDING_DIM, hidden: int = 4096):
        super().__init__()
        self.norm = nn.LayerNorm(dims)
        self.res = _Residual(dims, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.res(self.norm(features)), p=2, dim=-1)


class Normalize(nn.Module):
    """uint8 NHWC -> float NCHW, ``x/255`` then ``(x - mean) / std`` (ToTensor + Normalize)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # The buffers' dtype: float32 as exported, float64 for the reference (``net.double()``).
        x = image.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0
        return (x - self.mean) / self.std


class VislocNet(nn.Module):
    """uint8 ``[B, H, W, 3]`` -> (cell_probs ``[B, M]``, embedding ``[B, 1792]``)."""

    def __init__(self, num_cells: int):
        super().__init__()
        self.normalize = Normalize()
        self.backbone = build_backbone()
        self.cell_head = CellHead(num_cells)
        self.rrm_head = RetrievalHead()

    @property
    def num_cells(self) -> int:
        return int(self.cell_head.mvmf.mus.shape[1])

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone features of a normalised float NCHW batch: ``[B, 1792]``."""
        return self.backbone(pixels).flatten(1)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cell_head(features), self.rrm_head(features)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.features(self.normalize(image)))

    def for_export(self) -> VislocNet:
        """Plain Swish (the memory-efficient one is a custom autograd op that does not export)."""
        self.backbone.set_swish(memory_efficient=False)
        return self.eval()


def _load_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state


def load_upstream(backbone: str, mvmf: str, rrm: str) -> VislocNet:
    """Build the network from the three upstream checkpoint files (strict key match)."""
    mvmf_state = _load_state(mvmf)
    if "mvmf.mus" not in mvmf_state:
        raise ValueError(f"{mvmf}: no 'mvmf.mus' key; is this the upstream mvmf_head.pt?")
    mus = mvmf_state["mvmf.mus"]
    if mus.ndim != 2 or mus.shape[0] != 2:
        raise ValueError(f"{mvmf}: 'mvmf.mus' must be [2, M], got {tuple(mus.shape)}")
    net = VislocNet(int(mus.shape[1]))
    for module, path, state in (
        (net.backbone, backbone, _load_state(backbone)),
        (net.cell_head, mvmf, mvmf_state),
        (net.rrm_head, rrm, _load_state(rrm)),
    ):
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not match the upstream layout: {exc}") from exc
    return net.eval()
