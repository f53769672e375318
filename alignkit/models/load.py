"""Load a causal LM and its tokenizer from a folder, a GGUF file or an alias (embedded or zoo); add LoRA."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.log import log
from alignkit.models.embedded import EMBEDDED, convert_gguf, embedded_model_path, gguf_cache_path
from alignkit.models.lora_dropout import use_gap_dropout
from alignkit.models.zoo import ZOO, zoo_model_path


def resolve_model(spec: str) -> Path:
    """A model folder for `spec`: the alias's cache, a converted GGUF, or the folder itself."""
    if spec in EMBEDDED:
        return embedded_model_path(spec)
    if spec in ZOO:
        return zoo_model_path(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        cached = gguf_cache_path(path)
        return cached if (cached / "config.json").is_file() else convert_gguf(path, cached)
    if not path.exists():
        known = ", ".join([*EMBEDDED, *ZOO])
        raise UserError(f"{spec}: model not found (give a model folder, a .gguf file, or one of: {known})")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"{spec}: not a model folder (no config.json)")
    return path


def portable_name(spec: str) -> str:
    """What an adapter records as its base: for an alias, its cached folder (so that peft and transformers load
    the adapter as it is; alignkit finds the alias again by the folder's name if the cache has moved, see
    `base_of`), else the absolute path the user gave (a folder or a .gguf file), not the cache folder a GGUF file
    is converted into."""
    if spec in EMBEDDED or spec in ZOO:
        return str(resolve_model(spec))
    return str(Path(spec).expanduser().resolve())


def base_of(name: str) -> Path:
    """An adapter's recorded base, resolved: a path that no longer exists but names an alias's cached folder
    (the cache moved) is that alias."""
    path = Path(name)
    if not path.exists() and path.name in (*EMBEDDED, *ZOO) and path.parent.name == "models":
        return resolve_model(path.name)
    return resolve_model(name)


@contextlib.contextmanager
def no_hub_lookup():
    """Saving an adapter, peft asks the Hub for its base's config.json unless the base is a local folder; an alias
    is neither, and alignkit never resizes a vocabulary, so the lookup is turned off (peft reads this variable
    at each call)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UserError(f"{path}: cannot load its tokenizer ({err})") from None
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss, so any id will do; eos is what TRL uses too.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_adapter_model(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A LoRA adapter folder on its base model, unmerged. The base may itself be an adapter folder (a LoRA stage
    trained on a LoRA stage's output, as pipelines do); it is then loaded, merged, the same way."""
    import json

    from peft import PeftModel

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{path}: adapter_config.json names no base model")
    base = load_model(base_of(base_name), dtype, trust_remote_code)
    return PeftModel.from_pretrained(base, path)


def load_model(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A model folder, or a LoRA adapter folder (an alignkit `final/`), merged into its base model."""
    from transformers import AutoModelForCausalLM

    try:
        if is_adapter(path):
            merged = load_adapter_model(path, dtype, trust_remote_code).merge_and_unload()
            # An adapter trained on this merged model must name this folder as its base, not the first base.
            merged.name_or_path = merged.config._name_or_path = str(path.resolve())
            return merged
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: cannot load the model ({err})") from None


def load_reward_model(path: Path, dtype: torch.dtype, trust_remote_code: bool, pad_id: int):
    """A sequence-classification model with one output from a causal LM folder (its body's weights, a new score
    head) or from a reward model folder (all its weights). `pad_id` goes into its config: transformers scores the
    last token that is not padding."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        if is_adapter(path):  # an SFT LoRA final/: merged into its base first
            causal = load_model(path, dtype, trust_remote_code)
            config = copy.deepcopy(causal.config)
            config.num_labels, config.pad_token_id = 1, pad_id
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                                   trust_remote_code=trust_remote_code)
            body = getattr(model, model.base_model_prefix)
            body.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
            return model
        config = AutoConfig.from_pretrained(path, num_labels=1, pad_token_id=pad_id,
                                            trust_remote_code=trust_remote_code)
        return AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype,
                                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: cannot load it as a reward model ({err})") from None


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and DeepSpeed engines (`.module`) and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_lora(model, r: int, alpha: float, dropout: float, targets: list[str], task_type: str = "CAUSAL_LM",
             use_dora: bool = False, use_rslora: bool = False, init: str = "default"):
    """Wrap `model` in a peft LoRA adapter; only the adapter weights stay trainable (and, for SEQ_CLS, the score
    head, which peft keeps whole). DoRA, rsLoRA and the PiSSA / OLoRA initialisations are peft's own options.
    Its input dropout draws its masks sparsely (`lora_dropout`): the same distribution, a fraction of the random
    numbers."""
    from peft import LoraConfig, get_peft_model

    target_modules = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type, use_dora=use_dora, use_rslora=use_rslora,
                        init_lora_weights=True if init == "default" else init)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"lora_targets: {err}") from None
    use_gap_dropout(model)
    return model


def build_policy(cfg, model_path: Path, checkpoint: Path | None, load=None, task_type: str = "CAUSAL_LM"):
    """The model to train: full weights or base + LoRA, from the checkpoint when resuming. A LoRA adapter names
    `cfg.model` as its base (`portable_name`), so it still loads once the cache has moved. `load(path, dtype,
    trust_remote_code)` makes the model (default `load_model`, a causal LM)."""
    load = load or load_model
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    # A full fine-tune resumes from the checkpoint's weights; LoRA reloads the base and then the adapter.
    if checkpoint is not None:
        saved_lora = (checkpoint / "model" / "adapter_model.safetensors").is_file()
        if saved_lora != cfg.lora:
            kind = "a LoRA adapter" if saved_lora else "full weights"
            raise UserError(f"{checkpoint}: holds {kind}; resume with lora: {str(saved_lora).lower()}")
    weights = checkpoint / "model" if checkpoint is not None and not cfg.lora else model_path
    model = load(weights, dtype, cfg.trust_remote_code)
    if cfg.lora:
        model.name_or_path = model.config._name_or_path = portable_name(cfg.model)
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, task_type,
                         cfg.use_dora, cfg.use_rslora, cfg.lora_init)
        if cfg.lora_init != "default":
            keep_initial_adapter(model)
        if checkpoint is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(checkpoint / "model" / "adapter_model.safetensors"))
    return model


def keep_initial_adapter(model) -> None:
    """PiSSA and OLoRA move part of each base weight into the adapter's initial A and B, so an adapter saved as
    it is only suits that changed base. The initial adapter is kept (in a temporary folder) for peft to convert
    the final one into a plain LoRA of the unchanged base (`path_initial_model_for_weight_conversion`, used by
    `training.run_folder.save_final`); checkpoints keep the unconverted adapter, which a resume re-initialises
    the base for."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="alignkit-initial-adapter-")
    atexit.register(shutil.rmtree, folder, True)
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # loaded back as it is, not initialised again
    try:
        with no_hub_lookup():
            model.save_pretrained(folder)
    finally:
        config.init_lora_weights = init
    model.initial_adapter = folder


def load_inputs(cfg):
    """(model folder, tokenizer, chat template) for a training run, data paths checked first.

    The data paths are checked before the model is resolved, so a typo never waits for a model download. The
    tokenizer keeps the template it is trained with, so final/ carries it; a built-in chosen for a model without
    a template is recorded as `cfg.chat_template`, so config.yaml names it."""
    from transformers.utils import logging as hf_logging

    from alignkit.data.mixture import source_paths
    from alignkit.data.sources import require
    from alignkit.data.templates import choose_template
    for path in source_paths(cfg.data) + cfg.eval_data:
        require(Path(path))
    model_path = resolve_model(cfg.model)
    hf_logging.disable_progress_bar()  # our bar is the one to watch; weight loading and saving stay quiet
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    choice = choose_template(tokenizer, cfg.chat_template)
    if choice.name or choice.source != tokenizer.chat_template:  # the tokenizer's own, unchanged, goes unsaid
        log(f"chat template: {choice.name} ({choice.reason})" if choice.name else f"chat template: {choice.reason}")
    cfg.chat_template = choice.name
    tokenizer.chat_template = choice.source
    return model_path, tokenizer, tokenizer.chat_template
