"""Stage 2 of VG-MedGen: the text disentangler (cross-modal latent alignment).

Paper: Huang et al., "Visually-Guided Controllable Medical Image Generation via Fine-Grained
Semantic Disentanglement" (arXiv 2603.10519); reference code hx111/VG-MedGen
``models/text_models1.py`` and ``train_disentangler1.py``. See docs/method.md, section "Stage 2".

A frozen BERT-family encoder turns a caption into a mean-pooled embedding E; two MLP heads map E
to t_a (anatomy) and t_s (style), trained to align with the visual priors that stage 1 extracts
from the caption's image; a decoder rebuilds E from (t_a, t_s). Ours on top of the reference: an
MSE term so that the heads learn the priors' scale (cosine leaves it free), an optional
decorrelation term between t_a and t_s, and per-factor texts: each record's ``anatomy_text``
and ``style_text`` also train their own head alone, so separate anatomy and style prompts are in
distribution at sampling.

Shape legend: N batch, L text tokens, H encoder width, A anatomy prior size, S style size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from pydantic import Field, model_validator
from torch import Tensor

from vgmedgen.model.configbase import ConfigError, StrictConfig
from vgmedgen.model.losses import cosine_alignment, decorrelation, mse

__all__ = [
    "SPECIAL_TOKENS",
    "TEXT_PRESETS",
    "TextConfig",
    "TextDisentangler",
    "TextEncoder",
    "TextEncoderError",
    "TextHeads",
    "TextOutput",
    "alignment_losses",
    "alignment_step_losses",
    "build_text_encoder",
    "vocabulary_from_texts",
]

# BERT's special tokens, in the order (and so with the ids 0..4) BertTokenizer assumes by default.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Files a usable encoder directory holds (save_pretrained of a tokenizer and a model).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


class TextConfig(StrictConfig):
    """Everything that defines the text disentangler and its stage-2 training defaults.

    ``anatomy_dim`` and ``style_dim`` must equal the visual priors' sizes
    (``VisualConfig.anatomy_prior_dim`` and ``VisualConfig.style_prior_dim``); the caller that
    composes both stages passes them. ``encoder_hidden`` is the encoder's width H: checked
    against a loaded encoder, and used (with ``encoder_layers``/``encoder_heads``) when
    :func:`build_text_encoder` makes a small random BERT for presets without a pretrained one.
    """

    encoder_dir: Path | None = Field(
        None, description="local directory of a BERT-family encoder (config.json, tokenizer, weights)"
    )
    frozen: bool = True
    max_length: int = Field(128, ge=4, le=4096)
    encoder_hidden: int = Field(768, ge=1)
    encoder_layers: int = Field(12, ge=1)
    encoder_heads: int = Field(12, ge=1)
    head_hidden: int = Field(512, ge=1)
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    anatomy_dim: int = Field(36, ge=1, description="A: 4*(K+1) for the moments prior, K for area")
    style_dim: int = Field(8, ge=1, description="S: the style size of the visual disentangler")
    cosine_anatomy_weight: float = Field(1.0, ge=0.0)
    cosine_style_weight: float = Field(1.0, ge=0.0)
    mse_weight: float = Field(1.0, ge=0.0, description="ours: learn the priors' scale; 0 = reference")
    recon_weight: float = Field(0.5, ge=0.0)
    decorrelation_weight: float = Field(0.0, ge=0.0)
    per_factor_texts: bool = Field(
        True, description="ours: also train each head on its own per-factor text; False = reference"
    )
    standardize_priors: bool = Field(
        False,
        description="ours: the heads regress onto the visual priors standardized per feature (mean and std "
        "of the training priors, set before the first step and saved with the heads), and the alignment "
        "losses are taken there; without it a feature's weight in the MSE and cosine is its spread, so "
        "small-valued features (a lesion's mean colour beside the style mean mu) are learnt last and "
        "rare values regress to the population mean",
    )

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.encoder_hidden % self.encoder_heads:
            raise ValueError(
                f"encoder_hidden ({self.encoder_hidden}) must be divisible by encoder_heads "
                f"({self.encoder_heads})"
            )
        return self


TEXT_PRESETS: dict[str, TextConfig] = {
    # Unit tests: a 2-layer BERT of width 32 built from the captions' words.
    "tiny": TextConfig(max_length=48, encoder_hidden=32, encoder_layers=2, encoder_heads=2, head_hidden=64),
    # The CPU demo: a small random BERT built by `prepare` from the training captions, trained with the
    # heads (frozen=False; frozen is the default elsewhere): a random encoder's mean-pooled embedding barely
    # moves when one word of a caption changes, and the frozen one left the rare pigments (black, pink,
    # blue-grey: 2 % of the records each) at the population mean (t_s pigment probe 0.80; 1.00 trained).
    "demo": TextConfig(
        max_length=64,
        encoder_hidden=128,
        encoder_layers=2,
        encoder_heads=4,
        head_hidden=512,
        frozen=False,
        standardize_priors=True,
    ),
    # The paper: emilyalsentzer/Bio_ClinicalBERT (width 768) from a local directory.
    "pixart-512": TextConfig(max_length=128, encoder_hidden=768, encoder_layers=12, encoder_heads=12),
}


class TextEncoderError(ConfigError):
    """The text encoder directory is missing, incomplete or does not match the config."""


# ----------------------------------------------------------------------------------------------
# Vocabulary and a small random BERT for presets without a pretrained encoder
# ----------------------------------------------------------------------------------------------


def vocabulary_from_texts(texts: Sequence[str]) -> list[str]:
    """The sorted set of lowercase word and punctuation tokens in ``texts``.

    Splits as BERT's basic tokenizer does (the ``tokenizers`` BertNormalizer and
    BertPreTokenizer that ``BertTokenizer`` itself uses: lowercase, accents stripped, split on
    whitespace and punctuation), so every word seen in training maps to its own id.

    Args:
        texts: captions (None or empty entries are skipped).

    Returns:
        Sorted unique tokens, without BERT's special tokens.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for text in texts:
        if not text:
            continue
        words.update(tok for tok, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    return sorted(words - set(SPECIAL_TOKENS))


def build_text_encoder(
    words: Sequence[str],
    out_dir: Path | str,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    max_position: int = 512,
) -> Path:
    """Write a word-level BERT tokenizer and a small randomly initialised BertModel to ``out_dir``.

    For presets where no pretrained encoder exists (tiny, demo). The vocabulary is the special
    tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` then the sorted, lowercased, de-duplicated
    ``words``; both parts are saved with ``save_pretrained``, so the result loads through the
    same ``from_pretrained`` path as a downloaded encoder. The weights depend only on ``seed``
    and the arguments (the global torch RNG is left untouched).

    Args:
        words: the vocabulary (e.g. :func:`vocabulary_from_texts` of the training captions).
        out_dir: directory to write (created if needed); the caller owns the path.
        hidden: width H; ``layers``, ``heads``: depth and attention heads.
        seed: RNG seed of the random initialisation.
        max_position: longest token sequence the model accepts.

    Returns:
        ``out_dir`` as a Path.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    if hidden % heads:
        raise ConfigError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    words_norm = sorted({w.lower() for w in words if w and w.strip()} - set(SPECIAL_TOKENS))
    if not words_norm:
        raise ConfigError("build_text_encoder needs at least one word for the vocabulary; got none")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words_norm])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_position,
        pad_token_id=vocab["[PAD]"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# The frozen encoder
# ----------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """A BERT-family encoder and its tokenizer, with attention-mask mean pooling.

    ``encode`` runs under ``no_grad`` while frozen (the default), so a frozen encoder costs no
    activation memory and can never be trained by accident.
    """

    def __init__(
        self, model: nn.Module, tokenizer: object, max_length: int = 128, frozen: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_pretrained(
        cls, directory: Path | str, max_length: int = 128, frozen: bool = True
    ) -> TextEncoder:
        """Load tokenizer and model from a local directory (``local_files_only=True``).

        Raises:
            TextEncoderError: the directory is missing, lacks config.json, tokenizer files
                (tokenizer.json or vocab.txt) or weights, or transformers cannot load it.
        """
        from transformers import AutoModel, AutoTokenizer

        path = Path(directory)
        expected = (
            "config.json, tokenizer files (tokenizer.json or vocab.txt, with tokenizer_config.json) "
            "and weights (model.safetensors or pytorch_model.bin)"
        )
        how = (
            "Point `encoder_dir` at a local copy of a BERT-family encoder (e.g. "
            "emilyalsentzer/Bio_ClinicalBERT), or build a small one with build_text_encoder."
        )
        if not path.is_dir():
            raise TextEncoderError(
                f"Text encoder directory '{path}' does not exist. It must hold {expected}. {how}"
            )
        present = {p.name for p in path.iterdir()}
        missing = []
        if "config.json" not in present:
            missing.append("config.json")
        if not present & set(_TOKENIZER_FILES):
            missing.append("tokenizer.json or vocab.txt")
        if not present & set(_WEIGHT_FILES):
            missing.append("model.safetensors or pytorch_model.bin")
        if missing:
            raise TextEncoderError(
                f"Text encoder directory '{path}' lacks {', '.join(missing)}; it must hold {expected}. {how}"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise TextEncoderError(f"Could not load the text encoder from '{path}': {err}. {how}") from err
        return cls(model, tokenizer, max_length=max_length, frozen=frozen)

    def save_pretrained(self, directory: Path | str) -> None:
        """Write tokenizer and model so that :meth:`from_pretrained` loads them back."""
        self.tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
        self.model.save_pretrained(directory)  # type: ignore[operator]

    @property
    def hidden_size(self) -> int:
        """H, the encoder's width (read from its own config)."""
        return int(self.model.config.hidden_size)  # type: ignore[union-attr]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        """A frozen encoder stays in eval mode (no dropout) whatever the parent's mode."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Tokenise and encode a batch of texts.

        ``E = sum_l(m_l h_l) / max(sum_l m_l, 1e-9)`` over the last hidden states h with the
        attention mask m (special tokens included, as the reference).

        Args:
            texts: N strings.

        Returns:
            ``E (N, H)``, ``token_embeds (N, L, H)`` (last hidden states), ``attention_mask (N, L)``.
        """
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("encode expects a non-empty list of strings")
        batch = self.tokenizer(  # type: ignore[operator]
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        grad = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with grad:
            hidden = self.model(**batch).last_hidden_state  # (N, L, H)
        mask = batch["attention_mask"]  # (N, L)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)  # (N, H)
        return pooled, hidden, mask


# ----------------------------------------------------------------------------------------------
# Heads and losses
# ----------------------------------------------------------------------------------------------


class TextHeads(nn.Module):
    """Two MLPs E -> t_a, E -> t_s and a decoder (t_a, t_s) -> E_hat (the reference's shapes).

    With ``standardize_priors`` the MLPs output standardized vectors and :meth:`forward` maps them
    back to the priors' space (``t = mean + std * head(E)``) with per-feature buffers that
    :meth:`init_standardization` sets from training priors; the decoder reads the standardized
    vectors. Without it the buffers do not exist (the reference's parameters, nothing more).
    """

    def __init__(self, hidden: int, config: TextConfig) -> None:
        super().__init__()
        h, w, p = hidden, config.head_hidden, config.head_dropout
        self.anatomy_head = nn.Sequential(
            nn.Linear(h, w), nn.ReLU(), nn.Dropout(p), nn.Linear(w, config.anatomy_dim)
        )
        self.style_head = nn.Sequential(
            nn.Linear(h, w), nn.ReLU(), nn.Dropout(p), nn.Linear(w, config.style_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(config.anatomy_dim + config.style_dim, w), nn.ReLU(), nn.Linear(w, h)
        )
        self.standardized = config.standardize_priors
        if self.standardized:
            for name, dim in (("anatomy", config.anatomy_dim), ("style", config.style_dim)):
                self.register_buffer(f"{name}_mean", torch.zeros(dim))
                self.register_buffer(f"{name}_std", torch.ones(dim))

    @torch.no_grad()
    def init_standardization(
        self, anatomy_priors: Tensor, style_priors: Tensor, min_std: float = 1e-3
    ) -> None:
        """Per-feature mean and std (floored at ``min_std``) of sample priors ``(M, A)``, ``(M, S)``."""
        if not self.standardized:
            raise RuntimeError("these heads were built without standardize_priors=True")
        for name, x in (("anatomy", anatomy_priors), ("style", style_priors)):
            x = x.detach().float()
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(min_std))

    def standardize(self, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Vectors in the priors' space ``(N, A), (N, S)`` -> standardized (identity without buffers)."""
        if not self.standardized:
            return a, s
        return (a - self.anatomy_mean) / self.anatomy_std, (s - self.style_mean) / self.style_std

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """``E (N, H) -> t_a (N, A), t_s (N, S)``, in the priors' space."""
        a, s = self.anatomy_head(e), self.style_head(e)
        if self.standardized:
            a, s = self.anatomy_mean + self.anatomy_std * a, self.style_mean + self.style_std * s
        return a, s

    def decode(self, t_a: Tensor, t_s: Tensor) -> Tensor:
        """``t_a (N, A), t_s (N, S) -> E_hat (N, H)``."""
        return self.decoder(torch.cat(self.standardize(t_a, t_s), dim=1))


def alignment_losses(
    t_a: Tensor,
    t_s: Tensor,
    e_hat: Tensor,
    e: Tensor,
    a_img: Tensor,
    s_img: Tensor,
    mask_a: Tensor | None = None,
    mask_s: Tensor | None = None,
    *,
    cosine_anatomy_weight: float = 1.0,
    cosine_style_weight: float = 1.0,
    mse_weight: float = 1.0,
    recon_weight: float = 0.5,
    decorrelation_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Stage-2 loss terms per text row, and their weighted ``total``.

    ``total = w_ca m_a (1 - cos(t_a, a_img)) + w_cs m_s (1 - cos(t_s, s_img))
    + w_mse (m_a MSE(t_a, a_img) + m_s MSE(t_s, s_img)) + w_rec m_a m_s MSE(E_hat, E)
    + w_dec decor(t_a, t_s)``, where ``m_a``/``m_s`` say whether the row supervises the anatomy /
    style head (1 for a full caption; a per-factor text supervises only its own head). The
    reconstruction needs both factors, so it applies to full-caption rows only; the
    decorrelation is the batch cross-correlation over those rows, repeated on each row (its batch
    mean equals it). The reference is ``mse_weight = decorrelation_weight = 0``.

    Args:
        t_a, t_s: ``(N, A)``, ``(N, S)`` head outputs.
        e_hat, e: ``(N, H)`` reconstructed and encoder embeddings.
        a_img, s_img: ``(N, A)``, ``(N, S)`` visual priors of each row's image.
        mask_a, mask_s: ``(N,)`` {0, 1} (default all 1).

    Returns:
        ``cos_anatomy``, ``cos_style``, ``mse_anatomy``, ``mse_style``, ``recon``,
        ``decorrelation`` and ``total``, each ``(N,)``, already multiplied by their masks.
    """
    n = t_a.shape[0]
    ones = t_a.new_ones(n)
    m_a = ones if mask_a is None else mask_a.to(t_a.dtype)
    m_s = ones if mask_s is None else mask_s.to(t_a.dtype)
    both = m_a * m_s
    a_img, s_img, e = a_img.to(t_a.dtype), s_img.to(t_a.dtype), e.detach()
    terms = {
        "cos_anatomy": m_a * cosine_alignment(t_a, a_img),
        "cos_style": m_s * cosine_alignment(t_s, s_img),
        "mse_anatomy": m_a * mse(t_a, a_img),
        "mse_style": m_s * mse(t_s, s_img),
        "recon": both * mse(e_hat, e),
    }
    rows = both.bool()
    if decorrelation_weight > 0.0 and int(rows.sum()) >= 2:
        terms["decorrelation"] = decorrelation(t_a[rows], t_s[rows]).expand(n)
    else:
        terms["decorrelation"] = t_a.new_zeros(n)
    terms["total"] = (
        cosine_anatomy_weight * terms["cos_anatomy"]
        + cosine_style_weight * terms["cos_style"]
        + mse_weight * (terms["mse_anatomy"] + terms["mse_style"])
        + recon_weight * terms["recon"]
        + decorrelation_weight * terms["decorrelation"]
    )
    return terms


class TextOutput(NamedTuple):
    """What :meth:`TextDisentangler.forward` returns (unpacks as a plain tuple)."""

    t_a: Tensor  # (N, A)
    t_s: Tensor  # (N, S)
    embedding: Tensor  # (N, H) pooled E
    token_embeds: Tensor  # (N, L, H)
    attention_mask: Tensor  # (N, L)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block with ``module`` in eval mode, then restore its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class TextDisentangler(nn.Module):
    """The stage-2 model: a (frozen) text encoder and the t_a / t_s heads with their decoder.

    Checkpoints: with a frozen encoder only ``heads`` train, so save ``model.heads.state_dict()``
    and the encoder directory (``model.encoder.save_pretrained(dir)`` for a built one); with an
    unfrozen encoder save the encoder too.
    """

    def __init__(self, config: TextConfig, encoder: TextEncoder) -> None:
        super().__init__()
        if encoder.hidden_size != config.encoder_hidden:
            raise TextEncoderError(
                f"The text encoder has width {encoder.hidden_size} but the config says "
                f"encoder_hidden={config.encoder_hidden}; set encoder_hidden to {encoder.hidden_size} "
                "or point encoder_dir at the intended encoder."
            )
        self.config = config
        self.encoder = encoder
        self.heads = TextHeads(encoder.hidden_size, config)
        self._init_weights()

    @classmethod
    def from_config(cls, config: TextConfig, encoder_dir: Path | str | None = None) -> TextDisentangler:
        """Load the encoder from ``encoder_dir`` (or ``config.encoder_dir``) and build fresh heads."""
        directory = encoder_dir if encoder_dir is not None else config.encoder_dir
        if directory is None:
            raise TextEncoderError(
                "No text encoder directory: set `encoder_dir` to a local BERT-family encoder, or "
                "build one from the training captions with build_text_encoder."
            )
        encoder = TextEncoder.from_pretrained(directory, max_length=config.max_length, frozen=config.frozen)
        return cls(config, encoder)

    def _init_weights(self) -> None:
        """The heads keep PyTorch's default Linear init, as the reference does (nothing special)."""

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, texts: Sequence[str]) -> TextOutput:
        """``N texts -> (t_a (N, A), t_s (N, S), E (N, H), token_embeds (N, L, H), attention_mask (N, L))``."""
        e, tokens, mask = self.encoder.encode(texts)
        t_a, t_s = self.heads(e)
        return TextOutput(t_a, t_s, e, tokens, mask)

    @torch.no_grad()
    def split(self, captions: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Sampling: split captions into ``t_a (N, A)`` and ``t_s (N, S)`` (deterministic)."""
        texts = [captions] if isinstance(captions, str) else list(captions)
        with _eval_mode(self):
            out = self(texts)
        return out.t_a, out.t_s

    @torch.no_grad()
    def split_separate(
        self, anatomy_prompts: str | Sequence[str], style_prompts: str | Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """Sampling from two prompts: t_a from the anatomy prompt's anatomy head, t_s from the
        style prompt's style head (one encoder pass for both). Returns ``(N, A), (N, S)``."""
        a = [anatomy_prompts] if isinstance(anatomy_prompts, str) else list(anatomy_prompts)
        s = [style_prompts] if isinstance(style_prompts, str) else list(style_prompts)
        if len(a) != len(s):
            raise ValueError(f"got {len(a)} anatomy prompts but {len(s)} style prompts; pair them one to one")
        with _eval_mode(self):
            out = self([*a, *s])
        n = len(a)
        return out.t_a[:n], out.t_s[n:]

    # -- training --------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads, plus the encoder when it is not frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def step_losses(
        self,
        captions: Sequence[str],
        anatomy_texts: Sequence[str | None] | None,
        style_texts: Sequence[str | None] | None,
        anatomy_prior: Tensor,
        style_prior: Tensor,
    ) -> dict[str, Tensor]:
        """See :func:`alignment_step_losses`."""
        return alignment_step_losses(self, captions, anatomy_texts, style_texts, anatomy_prior, style_prior)


def alignment_step_losses(
    model: TextDisentangler,
    captions: Sequence[str],
    anatomy_texts: Sequence[str | None] | None,
    style_texts: Sequence[str | None] | None,
    anatomy_prior: Tensor,
    style_prior: Tensor,
) -> dict[str, Tensor]:
    """All stage-2 loss terms for a batch of N records, one value per record.

    Every record contributes its caption (supervising both heads and the decoder) and, with
    ``config.per_factor_texts``, its ``anatomy_text`` (anatomy head only) and ``style_text``
    (style head only); missing or empty per-factor texts are skipped. All texts go through the
    encoder in one batch. Each term is then averaged, per record, over the texts that supervise
    it (so the scale matches the caption-only reference), and ``total`` is the weighted sum of
    those averages. The decorrelation term is computed over the caption rows.

    Args:
        model: the text disentangler (its config gives the weights).
        captions: N full captions.
        anatomy_texts, style_texts: N per-factor texts each (entries may be None or ""), or None.
        anatomy_prior: ``(N, A)`` visual anatomy priors of the records' images.
        style_prior: ``(N, S)`` visual style priors.

    Returns:
        ``cos_anatomy``, ``cos_style``, ``mse_anatomy``, ``mse_style``, ``recon``,
        ``decorrelation`` and ``total``, each ``(N,)``; reduce with ``.mean()``.
    """
    c = model.config
    n = len(captions)
    if n == 0:
        raise ValueError("alignment_step_losses needs at least one caption")
    if anatomy_prior.shape != (n, c.anatomy_dim) or style_prior.shape != (n, c.style_dim):
        raise ValueError(
            f"priors must be ({n}, {c.anatomy_dim}) and ({n}, {c.style_dim}) (anatomy_dim/style_dim "
            f"of the config), got {tuple(anatomy_prior.shape)} and {tuple(style_prior.shape)}"
        )
    texts: list[str] = list(captions)
    owner: list[int] = list(range(n))
    sup_a: list[float] = [1.0] * n
    sup_s: list[float] = [1.0] * n
    if c.per_factor_texts:
        for extra, (fa, fs) in ((anatomy_texts, (1.0, 0.0)), (style_texts, (0.0, 1.0))):
            if extra is None:
                continue
            if len(extra) != n:
                raise ValueError(f"got {len(extra)} per-factor texts for {n} captions")
            for i, text in enumerate(extra):
                if text:
                    texts.append(text)
                    owner.append(i)
                    sup_a.append(fa)
                    sup_s.append(fs)
    out = model(texts)
    device = out.t_a.device
    idx = torch.tensor(owner, device=device)  # (R,) record of each text row
    mask_a = torch.tensor(sup_a, device=device)  # (R,)
    mask_s = torch.tensor(sup_s, device=device)  # (R,)
    e_hat = model.heads.decode(out.t_a, out.t_s)  # (R, H)
    # With standardize_priors the losses compare standardized vectors (identity otherwise).
    t_a, t_s = model.heads.standardize(out.t_a, out.t_s)  # (R, A), (R, S)
    a_img, s_img = model.heads.standardize(anatomy_prior.to(device)[idx], style_prior.to(device)[idx])
    rows = alignment_losses(
        t_a,
        t_s,
        e_hat,
        out.embedding,
        a_img,
        s_img,
        mask_a,
        mask_s,
        cosine_anatomy_weight=c.cosine_anatomy_weight,
        cosine_style_weight=c.cosine_style_weight,
        mse_weight=c.mse_weight,
        recon_weight=c.recon_weight,
        decorrelation_weight=c.decorrelation_weight,
    )

    def per_record(values: Tensor, mask: Tensor) -> Tensor:
        total = values.new_zeros(n).index_add(0, idx, values)  # (N,)
        count = mask.new_zeros(n).index_add(0, idx, mask)  # (N,)
        return total / count.clamp_min(1.0)

    both = mask_a * mask_s
    terms = {
        "cos_anatomy": per_record(rows["cos_anatomy"], mask_a),
        "cos_style": per_record(rows["cos_style"], mask_s),
        "mse_anatomy": per_record(rows["mse_anatomy"], mask_a),
        "mse_style": per_record(rows["mse_style"], mask_s),
        "recon": per_record(rows["recon"], both),
        "decorrelation": rows["decorrelation"][:n],
    }
    terms["total"] = (
        c.cosine_anatomy_weight * terms["cos_anatomy"]
        + c.cosine_style_weight * terms["cos_style"]
        + c.mse_weight * (terms["mse_anatomy"] + terms["mse_style"])
        + c.recon_weight * terms["recon"]
        + c.decorrelation_weight * terms["decorrelation"]
    )
    return terms
