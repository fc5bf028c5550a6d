"""Frozen encoders of the real-data path: the CogVideoX 3D VAE and the FLAN-T5 XL text encoder.

Both are loaded from local folders only (``local_files_only``): a training job must never stall on
or silently depend on a model hub, so a missing folder fails at once with a one-line
``MissingWeightsError`` that names the path and the command that fetches the weights. Both are
frozen (eval mode, ``requires_grad=False``, called under ``torch.no_grad``) and run in bf16 on GPU
and fp32 on CPU (see ``encoder_dtype``).

``run_text_encoder`` and ``run_vae`` choose a run's encoders from its config, in this one place
for training, sampling and evaluation (``data.text_encoder``, ``data.text_encoder_path``,
``data.vae_path``; a toy run's "VAE" is ``PixelSpace``, the identity on pixels);
``build_text_encoder`` and ``build_vae`` load them, for data/precompute.py (goku-data precompute-latents) too.
``pack_text``/``pad_text`` convert between the padded text interface and the
real-tokens-only form that latent shards store.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from goku_megatron.config import TEXT_ENCODERS, Config, ConfigError
from goku_megatron.data.text_encoder import HashTextEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VAE_WEIGHTS_HINT = "huggingface-cli download THUDM/CogVideoX-2b --include 'vae/*' --local-dir {path}"
T5_WEIGHTS_HINT = "huggingface-cli download google/flan-t5-xl --local-dir {path}"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class MissingWeightsError(FileNotFoundError):
    """A model folder is missing or incomplete; the message is one line with the download command."""


def encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (half the memory, tensor cores; the CogVideoX and FLAN-T5 reference pipelines
    run both models in bf16), fp32 elsewhere (CPU bf16 convolutions are slow, and tests compare
    against fp32 references)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _model_folder(path: str | Path, subfolder: str, hint: str) -> Path:
    """The folder holding config.json and weights: ``path`` itself or ``path/subfolder`` (a whole
    diffusers pipeline checkout, as the download command above leaves it)."""
    root = Path(path).expanduser()
    for folder in (root, root / subfolder):
        if (folder / "config.json").is_file():
            if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
                raise MissingWeightsError(f"{folder}: config.json but no *.safetensors/*.bin weights; "
                                          f"fetch them with: {hint.format(path=root)}")
            return folder
    raise MissingWeightsError(f"{root}: no model there (no config.json in it or in {subfolder}/); "
                              f"fetch it with: {hint.format(path=root)}")


class FrozenModule(torch.nn.Module):
    """Eval mode for good: T5's dropout (p=0.1 in the released configs) would otherwise silently
    perturb every embedding after a parent module's ``.train()``."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


class VideoVAE(FrozenModule):
    """The CogVideoX causal 3D VAE: pixels [B, 3, T, H, W] in [-1, 1] <-> latents [B, C', T', H', W'].

    Compression is ``temporal_factor`` in time and ``spatial_factor`` in space (4 and 8 for the
    released CogVideoX VAEs, C' = 16). The first frame is encoded on its own (the encoder is causal
    in time), so T' = (T - 1) / temporal_factor + 1 and an image is simply a clip with T = 1:

    - encode takes T = 1 or T = 1 + k * temporal_factor frames (factor 4: 1, 5, 9, 13, ..., 49),
      and H, W divisible by ``spatial_factor``;
    - decode takes an odd T' (1, 3, 5, ...; from 1 + 8k frames with factor 4) and returns
      (T' - 1) * temporal_factor + 1 frames. The CogVideoX decoder upsamples latent frames in pairs
      and only an odd count keeps the first latent frame as one frame (an even T' decodes to
      temporal_factor * T' frames, which no clip encodes to), so even T' is refused.

    Latents are the posterior mean, not a sample: the mean makes encoding deterministic, so
    precomputed latents equal online ones and a rerun writes identical shards (the flow adds its
    own noise in training anyway).
    They are scaled as the CogVideoX pipelines scale them, (mean - shift_factor) * scaling_factor
    (shift_factor is None, i.e. 0, for CogVideoX), so the latent variance is near 1 as the flow's
    noise is; decode undoes it. Latents come out in the VAE's dtype (bf16 on GPU, fp32 on CPU).
    """

    def __init__(self, vae: torch.nn.Module, path: str = "") -> None:
        super().__init__()
        self.vae = vae
        self.path = path
        self.freeze()
        config = vae.config
        levels = len(config.block_out_channels) - 1  # one downsampling per block but the last
        self.latent_channels = int(config.latent_channels)
        self.spatial_factor = 2 ** levels
        # The encoder halves time in the first log2(ratio) downsampling blocks only.
        self.temporal_factor = 2 ** min(int(math.log2(config.temporal_compression_ratio)), levels)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> VideoVAE:
        """Loads ``path`` (the VAE folder, or a CogVideoX checkout with a ``vae/`` folder)."""
        from diffusers import AutoencoderKLCogVideoX

        folder = _model_folder(path, "vae", VAE_WEIGHTS_HINT)
        device = torch.device(device)
        # torch_dtype at load (not .to() after): it keeps modules a model declares fp32 in fp32.
        vae = AutoencoderKLCogVideoX.from_pretrained(folder, local_files_only=True,
                                                     torch_dtype=encoder_dtype(device))
        return cls(vae.to(device), str(path))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C', T', H', W') of a clip of that size; raises ValueError for sizes encode refuses."""
        self._check_pixels(frames, height, width)
        return (self.latent_channels, (frames - 1) // self.temporal_factor + 1,
                height // self.spatial_factor, width // self.spatial_factor)

    def _check_pixels(self, frames: int, height: int, width: int) -> None:
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise ValueError(f"VAE encode needs 1 or 1 + k*{self.temporal_factor} frames "
                             f"(e.g. {1 + 2 * self.temporal_factor}), got {frames}")
        if height % self.spatial_factor or width % self.spatial_factor or min(height, width) < 1:
            raise ValueError(f"VAE encode needs height and width divisible by {self.spatial_factor}, "
                             f"got {height}x{width}")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, T, H, W] in [-1, 1] (any float dtype and device) -> scaled latents
        [B, C', T', H', W'] on the VAE's device and in its dtype."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"VAE encode needs pixels [B, 3, T, H, W], got {tuple(pixels.shape)}")
        self._check_pixels(*pixels.shape[2:])
        posterior = self.vae.encode(pixels.to(device=self.device, dtype=self.dtype)).latent_dist
        return (posterior.mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C', T', H', W'] with odd T' -> pixels [B, 3, (T'-1)*factor + 1, H, W],
        clamped to [-1, 1], on the VAE's device and in its dtype."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"VAE decode needs latents [B, {self.latent_channels}, T', H', W'], "
                             f"got {tuple(latents.shape)}")
        if latents.shape[2] % 2 == 0:
            raise ValueError(f"VAE decode needs an odd number of latent frames (1, 3, 5, ...; "
                             f"clips of 1 + {2 * self.temporal_factor}k frames), got {latents.shape[2]}")
        z = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1)


class T5TextEncoder(FrozenModule):
    """FLAN-T5 encoder: captions -> (emb [B, L, d_model], mask [B, L] bool), as HashTextEncoder.

    L is always ``max_tokens``: captions are padded to it, and longer ones truncated to it (keeping
    the closing ``</s>``, which the tokenizer adds after truncating). The empty
    caption used for classifier-free-guidance dropout is the single token ``</s>``, so attention
    always has a valid key. Padded positions are set to zero, as HashTextEncoder leaves them, so a
    consumer that ignores the mask still sees nothing there. Embeddings are in the encoder's dtype
    (bf16 on GPU, fp32 on CPU) on its device.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_tokens: int,
                 path: str = "") -> None:
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = int(model.config.d_model)
        self.path = path
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | Path, max_tokens: int,
                        device: torch.device | str = "cpu") -> T5TextEncoder:
        """Loads encoder weights and tokenizer from one folder (a T5 or FLAN-T5 checkout; the
        decoder weights of a full T5 checkpoint are ignored)."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = _model_folder(path, "text_encoder", T5_WEIGHTS_HINT)
        device = torch.device(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = T5EncoderModel.from_pretrained(folder, local_files_only=True,
                                               torch_dtype=encoder_dtype(device))
        return cls(model.to(device), tokenizer, max_tokens, str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.max_tokens, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return emb * mask[..., None].to(emb.dtype), mask

    encode = forward  # the VAE's verb, for callers that name it


def build_text_encoder(kind: str, path: str | Path = "", dim: int = 64, max_tokens: int = 16,
                       device: torch.device | str = "cpu") -> torch.nn.Module:
    """The text encoder ``data.text_encoder`` names: ``hash`` (no weights; width ``dim``) or ``t5``
    (weights at ``path``; its width d_model must equal ``dim``, the model's ``text_dim``)."""
    if kind == "hash":
        return HashTextEncoder(dim=dim, max_tokens=max_tokens).to(device)
    if kind == "t5":
        encoder = T5TextEncoder.from_pretrained(path, max_tokens, device)
        if encoder.dim != dim:
            raise ConfigError(f"text encoder {path} has width {encoder.dim} but model.text_dim={dim}; "
                              f"set model.text_dim={encoder.dim}")
        return encoder
    raise ConfigError(f"data.text_encoder={kind!r} is not one of {', '.join(TEXT_ENCODERS)}")


def build_vae(path: str | Path, device: torch.device | str = "cpu") -> VideoVAE:
    """The CogVideoX VAE at ``data.vae_path``."""
    return VideoVAE.from_pretrained(path, device)


class PixelSpace:
    """The toy run's "VAE": the identity on pixels [B, 3, T, H, W] in [-1, 1], so a toy model is a
    pixel-space Goku (model.in_channels=3) on the same decode -> encode -> pack path as a latent
    one. It has VideoVAE's interface; decode clamps to the pixel range as VideoVAE's does."""

    latent_channels = 3
    spatial_factor = 1
    temporal_factor = 1
    device = torch.device("cpu")
    dtype = torch.float32

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, frames, height, width)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


def check_weights(cfg: Config) -> None:
    """Fail in one line naming the field, before anything is built, when a folder of weights the
    run will load (run_vae, run_text_encoder; the VAE of a latent run only decodes its samples)
    is missing or incomplete."""
    d = cfg.data
    folders = []
    if d.kind == "raw" or (d.kind == "latent" and cfg.train.sample_interval):
        folders.append(("data.vae_path", d.vae_path, "vae", VAE_WEIGHTS_HINT))
    if d.text_encoder == "t5":
        folders.append(("data.text_encoder_path", d.text_encoder_path, "text_encoder", T5_WEIGHTS_HINT))
    for name, path, subfolder, hint in folders:
        try:
            _model_folder(path, subfolder, hint)
        except MissingWeightsError as err:
            raise ConfigError(f"{name}: {err}") from None


def run_vae(cfg: Config, device: torch.device | str = "cpu") -> VideoVAE | PixelSpace:
    """The run's VAE: PixelSpace for toy data, else the CogVideoX VAE at data.vae_path. Missing
    weights are a configuration fault (one line naming the field)."""
    if cfg.data.kind == "toy":
        return PixelSpace()
    try:
        return build_vae(cfg.data.vae_path, device)
    except MissingWeightsError as err:
        raise ConfigError(f"data.vae_path: {err}") from None


def run_text_encoder(cfg: Config, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The run's text encoder (data.text_encoder) at the model's text width. Missing weights are
    a configuration fault (one line naming the field)."""
    d = cfg.data
    try:
        return build_text_encoder(d.text_encoder, d.text_encoder_path, cfg.model.text_dim, d.max_text_tokens, device)
    except MissingWeightsError as err:
        raise ConfigError(f"data.text_encoder_path: {err}") from None


def pack_text(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One caption's padded (emb [L, d], mask [L]) -> its real tokens [n, d] (a copy, so saving it
    does not save the whole batch's storage); latent shards store this form."""
    return emb[mask].clone()


def pad_text(tokens: list[torch.Tensor], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored real tokens, one [n_i, d] per caption -> (emb [B, max_tokens, d], mask [B, max_tokens]),
    the interface of the text encoders; longer captions are truncated, padding is zero."""
    if not tokens:
        raise ValueError("pad_text needs at least one caption")
    dim = tokens[0].shape[-1]
    emb = tokens[0].new_zeros(len(tokens), max_tokens, dim)
    mask = torch.zeros(len(tokens), max_tokens, dtype=torch.bool, device=emb.device)
    for row, t in enumerate(tokens):
        n = min(t.shape[0], max_tokens)
        emb[row, :n] = t[:n]
        mask[row, :n] = True
    return emb, mask
