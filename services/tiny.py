"""Write a tiny random-weight Qwen-VL checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) in
the real Hugging Face layout.

Everything is built locally (no hub access): a byte-level BPE tokenizer trained on a small corpus
(services/tiny_data/corpus.txt), Qwen's special tokens, the family's Instruct chat template
(services/tiny_data/*.jinja), its image/video processors, a small config of the family, and random
weights re-initialised so greedy decoding is robust to float noise.

    from services.tiny import make_tiny
    path = make_tiny("/tmp/tiny-qwen2-vl")                       # hub key layout, tied, one file
    path = make_tiny("/tmp/t2", key_layout="transformers", tie_word_embeddings=False,
                     max_shard_size="200KB")                      # sharded + index json
    path = make_tiny("/tmp/t3", "qwen3-vl-moe")                    # MoE decoder layers, DeepStack

CLI: `vlmesh make-tiny --family qwen2-vl|qwen2.5-vl|qwen3-vl|qwen3-vl-moe --out DIR [--layers N
--hidden H ... --untied]`, through `add_arguments(parser)` and `run(args)`.

Per family (each loads with its own `*ForConditionalGeneration.from_pretrained` and `AutoProcessor`):
    qwen2-vl      Qwen2VLConfig; patch 14; Qwen2-VL-Instruct template.
    qwen2.5-vl    Qwen2_5_VLConfig: RMSNorm/SwiGLU vision blocks with window attention (window_size 56,
                  i.e. 2x2 merged patches, so the tiny images span several windows) and the last
                  block full attention; tokens_per_second 2 (video M-RoPE); Qwen2-VL template.
    qwen3-vl      Qwen3VLConfig: patch 16, learned vision position grid, DeepStack mergers after vision
                  blocks `deepstack_visual_indexes` (default [0, 1]: features for decoder layers 0, 1),
                  interleaved M-RoPE, q/k norms; Qwen3-VL-Instruct template (no default system prompt,
                  videos expanded per frame with timestamps by Qwen3VLProcessor).
    qwen3-vl-moe  Qwen3VLMoeConfig: as qwen3-vl with sparse-MoE decoder layers (fused experts) except
                  `mlp_only_layers` (default: the last layer, a dense MLP). The hub layout stores the
                  fused experts transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H]), as the real
                  Qwen3-VL-MoE checkpoints do; transformers transposes them on load.
The hub key layout of qwen2-vl / qwen2.5-vl is `model.*` + `visual.*`; that of the Qwen3 families is
transformers 5's own (`model.language_model.*`, `model.visual.*`).

What the directory holds (the layout of Qwen/Qwen2-VL-2B-Instruct):
    config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors +
    model.safetensors.index.json), tokenizer.json, tokenizer_config.json, chat_template.jinja,
    preprocessor_config.json, video_preprocessor_config.json.

Notes on transformers 5.23 (checked, not assumed):
  * `save_pretrained()` writes the hub key layout by default (`save_original_format=True` reverts the
    load-time renaming `model.X -> model.language_model.X`, `visual.X -> model.visual.X`); the
    in-memory layout (`model.language_model.*`, `model.visual.*`) is written with
    `save_original_format=False`. We always save the in-memory layout and do the hub renaming
    ourselves, so the output does not depend on transformers' reverse mapping.
  * Tying is decided by the *outer* `Qwen2VLConfig.tie_word_embeddings` (default False); a True
    `text_config.tie_word_embeddings` is forwarded to the outer config for backward compatibility
    (`Qwen2VLTextConfig` has no such attribute unless given one). We set both levels to the same value.
  * A tied checkpoint saves no `lm_head.weight`; an untied one does; loading a tied one makes
    `lm_head.weight` the very tensor `embed_tokens.weight` is.
  * `Qwen2VLProcessor.save_pretrained()` writes tokenizer.json + tokenizer_config.json (no
    chat_template in it), the template as `chat_template.jinja`, and one nested
    `processor_config.json` for the image and video processors (no preprocessor_config.json). We
    replace the latter by the hub's preprocessor_config.json / video_preprocessor_config.json, which
    5.23 reads as well. `Qwen2VLImageProcessor` is the torchvision-backed class (the PIL one is
    `Qwen2VLImageProcessorPil`); AutoProcessor gives Qwen2VLImageProcessor + Qwen2VLVideoProcessor.
  * safetensors 0.8 writes files with mode 0600; we chmod them 0644.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")
KEY_LAYOUTS = ("hub", "transformers")

# Qwen's special tokens, in Qwen2's id order (they follow the BPE vocabulary, as in the real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL and Qwen3-VL tokenizers also have the tool-call tags as tokens of their own (ordinary
# added tokens, not special: they decode as text). Qwen2-VL's has none.
TOOL_TOKENS = ("<tool_call>", "</tool_call>")

# The Qwen2 pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The data the checkpoint is built from (the tokenizer's corpus, the chat templates) ships next to this
# module: services/tiny_data/, installed as package data.
_DATA = Path(__file__).resolve().parent / "tiny_data"


def _data_text(name: str) -> str:
    """A data file's text without the one trailing newline the file ends with: a template's last
    character is part of what the checkpoint's chat_template.jinja holds, byte for byte."""
    return (_DATA / name).read_text(encoding="utf-8").removesuffix("\n")


# The Qwen2-VL-Instruct chat template (as in Qwen/Qwen2-VL-2B-Instruct's chat_template.json), also used
# by Qwen2.5-VL.
CHAT_TEMPLATE = _data_text("qwen2_vl_chat_template.jinja")

# The Qwen3-VL-Instruct chat template's form (Qwen/Qwen3-VL-*-Instruct's chat_template.json): no default
# system prompt; images and videos as in Qwen2-VL; `tools` as a "# Tools" system block, assistant
# tool_calls as <tool_call> blocks, tool results as <tool_response> user turns, in Qwen's format.
QWEN3_CHAT_TEMPLATE = _data_text("qwen3_vl_chat_template.jinja")

# Target number of BPE merges (the trainer may stop earlier if the corpus runs out of pairs seen twice).
NUM_MERGES = 800

# --- weight init -----------------------------------------------------------------------------------
# Every parameter is redrawn from a generator seeded with `seed`: embed_tokens / lm_head ~ N(0, EMBED_STD),
# every other matrix (linear, conv) ~ N(0, LINEAR_GAIN / sqrt(fan_in)), biases ~ N(0, BIAS_STD), norm
# weights 1 and norm biases 0. Why not one plain std: greedy decoding of a random model must neither flip
# on float noise (a different summation order in the mesh) nor repeat one token. A larger plain std
# widens the top-1/top-2 margins but amplifies float noise faster (attention saturates, layers compound
# it); fan-in scaling keeps activations O(1), and the embeddings' own std sets the logit scale
# (sqrt(hidden) x EMBED_STD). The sweep behind these values: bench/results/NOTES.md.
LINEAR_GAIN = 1.5
EMBED_STD = 0.5
BIAS_STD = 0.02


def _corpus() -> list[str]:
    """A small deterministic English corpus: the hand-written sentences of tiny_data/corpus.txt (one
    per line, every line used: the BPE merges, and so every checkpoint's tokenizer, depend on each)
    plus a few templated ones."""
    lines = _data_text("corpus.txt").split("\n")
    colours = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey"]
    shapes = ["circle", "square", "triangle", "star", "heart", "box", "line", "dot", "ring", "cube"]
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    places = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "in the corner"]
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            n = numbers[(i + j) % len(numbers)]
            where = places[(i * 3 + j) % len(places)]
            plural = shape + ("es" if shape.endswith("x") else "s")
            lines.append(f"There is a {colour} {shape} {where} of the picture.")
            lines.append(f"I can see {n} {colour} {plural} in this image.")
            if (i + j) % 3 == 0:
                lines.append(f"How many {colour} {plural} are there? There are {n}.")
    animals = ["cat", "dog", "bird", "horse", "cow", "fish", "rabbit", "duck", "sheep", "mouse", "child", "man", "woman"]
    actions = ["sitting", "sleeping", "running", "jumping", "eating", "standing", "playing", "looking up", "walking"]
    spots = [
        "on the grass",
        "under the table",
        "next to the door",
        "near the window",
        "in the garden",
        "by the river",
        "on the road",
        "behind the house",
        "in front of the car",
    ]
    for i, animal in enumerate(animals):
        for j in range(3):
            action = actions[(i * 2 + j) % len(actions)]
            spot = spots[(i + j * 4) % len(spots)]
            article = "an" if animal[0] in "aeiou" else "a"
            lines.append(f"In this image, {article} {animal} is {action} {spot}.")
        lines.append(f"Q: Is there {('an' if animal[0] in 'aeiou' else 'a')} {animal} in the picture? A: Yes, there is.")
        lines.append(f"User: What is the {animal} doing?\nAssistant: The {animal} is {actions[i % len(actions)]}.")
    for k in range(0, 101, 7):
        lines.append(f"The picture is {k} pixels wide and {k + 14} pixels tall.")
    return lines


# --- tokenizer -------------------------------------------------------------------------------------


def build_tokenizer(num_merges: int = NUM_MERGES, extra_corpus: list[str] | None = None):
    """A `tokenizers.Tokenizer` shaped like Qwen2's: NFC, the Qwen2 split regex + byte-level, BPE
    (no unk, all 256 byte symbols in the vocab so any UTF-8 text round-trips), byte-level decoder,
    Qwen's special tokens appended after the BPE vocabulary. Deterministic. `extra_corpus` adds
    domain text (the shapes model's questions and answers) so its words become single tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=len(alphabet) + num_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
        limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator([*_corpus(), *(extra_corpus or [])], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_hf_tokenizer(raw=None):
    """The transformers tokenizer around `raw` (default: a fresh `build_tokenizer()`): Qwen2Tokenizer,
    as the real checkpoint's tokenizer_config.json names it. transformers 5.23 reloads it from
    tokenizer.json by extracting vocab + merges and rebuilding Qwen2's normalizer/pre-tokenizer, which
    `build_tokenizer` already uses, so the saved and the reloaded tokenizer encode identically."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(tokenizer_object=raw if raw is not None else build_tokenizer(), **_tokenizer_kwargs())


def _tokenizer_kwargs() -> dict:
    return dict(
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        add_prefix_space=False,
    )


# --- config ----------------------------------------------------------------------------------------


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in the real model's 16:24:24 proportion
    (largest-remainder rounding, ties to h/w): 16 -> [2, 3, 3], 32 -> [4, 6, 6], 128 -> [16, 24, 24]."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for a 3-section mrope, got {head_dim}")
    half = head_dim // 2
    exact = [half * r / 64 for r in (16, 24, 24)]
    sec = [math.floor(x) for x in exact]
    # hand out the remainder by largest fractional part; on ties prefer the later (spatial) sections
    order = sorted(range(3), key=lambda i: (-(exact[i] - sec[i]), -i))
    for i in order[: half - sum(sec)]:
        sec[i] += 1
    if min(sec) < 1:
        raise ValueError(f"head_dim {head_dim} too small for mrope sections {sec}")
    return sec


def _check_sizes(hidden_size: int, num_heads: int, num_kv_heads: int, vision_embed_dim: int, vision_heads: int) -> None:
    if min(hidden_size, num_heads, num_kv_heads, vision_embed_dim, vision_heads) < 1:
        raise ValueError("sizes and head counts must be positive")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if vision_embed_dim % vision_heads:
        raise ValueError(f"vision_embed_dim {vision_embed_dim} is not divisible by vision_heads {vision_heads}")
    mrope_section(hidden_size // num_heads)  # raises for an unusable head_dim


def build_config(
    tokenizer,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vision_depth: int,
    vision_embed_dim: int,
    vision_heads: int,
    tie_word_embeddings: bool,
    dtype: str,
):
    from transformers import Qwen2VLConfig

    _check_sizes(hidden_size, num_heads, num_kv_heads, vision_embed_dim, vision_heads)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded like the real checkpoints (151936 > len 151657)
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        hidden_act="silu",
        max_position_embeddings=4096,
        max_window_layers=num_layers,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": mrope_section(hidden_size // num_heads),
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        # transformers 5.23 ties on the outer config's flag; a True here would be forwarded to it (BC),
        # so keep both levels equal.
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    vision_config = dict(
        depth=vision_depth,
        embed_dim=vision_embed_dim,
        num_heads=vision_heads,
        mlp_ratio=2,
        hidden_size=hidden_size,  # the merger's output width = the text model's width
        hidden_act="quick_gelu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        dtype=dtype,
    )
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen2VLForConditionalGeneration"],
        dtype=dtype,
    )


def qwen3_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's interleaved (t, h, w) split of head_dim/2 frequencies in the real 24:20:20 proportion
    (h = w rounded down, t takes the rest): 128 -> [24, 20, 20], 16 -> [4, 2, 2]."""
    half = head_dim // 2
    hw = half * 20 // 64
    if head_dim % 2 or hw < 1:
        raise ValueError(f"head_dim must be even and >= 8 for Qwen3-VL's interleaved mrope, got {head_dim}")
    return [half - 2 * hw, hw, hw]


def _check_family_sizes(
    family: str,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    vision_depth: int,
    *,
    deepstack_layers: int,
    num_experts: int,
    experts_per_token: int,
    moe_intermediate_size: int,
    mlp_only_layers: tuple[int, ...] | None,
) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if family.startswith("qwen3"):
        if not 0 < deepstack_layers <= min(vision_depth, num_layers):
            raise ValueError(f"deepstack_layers must be in 1..min(vision_depth, num_layers), got {deepstack_layers}")
        qwen3_mrope_section(hidden_size // num_heads)  # raises for a head_dim too small to split
    if family == "qwen3-vl-moe":
        if moe_intermediate_size in (hidden_size, hidden_size / 2):
            # A square expert matrix would make the hub's transposed layout indistinguishable on load.
            raise ValueError("moe_intermediate_size must differ from hidden_size and hidden_size / 2")
        if not 0 < experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token must be in 1..num_experts, got {experts_per_token}")
        if mlp_only_layers is not None and not all(0 <= i < num_layers for i in mlp_only_layers):
            raise ValueError(f"mlp_only_layers must name layers in 0..{num_layers - 1}")


def build_family_config(
    family: str,
    tokenizer,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vision_depth: int,
    vision_embed_dim: int,
    vision_heads: int,
    tie_word_embeddings: bool,
    dtype: str,
    deepstack_layers: int = 2,
    num_experts: int = 4,
    experts_per_token: int = 2,
    moe_intermediate_size: int = 48,
    mlp_only_layers: tuple[int, ...] | None = None,
):
    """The config of a tiny checkpoint of `family` (a SUPPORTED_FAMILIES name)."""
    sizes = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vision_depth=vision_depth,
        vision_embed_dim=vision_embed_dim,
        vision_heads=vision_heads,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    if family == "qwen2-vl":
        return build_config(tokenizer, **sizes)
    base = build_config(tokenizer, **sizes).to_dict()  # the shared text settings and token ids
    ids = {k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    text = {
        k: base["text_config"][k]
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "tie_word_embeddings",
        )
    }
    text["dtype"] = dtype
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        text.update(use_sliding_window=False, max_window_layers=num_layers, rope_parameters=base["text_config"]["rope_parameters"])
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_embed_dim,
            intermediate_size=2 * vision_embed_dim,
            num_heads=vision_heads,
            hidden_act="silu",
            out_hidden_size=hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,  # 2x2 merged patches per window: tiny images still span several windows
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
            in_channels=3,
            dtype=dtype,
        )
        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=tie_word_embeddings,
            architectures=["Qwen2_5_VLForConditionalGeneration"],
            dtype=dtype,
            **ids,
        )
    _check_family_sizes(
        family,
        num_layers,
        hidden_size,
        num_heads,
        vision_depth,
        deepstack_layers=deepstack_layers,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_intermediate_size=moe_intermediate_size,
        mlp_only_layers=mlp_only_layers,
    )
    head_dim = hidden_size // num_heads
    text.update(
        head_dim=head_dim,
        attention_bias=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": qwen3_mrope_section(head_dim),
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_embed_dim,
        intermediate_size=2 * vision_embed_dim,
        num_heads=vision_heads,
        hidden_act="gelu_pytorch_tanh",
        out_hidden_size=hidden_size,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image's patch grid
        # The last `deepstack_layers` vision blocks feed decoder layers 0..k-1 (real: [8, 16, 24] of 27).
        deepstack_visual_indexes=list(range(vision_depth - deepstack_layers, vision_depth)),
        in_channels=3,
        dtype=dtype,
    )
    if family == "qwen3-vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=tie_word_embeddings,
            architectures=["Qwen3VLForConditionalGeneration"],
            dtype=dtype,
            **ids,
        )
    from transformers import Qwen3VLMoeConfig

    text.update(
        num_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        moe_intermediate_size=moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=list((num_layers - 1,) if mlp_only_layers is None else mlp_only_layers),
    )
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3VLMoeForConditionalGeneration"],
        dtype=dtype,
        **ids,
    )


def build_generation_config(tokenizer):
    from transformers import GenerationConfig

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return GenerationConfig(bos_token_id=eot, pad_token_id=eot, eos_token_id=[im_end, eot], do_sample=False)


# --- weights ---------------------------------------------------------------------------------------


def _never_generated_ids(tokenizer, vocab_size: int) -> list[int]:
    """Rows of the (tied) output embedding zeroed so greedy decoding never picks them: the padding ids
    past len(tokenizer) (no token decodes from them) and the vision placeholders (emitting one would
    break re-tokenising the conversation with its images). Their input embeddings are unused anyway:
    placeholders are overwritten by the vision features."""
    placeholders = ["<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in placeholders} | set(range(len(tokenizer), vocab_size)))


_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def reinit_weights(
    model,
    *,
    seed: int,
    gain: float = LINEAR_GAIN,
    embed_std: float = EMBED_STD,
    bias_std: float = BIAS_STD,
    zero_rows=(),
) -> None:
    """Redraw every parameter (see the comment at LINEAR_GAIN) from a generator seeded with `seed`, in
    sorted-name order, so the result depends on nothing but the seed and the shapes. Tied parameters
    are drawn once. `zero_rows`: ids whose input/output embedding rows are set to 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms: set[str] = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm")):
            norms.update(f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False))
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=False)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name in norms:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if id(p) in embeddings:
                std = embed_std
            elif p.dim() < 2:
                std = bias_std
            elif name.endswith(_FUSED_EXPERTS):
                std = gain / math.sqrt(p.shape[-1])  # fused experts (experts, out, in): fan-in is the last dim
            else:
                std = gain / math.sqrt(p[0].numel())  # fan-in of a Linear (out, in) or Conv3d (out, in, t, h, w)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
        zero = torch.tensor(sorted(zero_rows), dtype=torch.long)
        if len(zero):
            model.get_input_embeddings().weight[zero] = 0
            model.get_output_embeddings().weight[zero] = 0


# --- saving ----------------------------------------------------------------------------------------


def hub_key(key: str) -> str:
    """transformers-5 in-memory key -> Qwen/Qwen2-VL-*-Instruct safetensors key."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def _rewrite_safetensors(out: Path, key_layout: str, family: str = "qwen2-vl") -> list[Path]:
    """Re-save every safetensors file (renaming keys, and for qwen3-vl-moe transposing the fused
    experts, for the hub layout) with safetensors' save_file and metadata {"format": "pt"}; update the
    index json when sharded. Returns the weight files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hub = key_layout == "hub"
    rename = hub_key if hub and family in ("qwen2-vl", "qwen2.5-vl") else (lambda k: k)
    transpose = hub and family == "qwen3-vl-moe"

    def convert(key, t):
        return t.transpose(1, 2).contiguous() if transpose and key.endswith(_FUSED_EXPERTS) else t.contiguous()

    index_path = out / "model.safetensors.index.json"
    files = sorted(out.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as fh:
            tensors = {rename(k): convert(k, fh.get_tensor(k)) for k in fh.keys()}
        save_file(tensors, str(f), metadata={"format": "pt"})
        f.chmod(0o644)  # safetensors writes 0600 (through a temp file); other services may run as other users
    if index_path.exists():
        index = json.loads(index_path.read_text())
        weight_map = {rename(k): v for k, v in index["weight_map"].items()}
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def patch_factor(family: str) -> int:
    """Pixels per merged patch side: patch size x spatial merge (28 for Qwen2(.5)-VL, 32 for Qwen3-VL)."""
    return 32 if family.startswith("qwen3") else 28


def _build_processor(tokenizer, min_pixels: int, max_pixels: int, family: str = "qwen2-vl"):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if family == "qwen2-vl":
        common: dict[str, Any] = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**common),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**common),
            chat_template=CHAT_TEMPLATE,
        )
    # Videos: sampled at 2 frames per second (Qwen's default), at least 4 frames; the per-frame cap
    # of qwen-vl-utils is off, as transformers 5.23 still defaults (set explicitly: no warning).
    video = dict(fps=2.0, do_sample_frames=True, min_frames=4, max_frames=32, cap_pixels_per_frame=False)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLProcessor

        common = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**common),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**common, **video),
            chat_template=CHAT_TEMPLATE,
        )
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    half = [0.5, 0.5, 0.5]  # Qwen3-VL normalises to [-1, 1]
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=half, image_std=half)
    # Qwen3VLVideoProcessor bounds frames x height x width (two frames per temporal patch).
    video_size = {"shortest_edge": 2 * min_pixels, "longest_edge": 2 * max_pixels}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **common),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=video_size, **common, **video),
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def _save_processor(processor, out: Path, min_pixels: int, max_pixels: int) -> None:
    """processor.save_pretrained (tokenizer.json, tokenizer_config.json, chat_template.jinja), then the
    image/video processor configs as the hub checkpoints have them: preprocessor_config.json and
    video_preprocessor_config.json, with min_pixels/max_pixels spelled out. transformers 5.23 itself
    writes one nested processor_config.json instead; it is replaced by the two legacy files (which
    5.23 reads as well) so the directory matches Qwen/Qwen2-VL-*-Instruct."""
    processor.save_pretrained(str(out))
    (out / "processor_config.json").unlink(missing_ok=True)
    for name, sub in (
        ("preprocessor_config.json", processor.image_processor),
        ("video_preprocessor_config.json", processor.video_processor),
    ):
        d = sub.to_dict()
        if "min_pixels" in getattr(sub.valid_kwargs, "__annotations__", {}):  # Qwen3VLVideoProcessor has size only
            d.update(min_pixels=min_pixels, max_pixels=max_pixels)
        d.update(processor_class=type(processor).__name__)
        (out / name).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _log(msg: str) -> None:
    print(f"make-tiny: {msg}", file=sys.stderr, flush=True)


def make_tiny(
    out: str | Path,
    family: str = "qwen2-vl",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_embed_dim: int = 32,
    vision_heads: int = 2,
    tie_word_embeddings: bool = True,
    key_layout: str = "hub",
    max_shard_size: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    deepstack_layers: int = 2,
    num_experts: int = 4,
    experts_per_token: int = 2,
    moe_intermediate_size: int = 48,
    mlp_only_layers: tuple[int, ...] | None = None,
) -> Path:
    """Write a tiny random Instruct checkpoint of `family` to `out` (created; existing checkpoint files
    in it are replaced) and return its path. Deterministic: same arguments -> byte-identical weights.
    min/max_pixels default to 4 and 64 merged patches (28x28 for Qwen2(.5)-VL, 32x32 for Qwen3-VL).
    deepstack_layers: Qwen3 families only; num_experts .. mlp_only_layers: qwen3-vl-moe only."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if key_layout not in KEY_LAYOUTS:
        raise ValueError(f"unknown key_layout {key_layout!r}; expected one of {', '.join(KEY_LAYOUTS)}")
    import torch
    import transformers

    factor = patch_factor(family)
    min_pixels = factor * factor * 4 if min_pixels is None else min_pixels
    max_pixels = factor * factor * 64 if max_pixels is None else max_pixels

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must be a torch floating dtype name (float32, bfloat16, float16), got {dtype!r}")
    _check_sizes(hidden_size, num_heads, num_kv_heads, vision_embed_dim, vision_heads)  # before writing anything
    family_sizes = dict(
        deepstack_layers=deepstack_layers,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_intermediate_size=moe_intermediate_size,
        mlp_only_layers=mlp_only_layers,
    )
    sizes = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vision_depth=vision_depth,
        vision_embed_dim=vision_embed_dim,
        vision_heads=vision_heads,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    _check_family_sizes(family, num_layers, hidden_size, num_heads, vision_depth, **family_sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json", out / "processor_config.json"]:
        stale.unlink(missing_ok=True)  # a previous run's shards would otherwise linger

    _log("training the byte-level BPE tokenizer")
    raw = build_tokenizer()
    if family != "qwen2-vl":
        from tokenizers import AddedToken

        raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tokenizer = build_hf_tokenizer(raw)
    _log(f"tokenizer: {len(tokenizer)} tokens ({raw.get_vocab_size(with_added_tokens=False)} BPE + {len(SPECIAL_TOKENS)} special)")

    processor = _build_processor(tokenizer, min_pixels, max_pixels, family)
    _save_processor(processor, out, min_pixels, max_pixels)

    config = build_family_config(family, tokenizer, **sizes, **family_sizes)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    reinit_weights(model, seed=seed, zero_rows=_never_generated_ids(tokenizer, config.text_config.vocab_size))
    model.to(torch_dtype)
    model.generation_config = build_generation_config(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    _log(
        f"model: {family}, {n_params:,} parameters, {num_layers} layers, hidden {hidden_size}, {dtype}, {'tied' if tie_word_embeddings else 'untied'}"
    )

    save_kwargs: dict[str, Any] = dict(safe_serialization=True, save_original_format=False)
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own one-line progress instead of tqdm bars
    try:
        model.save_pretrained(str(out), **save_kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    files = _rewrite_safetensors(out, key_layout, family)
    _log(f"weights: {len(files)} safetensors file(s), {key_layout} key layout")
    _log(f"wrote {out}")
    return out


# --- CLI -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--family", default="qwen2-vl", choices=SUPPORTED_FAMILIES)
    parser.add_argument("--layers", dest="num_layers", type=int, default=4)
    parser.add_argument("--hidden", dest="hidden_size", type=int, default=64)
    parser.add_argument("--heads", dest="num_heads", type=int, default=4)
    parser.add_argument("--kv-heads", dest="num_kv_heads", type=int, default=2)
    parser.add_argument("--intermediate", dest="intermediate_size", type=int, default=128)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--vision-embed-dim", type=int, default=32)
    parser.add_argument("--vision-heads", type=int, default=2)
    parser.add_argument(
        "--untied", dest="tie_word_embeddings", action="store_false", help="separate lm_head.weight (default: tied to embed_tokens, as Qwen2-VL-2B)"
    )
    parser.add_argument("--key-layout", choices=KEY_LAYOUTS, default="hub")
    parser.add_argument("--max-shard-size", default=None, help='e.g. "200KB": sharded files + index json')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--min-pixels", type=int, default=None, help="default: 4 merged patches (28x28, Qwen3: 32x32)")
    parser.add_argument("--max-pixels", type=int, default=None, help="default: 64 merged patches")
    parser.add_argument("--deepstack-layers", type=int, default=2, help="Qwen3 families: decoder layers fed by DeepStack")
    parser.add_argument("--experts", dest="num_experts", type=int, default=4, help="qwen3-vl-moe: experts per MoE layer")
    parser.add_argument("--experts-per-token", type=int, default=2, help="qwen3-vl-moe: experts routed per token")
    parser.add_argument("--moe-intermediate", dest="moe_intermediate_size", type=int, default=48)
    return parser


_ARG_NAMES = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vision_depth",
    "vision_embed_dim",
    "vision_heads",
    "tie_word_embeddings",
    "key_layout",
    "max_shard_size",
    "seed",
    "dtype",
    "min_pixels",
    "max_pixels",
    "deepstack_layers",
    "num_experts",
    "experts_per_token",
    "moe_intermediate_size",
)


def run(args: argparse.Namespace) -> int:
    try:
        make_tiny(args.out, args.family, **{k: getattr(args, k) for k in _ARG_NAMES})
    except ValueError as e:
        print(f"make-tiny: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="vlmesh make-tiny", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
