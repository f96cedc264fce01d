"""OpenAI's CLIP in minivl: the from-scratch BPE against open_clip's, the ViT-B/32-size port against
`transformers`, the download path (with the network replaced by a local copy) and the bad inputs.

Offline by construction: no test touches the network. The reference tokenizer is open_clip's
`tokenizer.py`, imported by file path (its package `__init__` needs torchvision, which the course
does not install); it needs `ftfy`, as OpenAI's does.
"""
import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minivl.clip as clip
from minivl.clip import hub
from minivl.clip.openai_bpe import CONTEXT_LENGTH, bpe_path, bytes_to_symbols, clean

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer (a copy of OpenAI's), loaded from its file without the package."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "install the reference: pip install --no-deps open_clip_torch"
    file = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_ref", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok():
    return clip.openai_tokenizer()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Varied strings: words, punctuation runs, digits, accents, other scripts, emoji, contractions,
    HTML entities, long words, odd whitespace, the special-token spellings, and random mixes."""
    rng = random.Random(seed)
    words = ["a", "photo", "of", "the", "Dog", "CAT", "bird", "naïve", "café", "Straße", "İstanbul", "ǅemal",
             "ﬁne", "東京", "Москва", "العربية", "🐶", "🐱🐦", "👩‍👩‍👧", "don't", "you'll", "WE'VE", "I'm", "it's",
             "&amp;", "&lt;b&gt;", "&#39;", "1984", "3.14159", "1,000,000", "#hashtag", "@user", "e-mail",
             "x" * 40, "supercalifragilisticexpialidocious", "!", '!"!', "?!", "...", "—", "(", ")", "$5",
             "<start_of_text>", "<end_of_text>", "\u00a0", "ﾟ", "Ω", "µ", "ß", "ÆØÅ", "a\u0301", "\u200b"]
    spaces = [" ", "  ", "\t", "\n", " \n ", "\u3000"]
    alphabet = [chr(c) for c in [*range(32, 127), *range(160, 400), 0x2014, 0x20AC, 0x1F600, 0x1F44D, 0x4E2D]]
    out = ["", " ", "a dog", "a cat", "a bird", "A PHOTO OF A DOG!!!", "  leading and trailing  "]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.6:
            k = rng.randint(1, 12)
            out.append("".join(rng.choice(words) + rng.choice(spaces) for _ in range(k)))
        elif kind < 0.9:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(30, 60))))  # over 77 tokens
    return out


# ---------------------------------------------------------------- tokenizer
def test_ids_equal_open_clip_on_a_varied_corpus(tok, reference):
    texts = corpus()
    ours = tok(texts, truncate=True)["input_ids"]
    theirs = reference(texts, context_length=CONTEXT_LENGTH)
    bad = [i for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    assert not bad, f"{len(bad)} texts differ, first {texts[bad[0]]!r}: {ours[bad[0]][:12]} vs {theirs[bad[0]][:12]}"
    assert sum(len(tok.encode(t)) + 2 > CONTEXT_LENGTH for t in texts) > 100  # truncation was exercised
    assert sum(0 in tok.encode(t) for t in texts) > 0  # id 0 ("!") inside a text, where padding is id 0 too


def test_vocabulary_frame_and_decode(tok, reference):
    assert tok.vocab_size == reference.vocab_size == 49408
    assert (tok.sot_id, tok.eot_id) == (reference.sot_token_id, reference.eot_token_id)
    assert sorted(bytes_to_symbols()) == sorted(reference.byte_encoder.values()) and len(set(bytes_to_symbols())) == 256
    assert tok.encode("a dog") == reference.encode("a dog") == [320, 1929]
    ids = tok(["a dog", "A  Photo of a Cat!"])
    assert ids["input_ids"].shape == (2, 77) and ids["input_ids"][0, :4].tolist() == [tok.sot_id, 320, 1929, tok.eot_id]
    assert ids["attention_mask"][0].sum() == 4 and ids["input_ids"][0, 4:].eq(0).all()
    assert tok.decode(ids["input_ids"][1]) == "a photo of a cat !"
    assert clean("  Caf&amp;eacute;\n\tOK ") == "café ok"
    assert bpe_path().name == "bpe_simple_vocab_16e6.txt.gz"


def test_without_ftfy_cleaning_skips_it_and_warns_once(monkeypatch):
    import minivl.clip.openai_bpe as ot
    monkeypatch.setitem(__import__("sys").modules, "ftfy", None)  # `import ftfy` now raises ImportError
    monkeypatch.setattr(ot, "_WARNED", False)
    with pytest.warns(UserWarning, match="ftfy is not installed"):
        assert clean("A  Dog &amp; a CAT") == "a dog & a cat"
    assert clean("ﬁne") == "ﬁne"  # the ligature ftfy would have split into "fine"


def test_text_over_77_tokens_raises_unless_truncate(tok):
    long = "a photo of a dog " * 30
    with pytest.raises(ValueError, match="context_length=77.*truncate=True"):
        clip.tokenize([long], tokenizer=tok)
    ids = clip.tokenize([long, "a dog"], truncate=True, tokenizer=tok)
    assert ids.shape == (2, 77) and ids[0, -1].item() == tok.eot_id and ids[1, 3].item() == tok.eot_id


def test_tokenize_picks_the_vocabulary_of_the_model(tok):
    course = clip.CLIP(clip.CLIPConfig.preset("tiny")).eval()
    default = clip.tokenize(["a red circle"])
    assert torch.equal(clip.tokenize(["a red circle"], model=course), default) and default.shape == (1, 40)
    with pytest.raises(ValueError, match="not the one"):
        clip.tokenize(["a dog"], model=course, tokenizer=tok)
    with pytest.raises(TypeError, match="minivl CLIP"):
        clip.tokenize(["a dog"], model="ViT-B/32")
    # the course model refuses OpenAI's 77 ids: longer than its 40 positions (and ids past its 512)
    with pytest.raises(ValueError, match="77 tokens exceeds the context length 40"):
        course.encode_text(clip.tokenize(["a dog"], tokenizer=tok))


# ---------------------------------------------------------------- the full-size port
@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory):
    """A transformers CLIPModel at ViT-B/32's sizes (random init), as the hub's config.json describes it
    (eos_token_id 2: transformers' legacy argmax pooling), saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=dict(eos_token_id=2, bos_token_id=0, pad_token_id=1))
    hf = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(np.log(100.0))  # a trained scale, at OpenAI's clamp
    folder = tmp_path_factory.mktemp("vit-b-32")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def ported(vit_b_32):
    return clip.load(vit_b_32[1], device="cpu")


def test_full_size_port_gives_transformers_embeddings_and_logits(vit_b_32, ported, tok):
    hf, (model, preprocess) = vit_b_32[0], ported
    assert isinstance(model, clip.OpenAICLIP) and isinstance(preprocess, clip.OpenAIPreprocess)
    c = model.config
    assert (c.vision.width, c.vision.depth, c.vision.patch_size, c.text.width, c.embed_dim) == (768, 12, 32, 512, 512)
    rng = np.random.default_rng(0)
    images = torch.stack([preprocess(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((224, 224), (300, 260))])
    texts = ["a dog", "a photo of a cat, wow !\"! look", "a bird " * 40]  # id 0 inside text 1; text 2 truncated
    ids = model.tokenize(texts, truncate=True)
    assert torch.equal(ids, clip.tokenize(texts, model=model, truncate=True)) and (ids[1, 1:12] == 0).any()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images)  # OpenAI's call: bare ids, no mask
        logits_per_image, logits_per_text = model(images, ids)
        image_features, text_features = model.encode_image(images), model.encode_text(ids)
        torch.testing.assert_close(image_features, _projected(ref.vision_model_output, hf.visual_projection),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text_features, _projected(ref.text_model_output, hf.text_projection),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(F.normalize(image_features, dim=-1), ref.image_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_per_image, ref.logits_per_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_per_text, ref.logits_per_text, rtol=1e-5, atol=1e-5)
        # a bare id tensor and ids + mask are the same text: it ends at the first <end_of_text>
        torch.testing.assert_close(text_features, model.encode_text(tok(texts, truncate=True)))


def _projected(tower_output, projection):  # transformers 5 projects pooler_output in place; 4.x does not
    pooled = tower_output.pooler_output
    return pooled if pooled.shape[-1] == projection.out_features else projection(pooled)


def _features(out):  # transformers 5 returns an output object whose pooler_output is projected; 4.x a tensor
    return out.pooler_output if hasattr(out, "pooler_output") else out


def test_shapes_world_ids_into_an_openai_model_are_refused(ported):
    model = ported[0]
    with pytest.raises(ValueError, match="not OpenAI BPE output.*model.tokenize"):
        model.encode_text(clip.tokenize(["a red circle"]))


# ---------------------------------------------------------------- the download path, network replaced
@pytest.fixture(scope="module")
def small_openai(tmp_path_factory):
    """A small transformers CLIP with OpenAI's vocabulary, saved as the hub serves it."""
    torch.manual_seed(1)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=small, projection_dim=16,
                                                        vision_config=dict(small, image_size=64, patch_size=32))).eval()
    folder = tmp_path_factory.mktemp("hub-copy")
    hf.save_pretrained(folder)
    return hf, folder


class FakeHub:
    """Stands in for `hub._download`: a cache folder, and a 'network' that copies from a local folder."""

    def __init__(self, source: Path, cache: Path, online: bool = True):
        self.source, self.cache, self.online, self.downloads = source, cache, online, []

    def __call__(self, repo_id, filename, *, cache_dir=None, local_files_only=False, force_download=False):
        cached = self.cache / repo_id / filename
        if local_files_only:
            if not cached.is_file():
                raise hub.NotCached(f"{repo_id}/{filename} is not cached")
            return cached
        if not self.online:
            raise ConnectionError("cannot reach https://huggingface.co")
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.source / filename, cached)
        self.downloads.append(filename)
        return cached


def test_load_by_name_downloads_once_then_reads_the_cache(small_openai, tmp_path, monkeypatch):
    hf, folder = small_openai
    fake = FakeHub(folder, tmp_path)
    monkeypatch.setattr(hub, "_download", fake)
    assert not hub.is_cached("ViT-B/32")
    model, preprocess = clip.load("ViT-B/32", device="cpu")
    assert fake.downloads == ["config.json", "model.safetensors"] and isinstance(model, clip.OpenAICLIP)
    assert hub.is_cached("ViT-B/32") and not hub.is_cached("ViT-B/16")
    fake.online = False
    again, _ = clip.load("ViT-B/32", device="cpu")  # cached: no network needed
    assert len(fake.downloads) == 2
    x = preprocess(np.random.default_rng(0).integers(0, 256, (80, 64, 3), dtype=np.uint8))[None]
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), _features(hf.get_image_features(pixel_values=x)),
                                   rtol=1e-5, atol=1e-5)


def test_offline_without_cache_says_it_needs_the_network_or_a_local_path(small_openai, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_download", FakeHub(small_openai[1], tmp_path, online=False))
    with pytest.raises(ConnectionError, match=r"needs the network.*openai/clip-vit-base-patch32.*local folder"):
        clip.load("ViT-B/32")


def test_the_real_download_function_fails_fast_and_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once, even online
    with pytest.raises(ConnectionError, match="needs the network"):
        clip.load("ViT-B/16", download_root=tmp_path)


def test_a_corrupted_cache_file_is_fetched_again_or_named(small_openai, tmp_path, monkeypatch):
    fake = FakeHub(small_openai[1], tmp_path)
    monkeypatch.setattr(hub, "_download", fake)
    clip.load("ViT-B/32")
    weights = tmp_path / "openai/clip-vit-base-patch32/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    fake.online = False
    with pytest.raises(ValueError, match=r"damaged.*model\.safetensors"):
        clip.load("ViT-B/32")
    fake.online = True
    model, _ = clip.load("ViT-B/32")  # fetched again
    assert fake.downloads[-1] == "model.safetensors" and isinstance(model, clip.OpenAICLIP)


def test_unknown_name_lists_the_available_ones():
    assert {"ViT-B/32", "ViT-B/16", "ViT-L/14"} <= set(clip.available_models())
    with pytest.raises(ValueError, match=r"unknown CLIP model 'ViT-B/33'.*'ViT-B/32'"):
        clip.load("ViT-B/33")
    with pytest.raises(ValueError, match="jit must be False"):
        clip.load("ViT-B/32", jit=True)


def test_folders_without_safetensors_or_openai_vocab_are_refused(tmp_path, small_openai):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(small_openai[1] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        clip.load(pickled)
    other = tmp_path / "other-vocab"
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2),
                                  vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=16))
    transformers.CLIPModel(cfg).save_pretrained(other)
    with pytest.raises(ValueError, match="vocab_size 1000"):
        clip.load(other)


def test_an_older_transformers_config_with_config_dicts_reads_the_same(small_openai, tmp_path):
    import json
    old = tmp_path / "old-format"
    shutil.copytree(small_openai[1], old)
    meta = json.loads((old / "config.json").read_text())
    meta["text_config_dict"], meta["vision_config_dict"] = meta.pop("text_config"), meta.pop("vision_config")
    (old / "config.json").write_text(json.dumps(meta))
    a, b = clip.load(old)[0], clip.load(small_openai[1])[0]
    assert a.config == b.config and a.config.vision.image_size == 64


def test_save_load_roundtrip_of_an_openai_model(small_openai, tmp_path):
    model, _ = clip.load(small_openai[1])
    clip.save(model, tmp_path / "mine")
    assert not (tmp_path / "mine/tokenizer.json").exists()  # OpenAI's BPE is package data
    loaded, preprocess = clip.load(tmp_path / "mine")
    assert isinstance(loaded, clip.OpenAICLIP) and isinstance(preprocess, clip.OpenAIPreprocess)
    ids = loaded.tokenize(["a dog", "a cat"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids))
        # the course's zero-shot helpers read model.tokenizer: OpenAI's here
        torch.testing.assert_close(clip.encode_texts(loaded, ["a dog", "a cat"]),
                                   F.normalize(model.encode_text(ids), dim=-1))
    assert "mine" not in clip.available_models()  # only data/checkpoints names are listed, plus OpenAI's


# ---------------------------------------------------------------- preprocess
def test_preprocess_is_openais_resize_crop_normalise():
    from PIL import Image
    pre = clip.OpenAIPreprocess(224)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 400)
    smooth = np.stack([ramp[None, :300].repeat(400, 0), ramp[:, None].repeat(300, 1), 255 - ramp[None, :300].repeat(400, 0)],
                      -1).astype(np.uint8)  # 400 x 300, portrait
    pil = Image.fromarray(smooth)
    # by hand, as OpenAI's torchvision pipeline does it: short side 300 -> 224, long 400 -> 298, crop the middle
    resized = np.asarray(pil.resize((224, 298), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    top = int(round((298 - 224) / 2))
    expect = (torch.from_numpy(resized[top:top + 224]).permute(2, 0, 1) - torch.tensor(hub.OPENAI_MEAN).view(3, 1, 1)) \
        / torch.tensor(hub.OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(pre(pil), expect, atol=1e-6, rtol=0)
    assert pre(smooth).shape == (3, 224, 224) and (pre(smooth) - expect).abs().max() < 0.1  # torch's bicubic
    assert pre(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).shape == (3, 224, 224)


def test_preprocess_rejects_tiny_images_and_wrong_modes():
    from PIL import Image
    pre = clip.OpenAIPreprocess(224)
    with pytest.raises(ValueError, match="short side of at least 16"):
        pre(np.zeros((8, 300, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="short side"):
        pre(Image.new("RGB", (10, 10)))
    with pytest.raises(ValueError, match="mode 'F'"):
        pre(Image.new("F", (64, 64)))
    with pytest.raises(ValueError, match="mode 'I;16'"):
        pre(Image.new("I;16", (64, 64)))
    with pytest.raises(ValueError, match="uint8"):
        pre(np.zeros((64, 64), dtype=np.uint8))
    assert pre(Image.new("L", (64, 64))).shape == (3, 224, 224)  # 8-bit grey converts like OpenAI's
