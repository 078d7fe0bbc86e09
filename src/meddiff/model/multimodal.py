"""The hierarchical multimodal diffusion model (proposal §3.2), composed from its parts.

    image ─ ImageEncoder ──┐ tokens + h_image
    note  ─ TextEncoder ───┼──> CrossModalFusion ──> z ──┬── ClassifierHead ──> diagnosis logits
    EHR   ─ TabularEncoder ┘ tokens + h_tabular          ├── LatentDiffusion (DDPM on z, class-conditional)
                                                          └── decoders ──> volume, EHR vector, note terms

``modality_present`` (B, 3) says which modalities each patient's input has; training masks a
modality by presenting it as absent. An absent modality cannot influence any output. A modality outside
``ModelSpec.modalities`` (absent from the dataset, or excluded by ``train.modalities``) costs nothing: its
encoder and decoder never run, and it is never imputed.

The model saves and loads itself (:meth:`MedDiffModel.save_pretrained` / :meth:`~MedDiffModel.from_pretrained`,
the diffusers pattern): the weights as a plain state dict (loaded with ``weights_only=True``, never an
arbitrary pickle) and the :class:`ModelSpec` as JSON beside them, each written atomically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meddiff import MODALITIES
from meddiff.config import DiffusionConfig, ModelConfig
from meddiff.io import atomic_file, read_json, write_json
from meddiff.model.decoders import ImageDecoder, KeywordDecoder, TabularDecoder
from meddiff.model.diffusion import LatentDiffusion
from meddiff.model.encoders import ImageEncoder, TabularEncoder, TextEncoder, absent_modality
from meddiff.model.fusion import ConcatFusion, CrossModalFusion
from meddiff.model.latent_stack import N_LATENT_CHANNELS, LatentStack
from meddiff.model.ontology import NO_TERM, load_terms

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model_spec.json"
#: The model folder's record of where the model came from (MLflow run, registered version), written by
#: the train stage beside the weights and read by the stages that use the model.
RUN_FILE = "run.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved next to the weights)."""

    n_classes: int
    n_tabular: int
    vocab_size: int
    max_note_tokens: int
    spatial_size: tuple[int, int, int]
    model: ModelConfig
    diffusion: DiffusionConfig
    modalities: tuple[str, ...] = MODALITIES  # the modalities this model may use
    image_in_channels: int = 1  # channels of the processed image (meta['image_channels'])
    image_brain_channel: int | None = None  # which of them is the brain mask (None: the whole volume)
    image_segmentation: bool = False  # the image encoder has a lesion segmentation head (train.lambda_seg > 0)

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["model"] = self.model.model_dump(mode="json")
        payload["diffusion"] = self.diffusion.model_dump(mode="json")
        payload["spatial_size"] = list(self.spatial_size)
        payload["modalities"] = list(self.modalities)
        return payload

    @classmethod
    def from_dict(cls, payload: dict) -> ModelSpec:
        return cls(
            n_classes=int(payload["n_classes"]),
            n_tabular=int(payload["n_tabular"]),
            vocab_size=int(payload["vocab_size"]),
            max_note_tokens=int(payload["max_note_tokens"]),
            spatial_size=tuple(int(s) for s in payload["spatial_size"]),
            model=ModelConfig.model_validate(payload["model"]),
            diffusion=DiffusionConfig.model_validate(payload["diffusion"]),
            modalities=tuple(payload.get("modalities", MODALITIES)),
            image_in_channels=int(payload.get("image_in_channels", 1)),
            image_brain_channel=payload.get("image_brain_channel"),
            image_segmentation=bool(payload.get("image_segmentation", False)),
        )


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, classes)
    z: torch.Tensor  # (B, d)
    attention: torch.Tensor | None  # (B, heads, M, T + 1) fusion weights α_ij (None for concat fusion)
    token_slices: dict[str, slice]  # which key tokens belong to which modality
    modality_latents: torch.Tensor  # (B, M, d) LayerNorm-ed h_i, as diffused
    text_attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, heads, L, L)
    lesion_logits: torch.Tensor | None = None  # (B, 1, D, H, W) of every image, masked or not (with a seg head)


class MedDiffModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = spec.model
        d = cfg.d_model
        self.spec = spec
        self.image_encoder = ImageEncoder(
            spec.spatial_size, list(cfg.image_channels), d, cfg.dropout, in_channels=spec.image_in_channels,
            brain_channel=spec.image_brain_channel, latent_dropout=cfg.image_latent_dropout,
            # lesion pooling is driven by the seg head; a model built without one (no image) pools by max
            segmentation=spec.image_segmentation, pooling=cfg.image_pooling if spec.image_segmentation else "max",
        )
        self.text_encoder = TextEncoder(
            spec.vocab_size, spec.max_note_tokens, d, cfg.text_layers, cfg.text_heads, cfg.dropout
        )
        self.tabular_encoder = TabularEncoder(spec.n_tabular, d, cfg.tabular_hidden, cfg.dropout)
        if cfg.fusion == "concat":
            self.fusion: nn.Module = ConcatFusion(d, len(MODALITIES), cfg.dropout)
        else:
            self.fusion = CrossModalFusion(d, cfg.n_heads, len(MODALITIES), cfg.dropout)
        unknown = set(spec.modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}")
        self.register_buffer(
            "allowed_modalities", torch.tensor([m in spec.modalities for m in MODALITIES]), persistent=False
        )
        self.latent_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.classifier = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, spec.n_classes)
        )
        self.diffusion = LatentDiffusion(d, spec.n_classes, spec.diffusion, n_channels=N_LATENT_CHANNELS)
        self.image_decoder = ImageDecoder(d, spec.spatial_size, out_channels=spec.image_in_channels)
        self.tabular_decoder = TabularDecoder(d, spec.n_tabular, cfg.tabular_hidden)
        self.keyword_decoder = KeywordDecoder(d, spec.vocab_size)
        n_terms = len(load_terms())
        self.register_buffer("token_term", torch.full((spec.vocab_size,), NO_TERM, dtype=torch.long))
        self.term_bias = nn.Parameter(torch.full((n_terms,), float(cfg.ontology_prior_init)))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (the state dict) and ``model_spec.json`` into ``directory``; return the weights path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / WEIGHTS_FILE, "wb") as handle:
            torch.save(self.state_dict(), handle)
        write_json(directory / SPEC_FILE, self.spec.to_dict())
        return directory / WEIGHTS_FILE

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> MedDiffModel:
        """The model :meth:`save_pretrained` wrote into ``directory``, on ``device``, in eval mode.

        Raises:
            FileNotFoundError: ``directory`` holds no ``model.pt`` (or no ``model_spec.json``).
        """
        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no trained model; run `meddiff train` first")
        model = cls(ModelSpec.from_dict(read_json(directory / SPEC_FILE)))
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        return model.to(device).eval()

    def set_token_terms(self, token_term: np.ndarray) -> None:
        """Map token ids to ontology terms (from the tokenizer vocabulary; saved with the weights)."""
        self.token_term.copy_(torch.as_tensor(token_term, dtype=torch.long))

    def ontology_bias(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) attention-logit bias of each note token: the learned prior of its term, else 0."""
        terms = self.token_term[token_ids]
        return torch.where(terms >= 0, self.term_bias[terms.clamp_min(0)], torch.zeros_like(terms, dtype=torch.float))

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        modality_present: torch.Tensor,
        output_attentions: bool = False,
        impute_missing: bool = False,
        generator: torch.Generator | None = None,
    ) -> ModelOutput:
        """Diagnose from the modalities in ``modality_present`` (B, 3); with ``impute_missing`` the
        latent of each absent modality is inpainted by the latent diffusion model from the present
        ones. Modalities outside ``spec.modalities`` are never used."""
        modality_present = modality_present & self.allowed_modalities
        allowed, tabular_in = self.spec.modalities, batch["tabular"]
        d_model, n_rows = self.spec.model.d_model, tabular_in.shape[0]
        # an encoder the model may not use is skipped (no tokens, a zero latent): the CNN is the costliest
        image_encode = self.image_encoder if "image" in allowed else self.image_encoder.absent
        image = image_encode(batch["image"])
        if "text" in allowed:
            text, text_attentions = self.text_encoder(batch["token_ids"], batch["token_mask"], output_attentions)
        else:
            text, text_attentions = absent_modality(n_rows, d_model, tabular_in), None
        if "tabular" in allowed:
            tabular = self.tabular_encoder(tabular_in, batch["tabular_missing"])
        else:
            tabular = absent_modality(n_rows, d_model, tabular_in)
        encoded = (image, text, tabular)
        latents = torch.stack([self.latent_norm(e.latent) for e in encoded], dim=1)  # (B, M, d)
        imputed = self.impute_latents(latents, modality_present, generator) if impute_missing else None
        if imputed is not None and not bool(self.allowed_modalities.all()):
            # only what the model may use is imputed; any other modality keeps the missing-modality token
            stand_in = self.fusion.missing_query.expand_as(imputed)
            imputed = torch.where(self.allowed_modalities[None, :, None], imputed, stand_in)
        key_bias = None
        if self.spec.model.ontology_attention:
            key_bias = torch.cat([
                torch.zeros(image.token_mask.shape, device=image.tokens.device),
                self.ontology_bias(batch["token_ids"]) if "text" in allowed
                else torch.zeros(text.token_mask.shape, device=text.tokens.device),
                torch.zeros(tabular.token_mask.shape, device=tabular.tokens.device),
            ], dim=1)
        fused = self.fusion(
            latents=list(latents.unbind(dim=1)),
            tokens=[e.tokens for e in encoded],
            token_masks=[e.token_mask for e in encoded],
            modality_present=modality_present,
            key_bias=key_bias,
            imputed_queries=imputed,
        )
        slices, start = {}, 0
        for name, e in zip(MODALITIES, encoded, strict=True):
            slices[name] = slice(start, start + e.tokens.shape[1])
            start += e.tokens.shape[1]
        return ModelOutput(
            logits=self.classifier(fused.z),
            z=fused.z,
            attention=fused.attention,
            token_slices=slices,
            modality_latents=latents,
            text_attentions=text_attentions,
            lesion_logits=image.lesion_logits,
        )

    @torch.no_grad()
    def impute_latents(
        self, latents: torch.Tensor, modality_present: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, M, d): the latents (B, M, d) of absent modalities inpainted from the present ones (z is
        unknown too and inpainted alongside); present modalities keep their latents."""
        stack = LatentStack.build(latents, modality_present)
        steps = self.spec.diffusion.imputation_steps
        filled = self.diffusion.inpaint(stack.values, stack.known, steps, generator)
        return LatentStack.complete(filled).modality_latents

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | None = None,
    ) -> LatentStack:
        """Class-conditional latent stacks for ``labels`` (B,), sampled with classifier-free guidance."""
        return LatentStack.complete(self.diffusion.sample(labels, num_inference_steps, guidance_scale, generator))

    def classify_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)
