"""The stage-2 text disentangler: built encoder round trip, pooling, frozen heads, losses, sampling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgmedgen.model.configbase import ConfigError, build_config, choose_preset  # noqa: E402
from vgmedgen.model.text import (  # noqa: E402
    SPECIAL_TOKENS,
    TEXT_PRESETS,
    TextConfig,
    TextDisentangler,
    TextEncoder,
    TextEncoderError,
    alignment_losses,
    alignment_step_losses,
    build_text_encoder,
    vocabulary_from_texts,
)

CAPTIONS = [
    "A large irregular dark-brown lesion in the upper left, on light skin with hair.",
    "Small round pink lesion, centred; vignetted illumination, polarised device.",
    "Medium oval blue-grey lesion at the lower right with a blurred border, dark skin.",
    "Small lobulated black lesion, upper right, ruler marks, even illumination.",
]
ANATOMY = ["large irregular lesion, upper left", "small round lesion, centred", "", None]
STYLE = ["dark-brown, light skin, hair", None, "blue-grey, dark skin", "black, ruler marks"]
TINY = TEXT_PRESETS["tiny"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: two OpenMP threads on the shared 2-core box spin-wait badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = vocabulary_from_texts(CAPTIONS + [t for t in ANATOMY + STYLE if t])
    return build_text_encoder(words, tmp_path_factory.mktemp("bert"), hidden=32, layers=2, heads=2, seed=0)


def make_model(encoder_dir: Path, seed: int = 0, **overrides: object) -> TextDisentangler:
    torch.manual_seed(seed)
    config = TINY.model_copy(update=overrides) if overrides else TINY
    return TextDisentangler.from_config(config, encoder_dir)


# -- config -------------------------------------------------------------------------------------------


def test_presets_and_config_validation() -> None:
    assert set(TEXT_PRESETS) == {"tiny", "demo", "pixart-512"}
    assert choose_preset(TEXT_PRESETS, "pixart-512", "text").encoder_hidden == 768
    cfg = TextConfig()
    assert (cfg.frozen, cfg.head_hidden, cfg.recon_weight) == (True, 512, 0.5)
    assert (cfg.cosine_anatomy_weight, cfg.cosine_style_weight, cfg.decorrelation_weight) == (1.0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="divisible by encoder_heads"):
        build_config(TextConfig, {"encoder_hidden": 30, "encoder_heads": 4})
    with pytest.raises(ConfigError, match="Did you mean 'mse_weight'"):
        build_config(TextConfig, {"mse_weigth": 0.0})


# -- vocabulary and the built encoder -----------------------------------------------------------------


def test_vocabulary_from_texts_splits_like_bert() -> None:
    words = vocabulary_from_texts(["Dark-Brown lesion, café-au-lait.", None, "", "lesion  LESION"])
    assert words == sorted(words)
    assert words == [",", "-", ".", "au", "brown", "cafe", "dark", "lait", "lesion"]


def test_built_encoder_loads_through_from_pretrained(encoder_dir: Path) -> None:
    names = {p.name for p in encoder_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= names
    encoder = TextEncoder.from_pretrained(encoder_dir, max_length=48)
    tok = encoder.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = tok(CAPTIONS[0])["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids  # every training word has its own id
    assert tok.unk_token_id in tok("a purple lesion")["input_ids"]  # unseen word
    assert encoder.hidden_size == 32 and not any(p.requires_grad for p in encoder.parameters())


def test_build_is_deterministic_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    words = vocabulary_from_texts(CAPTIONS)
    state = torch.random.get_rng_state()
    a = TextEncoder.from_pretrained(build_text_encoder(words, tmp_path / "a", seed=3))
    b = TextEncoder.from_pretrained(build_text_encoder(words, tmp_path / "b", seed=3))
    c = TextEncoder.from_pretrained(build_text_encoder(words, tmp_path / "c", seed=4))
    assert torch.equal(state, torch.random.get_rng_state())
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embeddings.word_embeddings.weight"], sc["embeddings.word_embeddings.weight"])


def test_reload_gives_identical_embeddings(encoder_dir: Path, tmp_path: Path) -> None:
    first = TextEncoder.from_pretrained(encoder_dir)
    first.save_pretrained(tmp_path / "copy")
    second = TextEncoder.from_pretrained(tmp_path / "copy")
    for x, y in zip(first.encode(CAPTIONS), second.encode(CAPTIONS)):
        assert torch.equal(x, y)


def test_mean_pooling_and_padding_invariance(encoder_dir: Path) -> None:
    encoder = TextEncoder.from_pretrained(encoder_dir)
    pooled, tokens, mask = encoder.encode(CAPTIONS)
    n, length, hidden = tokens.shape
    assert pooled.shape == (4, 32) and mask.shape == (n, length) and hidden == 32
    assert mask.sum(dim=1).min() < length  # some rows are padded
    i = int(mask.sum(dim=1).argmin())
    expected = tokens[i, mask[i].bool()].mean(dim=0)
    torch.testing.assert_close(pooled[i], expected)
    alone, _, _ = encoder.encode([CAPTIONS[i]])
    torch.testing.assert_close(alone[0], pooled[i], atol=1e-5, rtol=1e-5)


def test_truncation_to_max_length(encoder_dir: Path) -> None:
    encoder = TextEncoder.from_pretrained(encoder_dir, max_length=8)
    _, tokens, mask = encoder.encode([CAPTIONS[0]])
    assert tokens.shape[1] == 8 and mask.shape == (1, 8)


def test_missing_or_incomplete_directory_errors(tmp_path: Path, encoder_dir: Path) -> None:
    absent = tmp_path / "no-such-bert"
    with pytest.raises(TextEncoderError, match=r"no-such-bert' does not exist.*config\.json.*vocab\.txt"):
        TextEncoder.from_pretrained(absent)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((encoder_dir / "config.json").read_text())
    with pytest.raises(
        TextEncoderError, match=r"partial' lacks tokenizer\.json or vocab\.txt, model\.safetensors"
    ):
        TextEncoder.from_pretrained(partial)
    with pytest.raises(TextEncoderError, match="No text encoder directory"):
        TextDisentangler.from_config(TINY)
    with pytest.raises(TextEncoderError, match="width 32 but the config says encoder_hidden=768"):
        TextDisentangler.from_config(TEXT_PRESETS["pixart-512"], encoder_dir)


# -- the disentangler -----------------------------------------------------------------------------------


def test_forward_shapes(encoder_dir: Path) -> None:
    model = make_model(encoder_dir)
    t_a, t_s, e, tokens, mask = model(CAPTIONS)
    assert t_a.shape == (4, 36) and t_s.shape == (4, 8) and e.shape == (4, 32)
    assert tokens.shape[:2] == mask.shape and tokens.shape[0] == 4
    assert model.heads.decode(t_a, t_s).shape == (4, 32)


def test_only_the_heads_train_when_frozen(encoder_dir: Path) -> None:
    model = make_model(encoder_dir).train()
    assert not model.encoder.model.training  # a frozen encoder stays in eval mode (no dropout)
    head_ids = {id(p) for p in model.heads.parameters()}
    assert {id(p) for p in model.trainable_parameters()} == head_ids
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    terms = model.step_losses(CAPTIONS, ANATOMY, STYLE, torch.rand(4, 36), torch.randn(4, 8))
    terms["total"].mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    opt.step()
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert any(not torch.equal(v, model.heads.state_dict()[k]) for k, v in heads_before.items())


def test_unfrozen_encoder_trains(encoder_dir: Path) -> None:
    model = make_model(encoder_dir, frozen=False).train()
    assert model.encoder.model.training
    terms = model.step_losses(CAPTIONS, None, None, torch.rand(4, 36), torch.randn(4, 8))
    terms["total"].mean().backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_split_is_deterministic_and_split_separate_picks_each_head(encoder_dir: Path) -> None:
    model = make_model(encoder_dir).train()  # dropout on: split must still be deterministic
    a1, s1 = model.split(CAPTIONS[0])
    a2, s2 = model.split([CAPTIONS[0]])
    assert a1.shape == (1, 36) and s1.shape == (1, 8)
    assert torch.equal(a1, a2) and torch.equal(s1, s2) and model.training
    t_a, t_s = model.split_separate(["small round lesion, centred", "large lesion"], ["pink", "black"])
    assert t_a.shape == (2, 36) and t_s.shape == (2, 8)
    torch.testing.assert_close(t_a[0], model.split("small round lesion, centred")[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_s[1], model.split("black")[1][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pair them one to one"):
        model.split_separate(["a", "b"], ["c"])


# -- losses -------------------------------------------------------------------------------------------


def test_alignment_losses_hand_values() -> None:
    a_img = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    s_img = torch.tensor([[3.0], [-1.0]])
    t_a = torch.tensor([[2.0, 4.0], [0.0, 1.0]])  # row 0: right direction, twice the scale
    t_s = torch.tensor([[3.0], [1.0]])  # row 1: opposite
    e = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    e_hat = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    terms = alignment_losses(t_a, t_s, e_hat, e, a_img, s_img, decorrelation_weight=0.0)
    torch.testing.assert_close(terms["cos_anatomy"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(terms["cos_style"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(terms["mse_anatomy"], torch.tensor([2.5, 0.0]))  # (1 + 4) / 2
    torch.testing.assert_close(terms["mse_style"], torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(terms["recon"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(terms["total"], torch.tensor([2.5 + 0.5 * 2.0, 2.0 + 4.0]))
    # Reference parity: no MSE term.
    ref = alignment_losses(t_a, t_s, e_hat, e, a_img, s_img, mse_weight=0.0)
    torch.testing.assert_close(ref["total"], torch.tensor([1.0, 2.0]))
    # Masks: an anatomy-only row supervises neither the style head nor the decoder.
    masked = alignment_losses(
        t_a, t_s, e_hat, e, a_img, s_img, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    )
    torch.testing.assert_close(masked["cos_style"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(masked["mse_style"], torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(masked["recon"], torch.tensor([0.0, 0.0]))


def test_alignment_losses_decorrelation_term() -> None:
    t_a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    t_s = 2 * t_a
    args = (t_a, t_s, torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(4, 1), torch.ones(4, 1))
    off = alignment_losses(*args)
    on = alignment_losses(*args, decorrelation_weight=0.5)
    torch.testing.assert_close(on["decorrelation"], torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(on["total"] - off["total"], torch.full((4,), 0.5), atol=1e-4, rtol=0)


def test_per_factor_text_trains_only_its_own_head(encoder_dir: Path) -> None:
    model = make_model(encoder_dir).eval()
    out = model(["large irregular lesion, upper left"])
    e_hat = model.heads.decode(out.t_a, out.t_s)
    terms = alignment_losses(
        out.t_a,
        out.t_s,
        e_hat,
        out.embedding,
        torch.rand(1, 36),
        torch.randn(1, 8),
        torch.ones(1),
        torch.zeros(1),
    )
    terms["total"].sum().backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in model.heads.style_head.parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in model.heads.decoder.parameters())
    assert float(model.heads.anatomy_head[0].weight.grad.abs().sum()) > 0


def test_step_losses_average_the_views_of_each_record(encoder_dir: Path) -> None:
    model = make_model(encoder_dir).eval()  # no dropout: the manual recomputation must match
    a_img, s_img = torch.rand(4, 36), torch.randn(4, 8)
    terms = alignment_step_losses(model, CAPTIONS, ANATOMY, STYLE, a_img, s_img)
    assert set(terms) == {
        "cos_anatomy",
        "cos_style",
        "mse_anatomy",
        "mse_style",
        "recon",
        "decorrelation",
        "total",
    }
    assert all(v.shape == (4,) for v in terms.values())
    with torch.no_grad():
        cap = model(CAPTIONS)
        anat = model([ANATOMY[0], ANATOMY[1]])  # records 0 and 1 have anatomy texts
        sty = model([STYLE[0], STYLE[2], STYLE[3]])  # records 0, 2 and 3 have style texts
    cos = torch.nn.functional.cosine_similarity
    exp_cos_a0 = ((1 - cos(cap.t_a[0], a_img[0], dim=0)) + (1 - cos(anat.t_a[0], a_img[0], dim=0))) / 2
    exp_cos_a2 = 1 - cos(cap.t_a[2], a_img[2], dim=0)  # empty anatomy text: caption only
    exp_cos_s1 = 1 - cos(cap.t_s[1], s_img[1], dim=0)  # no style text: caption only
    exp_cos_s3 = ((1 - cos(cap.t_s[3], s_img[3], dim=0)) + (1 - cos(sty.t_s[2], s_img[3], dim=0))) / 2
    got = terms
    torch.testing.assert_close(got["cos_anatomy"][0], exp_cos_a0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["cos_anatomy"][2], exp_cos_a2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["cos_style"][1], exp_cos_s1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["cos_style"][3], exp_cos_s3, atol=1e-5, rtol=1e-5)
    exp_recon = (model.heads.decode(cap.t_a, cap.t_s) - cap.embedding).pow(2).mean(dim=1)
    torch.testing.assert_close(got["recon"], exp_recon.detach(), atol=1e-5, rtol=1e-5)
    # Reference mode: the captions alone, the same as alignment_losses on them.
    ref_model = make_model(encoder_dir, per_factor_texts=False, mse_weight=0.0).eval()
    ref_model.heads.load_state_dict(model.heads.state_dict())
    ref = alignment_step_losses(ref_model, CAPTIONS, ANATOMY, STYLE, a_img, s_img)
    direct = alignment_losses(
        cap.t_a, cap.t_s, model.heads.decode(cap.t_a, cap.t_s), cap.embedding, a_img, s_img, mse_weight=0.0
    )
    torch.testing.assert_close(ref["total"], direct["total"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"priors must be \(4, 36\) and \(4, 8\)"):
        alignment_step_losses(model, CAPTIONS, None, None, torch.rand(4, 8), s_img)


def test_short_training_run_aligns_heads(encoder_dir: Path) -> None:
    model = make_model(encoder_dir).train()
    g = torch.Generator().manual_seed(0)
    a_img, s_img = torch.rand(4, 36, generator=g), torch.randn(4, 8, generator=g)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    totals = []
    for _ in range(40):
        opt.zero_grad()
        terms = model.step_losses(CAPTIONS, ANATOMY, STYLE, a_img, s_img)
        terms["total"].mean().backward()
        opt.step()
        totals.append(float(terms["total"].detach().mean()))
    assert totals[-1] < 0.5 * totals[0], (totals[0], totals[-1])


# -- standardized priors ----------------------------------------------------------------------------


def test_standardized_heads_map_back_to_the_priors_space_and_save_their_statistics(
    encoder_dir: Path, tmp_path: Path
) -> None:
    from vgmedgen.model.vgmedgen import load_text, save_text

    plain = make_model(encoder_dir)
    assert not any("_mean" in k or "_std" in k for k in plain.heads.state_dict())  # reference keys only
    with pytest.raises(RuntimeError, match="standardize_priors"):
        plain.heads.init_standardization(torch.zeros(2, 36), torch.zeros(2, 8))
    model = make_model(encoder_dir, standardize_priors=True).eval()
    g = torch.Generator().manual_seed(0)
    a_img = torch.rand(64, 36, generator=g)
    s_img = torch.randn(64, 8, generator=g) * torch.logspace(-2, 2, 8)  # spreads from 0.01 to 100
    model.heads.init_standardization(a_img, s_img)
    torch.testing.assert_close(model.heads.style_std, s_img.std(0))
    e = model.encoder.encode(CAPTIONS)[0]
    t_a, t_s = model.heads(e)
    torch.testing.assert_close(t_s, s_img.mean(0) + s_img.std(0) * model.heads.style_head(e))
    torch.testing.assert_close(model.heads.standardize(t_a, t_s)[1], model.heads.style_head(e))
    # The losses are taken between standardized vectors.
    terms = model.step_losses(CAPTIONS, None, None, a_img[:4], s_img[:4])
    z_s = (s_img[:4] - s_img.mean(0)) / s_img.std(0)
    torch.testing.assert_close(terms["mse_style"], (model.heads.style_head(e) - z_s).pow(2).mean(dim=1))
    # The statistics travel with the saved heads.
    save_text(model, tmp_path / "text")
    loaded = load_text(tmp_path / "text", model.config).eval()
    torch.testing.assert_close(loaded.heads.style_mean, model.heads.style_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded(CAPTIONS).t_s, model(CAPTIONS).t_s)


def test_standardized_alignment_learns_a_small_feature_the_plain_one_leaves_at_the_mean(
    encoder_dir: Path,
) -> None:
    # Two style features per caption: a large one (spread ~10, like the style mean mu) and a small one
    # (spread ~0.05, like a lesion's mean colour) that differs between the captions. Same steps and lr.
    g = torch.Generator().manual_seed(1)
    s_img = torch.stack([torch.randn(4, generator=g) * 10, torch.tensor([0.05, -0.05, 0.08, -0.08])], dim=1)
    s_img = torch.cat([s_img, torch.zeros(4, 6)], dim=1)  # (4, 8)
    a_img = torch.rand(4, 36, generator=g)
    errors = {}
    for standardize in (False, True):
        model = make_model(encoder_dir, standardize_priors=standardize, head_dropout=0.0).train()
        if standardize:
            # The statistics come from many records in training; here from the 4 targets, repeated.
            model.heads.init_standardization(a_img.repeat(8, 1), s_img.repeat(8, 1))
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
        for _ in range(200):  # measured: relative errors 0.85 (plain, wrong signs) and 0.05 (standardized)
            opt.zero_grad()
            model.step_losses(CAPTIONS, None, None, a_img, s_img)["total"].mean().backward()
            opt.step()
        t_s = model.split(CAPTIONS)[1]
        # Error on the small feature relative to its own spread among the captions.
        errors[standardize] = float((t_s[:, 1] - s_img[:, 1]).abs().mean() / s_img[:, 1].abs().mean())
    assert errors[True] < 0.25, errors
    assert errors[False] > 2 * errors[True], errors
