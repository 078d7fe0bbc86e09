"""Cross-modal attention fusion (proposal §3.2.2).

For modality query ``i`` and key token ``j`` (tokens of every modality present for this patient):

    α_ij = softmax_j(Q_i K_jᵀ / √d_k),   Q_i = h_i W^Q,  K_j = h_j W^K,  V_j = h_j W^V
    z    = Σ_i Σ_j α_ij V_j   (averaged over the queries, then W^O and LayerNorm)

with multiple heads (d_k = d_model / n_heads). Absent or masked modalities contribute no keys (their
logits are set to −∞ before the softmax) and their query is replaced by a learned missing-modality
token, so their input has no influence on z. One learned null key/value (an attention sink) is
always present, so fusion stays defined for a patient with no modality at all (its z is then a
learned prior), e.g. a unimodal baseline on a patient lacking that modality. Its weight is the last
column of the returned attention. An optional per-key bias (proposal §3.4, ontology-
informed attention) is added to the logits. The attention weights are returned, not recomputed, so
explanations read what the model used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FusionOutput:
    z: torch.Tensor  # (B, d) fused patient latent
    attention: torch.Tensor | None  # (B, heads, M, T + 1) α_ij per head; M queries, T tokens + null key


class CrossModalFusion(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_modalities: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.missing_query = nn.Parameter(torch.randn(n_modalities, d_model) * 0.02)
        self.modality_type = nn.Parameter(torch.randn(n_modalities, d_model) * 0.02)
        self.null_key = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)

    def forward(
        self,
        latents: list[torch.Tensor],
        tokens: list[torch.Tensor],
        token_masks: list[torch.Tensor],
        modality_present: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        imputed_queries: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Fuse.

        Args:
            latents: per modality (B, d) latents h_i.
            tokens: per modality (B, T_m, d) tokens.
            token_masks: per modality (B, T_m), True for real tokens.
            modality_present: (B, M) True where the modality is present (and not masked).
            key_bias: optional (B, T) additive bias on the attention logits of each key token.
            imputed_queries: optional (B, M, d) latents imputed for absent modalities (by latent
                diffusion); they replace the learned missing-modality tokens as queries.
        """
        batch = modality_present.shape[0]
        present = modality_present.unsqueeze(-1)  # (B, M, 1)
        queries = torch.stack(latents, dim=1)  # (B, M, d)
        stand_in = self.missing_query.expand_as(queries) if imputed_queries is None else imputed_queries
        queries = torch.where(present, queries, stand_in)
        keys = torch.cat(
            [*(t + self.modality_type[m] for m, t in enumerate(tokens)), self.null_key.expand(batch, 1, -1)], dim=1
        )  # (B, T + 1, d)
        key_valid = torch.cat(
            [*(mask & modality_present[:, m : m + 1] for m, mask in enumerate(token_masks)),
             torch.ones(batch, 1, dtype=torch.bool, device=modality_present.device)],
            dim=1,
        )  # (B, T + 1)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, heads, N, d_k)
            return x.view(batch, x.shape[1], self.n_heads, self.d_k).transpose(1, 2)

        q, k, v = heads(self.w_q(queries)), heads(self.w_k(keys)), heads(self.w_v(keys))
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # (B, heads, M, T)
        if key_bias is not None:
            logits = logits + torch.cat([key_bias, torch.zeros_like(key_bias[:, :1])], dim=1)[:, None, None, :]
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        attention = torch.softmax(logits, dim=-1)  # α_ij
        fused = self.dropout(attention) @ v  # (B, heads, M, d_k)
        fused = fused.transpose(1, 2).reshape(batch, -1, self.n_heads * self.d_k)  # (B, M, d)
        z = self.norm(self.w_o(fused.mean(dim=1)) + queries.mean(dim=1))  # (B, d)
        return FusionOutput(z=z, attention=attention)


class ConcatFusion(nn.Module):
    """Ablation of cross-attention (proposal §3.6): z = LN(MLP([h_1; …; h_M])), with the learned
    missing-modality token in place of each absent modality's latent. No attention weights."""

    def __init__(self, d_model: int, n_modalities: int, dropout: float):
        super().__init__()
        self.missing_query = nn.Parameter(torch.randn(n_modalities, d_model) * 0.02)
        self.mlp = nn.Sequential(
            nn.Linear(n_modalities * d_model, 2 * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * d_model, d_model),
        )
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)

    def forward(
        self,
        latents: list[torch.Tensor],
        tokens: list[torch.Tensor],
        token_masks: list[torch.Tensor],
        modality_present: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        imputed_queries: torch.Tensor | None = None,
    ) -> FusionOutput:
        stacked = torch.stack(latents, dim=1)  # (B, M, d)
        stand_in = self.missing_query.expand_as(stacked) if imputed_queries is None else imputed_queries
        stacked = torch.where(modality_present.unsqueeze(-1), stacked, stand_in)
        return FusionOutput(z=self.norm(self.mlp(stacked.flatten(1))), attention=None)
