"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): a learned router per routed block.

Config: `config.MoDConfig` (layers 1, 3, 5, ... routed; `mod_capacity`, `mod_aux_loss_weight`,
`mod_use_predictor`). Everything else (the block, top-k, the update, statistics) is shared:
this file is MoD's whole difference from Standard.
Shape legend: B batch, T sequence length, K tokens per routed block and row, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoDConfig
from .layers import KVStore
from .routing import Context, RoutedLayer, Routing, masked_mean, router_logits


class Predictor(nn.Module):
    """Causal stand-in for top-k membership: D -> D/2 -> 1 with SiLU, on the detached input."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 2)
        self.fc2 = nn.Linear(hidden_size // 2, 1)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_BTD.device.type, enabled=False):
            return self.fc2(F.silu(self.fc1(x_BTD.detach().float()))).squeeze(-1)


class MoDLayer(RoutedLayer):
    """A routed block whose router is a linear map D -> 1 (no bias), in fp32 (paper, section 3)."""

    aux_loss_weights = {"mod_aux": "mod_aux_loss_weight", "mod_predictor": "mod_predictor_loss_weight"}

    def __init__(self, config: MoDConfig) -> None:
        super().__init__(config)
        self.router = nn.Linear(config.hidden_size, 1, bias=False)
        self.predictor = Predictor(config.hidden_size) if config.mod_use_predictor else None

    def route(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None, store: KVStore | None) -> Routing:
        # differs from standard: r = w . x ranks the tokens; sigmoid(r) scales the block's change
        # of the selected ones (eq. 1 of the paper: never the residual stream itself).
        r_BT = router_logits(self.router.weight, x_BTD)
        p_BT = self.predictor(x_BTD) if self.predictor is not None else None
        # causal routing: sigmoid(r) > 0.5 (or the predictor), made a stand-in for top-k by the aux losses
        causal_BT = (r_BT if p_BT is None else p_BT) > 0.0
        return Routing(r_BT, torch.sigmoid(r_BT), causal_BT, r_BT, {}, p_BT)

    def on_topk(self, routing: Routing, idx_BK: torch.Tensor, topk_BT: torch.Tensor,
                ctx: Context) -> dict[str, torch.Tensor]:
        # differs from standard: BCE of the router logit (and the predictor's) against top-k membership.
        target_BT = topk_BT.float()
        aux = {"mod_aux": _bce(routing.score_BT, target_BT, ctx.key_mask_BT)}
        if routing.extra is not None:
            aux["mod_predictor"] = _bce(routing.extra, target_BT, ctx.key_mask_BT)
        return aux


def _bce(logit_BT: torch.Tensor, target_BT: torch.Tensor, key_mask_BT: torch.Tensor | None) -> torch.Tensor:
    return masked_mean(F.binary_cross_entropy_with_logits(logit_BT, target_BT, reduction="none"), key_mask_BT)
