"""Tiny model folders that real vLLM accepts offline (no hub): ``tiny-llama`` and ``tiny-llava``.

``tiny-llama`` is a text-only Llama config; ``tiny-llava`` is a LLaVA config with a tokenizer and
an image processor built in code, its image placeholder id being ``models.request.IMAGE_TOKEN_ID``.
vLLM builds configs, processors and schedulers from them; engines run them with
``load_format="dummy"``. Folders are written once per cache directory: each is built in a
temporary sibling and renamed into place, so concurrent callers never see a partial folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ...models.request import IMAGE_TOKEN_ID

TINY_LLAMA = "tiny-llama"
TINY_LLAVA = "tiny-llava"
FORMAT = "2"  # bump when a folder's contents change: older caches are rebuilt
MARKER = ".vllm-faultsim-complete"
VOCAB_SIZE = 1100  # text ids of models.request.prompt_token_ids lie in [3, 1003)
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2  # models.step.EOS_TOKEN_ID
_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=131072,
             rms_norm_eps=1e-5, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
             tie_word_embeddings=False)


class ModelDirError(RuntimeError):
    """A model cache directory that cannot be used; the message is one line."""


def default_cache_dir() -> Path:
    """A per-user directory under the system temp dir."""
    return Path(tempfile.gettempdir()) / f"vllm-faultsim-models-{os.getuid()}"


def tiny_llama(cache_dir: str | Path | None = None) -> Path:
    """The text model folder (config only)."""
    return _ensure(cache_dir, TINY_LLAMA, _write_llama)


def tiny_llava(cache_dir: str | Path | None = None) -> Path:
    """The multimodal model folder (config, tokenizer, image processor); needs transformers."""
    return _ensure(cache_dir, TINY_LLAVA, _write_llava)


def _ensure(cache_dir: str | Path | None, name: str, write: Callable[[Path], None]) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / name
    if _complete(final):
        return final
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_uid != os.getuid():
        raise ModelDirError(f"{root}: model cache directory is owned by another user")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write(tmp)
        (tmp / MARKER).write_text(FORMAT)
        if final.exists() and not _complete(final):
            shutil.rmtree(final)  # a stale format or a folder written by something else
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # lost a race to a writer whose folder is complete: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    try:
        return (path / MARKER).read_text() == FORMAT
    except OSError:
        return False


def _write_llama(d: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16", **_TEXT}
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _write_llava(d: Path) -> None:
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                                  LlavaProcessor, PreTrainedTokenizerFast)
    except ImportError as exc:
        raise ModelDirError(f"{TINY_LLAVA} needs transformers and tokenizers ({exc})") from None
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              num_hidden_layers=2, image_size=56, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(text_config=LlamaConfig(**_TEXT), vision_config=vision,
                      image_token_index=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(d)
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE) if i != IMAGE_TOKEN_ID}
    vocab["<image>"] = IMAGE_TOKEN_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   bos_token=f"t{BOS_TOKEN_ID}", eos_token=f"t{EOS_TOKEN_ID}")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14, image_token="<image>",
                   vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(d)
