"""services.tiny: a tiny random Qwen2-VL checkpoint in the real Hugging Face layout."""

from __future__ import annotations

import argparse
import io
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from services import tiny

# name -> make_tiny kwargs. Together they cover both key layouts, tied/untied, sharded/unsharded, GQA/MHA.
VARIANTS = {
    "hub-tied": dict(key_layout="hub", tie_word_embeddings=True),
    "transformers-untied-sharded": dict(key_layout="transformers", tie_word_embeddings=False, max_shard_size="200KB"),
    "hub-untied-mha": dict(key_layout="hub", tie_word_embeddings=False, num_heads=4, num_kv_heads=4),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    return {name: tiny.make_tiny(tmp_path_factory.mktemp(name), **kw) for name, kw in VARIANTS.items()}


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _keys(path: Path) -> dict[str, str]:
    """safetensors key -> file name, over all the checkpoint's files."""
    out = {}
    for f in _weight_files(path):
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                assert k not in out, f"{k} in two files"
                out[k] = f.name
    return out


class _Captured:
    """Everything transformers logs (its logger does not propagate to caplog) plus Python warnings."""

    def __enter__(self):
        self.buf = io.StringIO()
        self.handler = logging.StreamHandler(self.buf)
        self.handler.setLevel(logging.WARNING)
        self.logger = logging.getLogger("transformers")
        self.logger.addHandler(self.handler)
        self._warn = warnings.catch_warnings(record=True)
        self.warnings = self._warn.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._warn.__exit__(*exc)
        self.logger.removeHandler(self.handler)

    @property
    def text(self) -> str:
        return self.buf.getvalue() + "\n".join(str(w.message) for w in self.warnings)


def _load(path: Path):
    from transformers import Qwen2VLForConditionalGeneration

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


def _image_inputs(processor, size=(100, 60), text="What is in the picture?"):
    img = Image.new("RGB", size, (200, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")


# --- layout on disk --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_files(ckpt, name):
    path = ckpt[name]
    names = {p.name for p in path.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    }
    assert expected <= names
    files = _weight_files(path)
    if VARIANTS[name].get("max_shard_size"):
        assert "model.safetensors" not in names and len(files) > 1
        assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == _keys(path)  # every key, in the file the index says
    else:
        assert [f.name for f in files] == ["model.safetensors"]
        assert "model.safetensors.index.json" not in names

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl" and cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"].startswith("Qwen2VLImageProcessor")
    assert (pre["min_pixels"], pre["max_pixels"]) == (28 * 28 * 4, 28 * 28 * 64)
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 2)
    assert (path / "chat_template.jinja").read_text() == tiny.CHAT_TEMPLATE
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_safetensors_keys(ckpt, name):
    keys = set(_keys(ckpt[name]))
    tied = VARIANTS[name]["tie_word_embeddings"]
    assert ("lm_head.weight" in keys) == (not tied)
    if VARIANTS[name]["key_layout"] == "hub":
        assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
        assert any(k.startswith("model.layers.") for k in keys)
        assert any(k.startswith("visual.") for k in keys)
        assert not any("language_model" in k for k in keys)
        assert not any(k.startswith("model.visual.") for k in keys)
    else:
        assert "model.language_model.embed_tokens.weight" in keys
        assert any(k.startswith("model.language_model.layers.") for k in keys)
        assert any(k.startswith("model.visual.") for k in keys)
        assert not any(k.startswith(("model.layers.", "visual.")) for k in keys)


def test_generation_and_model_config(ckpt):
    from transformers import AutoConfig, AutoTokenizer

    path = ckpt["hub-tied"]
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == gen["bos_token_id"] == ids["<|endoftext|>"]
    assert gen["do_sample"] is False

    cfg = AutoConfig.from_pretrained(str(path))
    tc, vc = cfg.text_config, cfg.vision_config
    assert tc.vocab_size % 64 == 0 and len(tok) <= tc.vocab_size < len(tok) + 64
    assert (cfg.image_token_id, cfg.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    head_dim = tc.hidden_size // tc.num_attention_heads
    assert sum(tc.rope_parameters["mrope_section"]) == head_dim // 2
    assert tc.rope_parameters["rope_theta"] == 1e6 and tc.rms_norm_eps == 1e-6 and tc.max_position_embeddings == 4096
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_key_value_heads, tc.intermediate_size) == (4, 64, 2, 128)
    assert (vc.depth, vc.embed_dim, vc.num_heads, vc.mlp_ratio) == (2, 32, 2, 2)
    assert vc.hidden_size == tc.hidden_size and (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size) == (14, 2, 2)
    assert cfg.tie_word_embeddings is True and tc.tie_word_embeddings is True
    untied = AutoConfig.from_pretrained(str(ckpt["transformers-untied-sharded"]))
    assert untied.tie_word_embeddings is False and untied.text_config.tie_word_embeddings is False


def test_mrope_section():
    assert tiny.mrope_section(16) == [2, 3, 3]
    assert tiny.mrope_section(32) == [4, 6, 6]
    assert tiny.mrope_section(128) == [16, 24, 24]  # the real Qwen2-VL
    for hd in range(6, 130, 2):
        sec = tiny.mrope_section(hd)
        assert sum(sec) == hd // 2 and min(sec) >= 1
    with pytest.raises(ValueError):
        tiny.mrope_section(15)


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loads_without_missing_or_unexpected_keys(ckpt, name):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    path = ckpt[name]
    with _Captured() as cap:
        AutoConfig.from_pretrained(str(path))
        AutoTokenizer.from_pretrained(str(path))
        processor = AutoProcessor.from_pretrained(str(path))
        model, info = _load(path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert cap.text.strip() == ""  # no warning at all (a bad checkpoint logs a MISSING/UNEXPECTED load report)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert processor.image_processor.size["shortest_edge"] == 28 * 28 * 4
    assert processor.image_processor.size["longest_edge"] == 28 * 28 * 64

    emb = model.model.language_model.embed_tokens.weight
    if VARIANTS[name]["tie_word_embeddings"]:
        assert model.lm_head.weight is emb
    else:
        assert model.lm_head.weight is not emb and not torch.equal(model.lm_head.weight, emb)
    # the loaded weights are the saved ones (no key silently renamed onto the wrong parameter)
    state = model.state_dict()
    for key, fname in _keys(path).items():
        with safe_open(str(path / fname), "pt") as fh:
            saved = fh.get_tensor(key)
        assert torch.equal(state[_model_key(key)], saved), key


def _model_key(key: str) -> str:
    """checkpoint key (either layout) -> Qwen2VLForConditionalGeneration state_dict key."""
    if key.startswith("model.layers.") or key in ("model.embed_tokens.weight", "model.norm.weight"):
        return "model.language_model." + key[len("model.") :]
    if key.startswith("visual."):
        return "model." + key
    return key


# --- tokenizer & processor -------------------------------------------------------------------------


def test_tokenizer(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt["hub-tied"]))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    raw = tiny.build_tokenizer()
    for text in ["héllo 中文 🙂", "Hello! How many red circles are there?\n\n  Two.", "naïve café — 日本語 👍🏽"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert ids == raw.encode(text).ids  # the reloaded tokenizer is the one that was built
    # a trained BPE, not bytes only: common words are single tokens
    assert len(tok("The picture shows a red circle.")["input_ids"]) <= 8
    specials = [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    assert specials == list(range(specials[0], specials[0] + len(tiny.SPECIAL_TOKENS)))  # Qwen's order, contiguous
    assert specials[-1] == len(tok) - 1
    for t in tiny.SPECIAL_TOKENS:
        assert tok(t)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_bpe_merges():
    merges = json.loads(tiny.build_tokenizer().to_str())["model"]["merges"]
    assert 500 <= len(merges) <= 1000


def test_shipped_shapes_model_matches_what_tiny_builds():
    """The shapes checkpoint in services/assets was trained with tiny's tokenizer (plus the shapes
    task's text) and Qwen2-VL template: the data files they are built from must still build exactly
    those. Editing a line of tiny_data/corpus.txt or a template would silently change them."""
    from services.shapes import SHIPPED_MODEL, data

    shipped = json.loads((SHIPPED_MODEL / "tokenizer.json").read_text())
    built = json.loads(tiny.build_tokenizer(extra_corpus=data.corpus()).to_str())
    assert built["model"]["vocab"] == shipped["model"]["vocab"]
    assert built["model"]["merges"] == shipped["model"]["merges"]
    assert [t["content"] for t in built["added_tokens"]] == [t["content"] for t in shipped["added_tokens"]]
    assert (SHIPPED_MODEL / "chat_template.jinja").read_text() == tiny.CHAT_TEMPLATE


def test_data_files_are_package_data():
    """Every file tiny reads from services/tiny_data/ is named by pyproject's package-data, so a
    non-editable install (a wheel, the container image) has it too."""
    import fnmatch
    import tomllib

    root = Path(tiny.__file__).resolve().parent
    globs = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["services"]
    files = sorted(f.relative_to(root).as_posix() for f in (root / "tiny_data").iterdir())
    assert {"corpus.txt", "qwen2_vl_chat_template.jinja", "qwen3_vl_chat_template.jinja"} <= {Path(f).name for f in files}
    assert [f for f in files if not any(fnmatch.fnmatchcase(f, g) for g in globs)] == []


def test_processor_expands_image(ckpt):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(ckpt["hub-tied"]))
    tok = processor.tokenizer
    x = _image_inputs(processor, size=(100, 60))
    t, h, w = x["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 4, 8)  # 60x100 -> smart_resize 56x112 -> 4x8 patches of 14
    ids = x["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == t * h * w // 4
    assert x["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template(ckpt):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(ckpt["hub-tied"]))
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
    ]
    assert processor.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    text = processor.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


# --- model behaviour -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hub-tied", "transformers-untied-sharded"])
def test_greedy_generate_is_deterministic_and_peaky(ckpt, name):
    from transformers import AutoProcessor

    path = ckpt[name]
    processor = AutoProcessor.from_pretrained(str(path))
    x = _image_inputs(processor)
    runs = []
    for _ in range(2):
        model, _ = _load(path)  # a fresh load each time
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None)
        runs.append(out)
    new = [r.sequences[0, x["input_ids"].shape[1] :].tolist() for r in runs]
    assert new[0] == new[1] and len(new[0]) == 8
    assert len(set(new[0])) > 1  # not one token repeated
    logits = torch.stack([step[0] for step in runs[0].logits]).double()
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # greedy choice robust to 1e-6-level float noise
    assert all(i < len(processor.tokenizer) for i in new[0])  # padded vocab rows are never chosen


def test_same_seed_is_byte_identical(ckpt, tmp_path):
    # through the CLI entry point, with the same settings as the "transformers-untied-sharded" variant
    parser = tiny.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "again"), "--untied", "--key-layout", "transformers", "--max-shard-size", "200KB"])
    assert tiny.run(args) == 0
    ref = ckpt["transformers-untied-sharded"]
    files = [f.name for f in _weight_files(ref)] + ["model.safetensors.index.json", "config.json", "tokenizer.json"]
    assert [f.name for f in _weight_files(tmp_path / "again")] == files[:-3]
    for f in files:
        assert (tmp_path / "again" / f).read_bytes() == (ref / f).read_bytes(), f


def test_other_seed_differs(ckpt, tmp_path):
    other = tiny.make_tiny(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (ckpt["hub-tied"] / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (ckpt["hub-tied"] / "tokenizer.json").read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="qwen2-vl"):
        tiny.make_tiny(tmp_path / "x", "llava")
    with pytest.raises(ValueError, match="key_layout"):
        tiny.make_tiny(tmp_path / "x", key_layout="flat")
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny.make_tiny(tmp_path / "x", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        tiny.make_tiny(tmp_path / "x", hidden_size=16, num_heads=4)  # head_dim 4: no 3-way mrope split
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())  # nothing written on bad input
