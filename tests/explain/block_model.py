"""A constructed model whose diagnosis depends on known inputs only, with the interface the attribution
methods use (``model(batch, modality_present).logits``, a word-embedding table, an image encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Image shape of the constructed patients: several channels, a non-cubic grid (shape-agnostic code).
CHANNELS, SPATIAL = 2, (12, 10, 8)
#: The voxel block the image evidence is in (aligned with 2-voxel occlusion cubes).
BLOCK = (slice(4, 6), slice(2, 4), slice(4, 6))
N_TOKENS, N_FEATURES, VOCAB, WIDTH = 6, 4, 10, 8


@dataclass
class Output:
    logits: torch.Tensor


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, WIDTH, padding_idx=0)


class _Bert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()


class _TextEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bert = _Bert()


class BlockModel(nn.Module):
    """Two classes; logit of class 1 = ``image_weight`` · mean of the image over :data:`BLOCK` (all
    channels) + ``tabular_weight`` · EHR feature ``feature`` + ``text_weight`` · Σ embedding of token
    ``position`` − ``bias``; class 0 has logit 0. An absent modality contributes nothing; every other
    input enters with weight 0 (so gradients reach it and are zero)."""

    def __init__(self, image_weight: float = 20.0, tabular_weight: float = 0.0, text_weight: float = 0.0,
                 feature: int = 2, position: int = 1, bias: float = 4.0) -> None:
        super().__init__()
        self.text_encoder = _TextEncoder()
        table = self.text_encoder.bert.embeddings.word_embeddings.weight
        nn.init.uniform_(table, 0.5, 1.0)
        with torch.no_grad():
            table[0] = 0.0  # [PAD], the Integrated Gradients baseline token
        self.image_encoder = nn.Sequential(nn.Conv3d(CHANNELS, 1, kernel_size=1, bias=False))
        nn.init.ones_(self.image_encoder[0].weight)
        self.weights = (image_weight, tabular_weight, text_weight)
        self.feature, self.position, self.bias = feature, position, bias

    def forward(self, batch: dict[str, torch.Tensor], modality_present: torch.Tensor,
                output_attentions: bool = False) -> Output:
        present = modality_present.float()
        image = self.image_encoder(batch["image"]) / CHANNELS  # (B, 1, D, H, W): the channel mean
        embedded = self.text_encoder.bert.embeddings.word_embeddings(batch["token_ids"])  # (B, L, d)
        tabular = batch["tabular"].masked_fill(batch["tabular_missing"], 0.0)
        image_term = image[(slice(None), 0, *BLOCK)].flatten(1).mean(dim=1) + 0.0 * image.flatten(1).sum(dim=1)
        text_term = (embedded[:, self.position].sum(dim=-1) * batch["token_mask"][:, self.position].float()
                     + 0.0 * embedded.sum(dim=(1, 2)))
        tabular_term = tabular[:, self.feature] + 0.0 * tabular.sum(dim=1)
        image_weight, tabular_weight, text_weight = self.weights
        score = (image_weight * image_term * present[:, 0] + text_weight * text_term * present[:, 1]
                 + tabular_weight * tabular_term * present[:, 2] - self.bias)
        return Output(torch.stack([torch.zeros_like(score), score], dim=1))


def block_patients(n: int = 3, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of ``n`` patients: noise images with a bright :data:`BLOCK`, notes, EHR; all modalities present."""
    generator = torch.Generator().manual_seed(seed)
    image = 0.1 + 0.3 * torch.rand(n, CHANNELS, *SPATIAL, generator=generator)
    image[(slice(None), slice(None), *BLOCK)] = 0.9
    token_ids = torch.randint(1, VOCAB, (n, N_TOKENS), generator=generator)
    token_mask = torch.ones(n, N_TOKENS, dtype=torch.bool)
    token_mask[:, -1] = False
    token_ids[~token_mask] = 0
    inputs = {
        "image": image,
        "token_ids": token_ids,
        "token_mask": token_mask,
        "tabular": 1.0 + torch.rand(n, N_FEATURES, generator=generator),
        "tabular_missing": torch.zeros(n, N_FEATURES, dtype=torch.bool),
    }
    return inputs, torch.ones(n, 3, dtype=torch.bool)


def block_mask() -> torch.Tensor:
    """(D, H, W) True on :data:`BLOCK`."""
    mask = torch.zeros(SPATIAL, dtype=torch.bool)
    mask[BLOCK] = True
    return mask
