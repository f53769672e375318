"""Tiny byte-level BPE tokenizers with a model family's special tokens, built in the tests (no download)."""

from __future__ import annotations

from alignkit.data.tokenize import IGNORE
from tests.conftest import CORPUS

GEMMA = {"specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "bos": "<bos>",
         "eos": "<eos>", "pad": "<pad>", "add_bos": True}
LLAMA3 = {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|eom_id|>"],
          "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|end_of_text|>", "add_bos": True}
# Qwen's tool markers are added tokens that are not special (decoding keeps them), as in the Qwen2.5/Qwen3 vocabularies
QWEN = {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], "bos": None,
        "eos": "<|im_end|>", "pad": "<|endoftext|>", "add_bos": False,
        "added": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]}
MISTRAL = {"specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "bos": "<s>", "eos": "</s>", "pad": "</s>",
           "add_bos": True}
PHI3 = {"specials": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": True}
# a vocabulary with no turn markers: only bos and eos are special
BARE = {"specials": ["<s>", "</s>"], "bos": "<s>", "eos": "</s>", "pad": "</s>", "add_bos": True}


def build(family: dict, vocab_size: int = 400, extra_corpus: list[str] | None = None):
    """A fast tokenizer with `family`'s special tokens (and added tokens) and no chat template; it adds bos if
    the family does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=family["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS + (extra_corpus or []), trainer)
    core.add_tokens([AddedToken(token, special=False, normalized=False) for token in family.get("added", [])])
    if family["add_bos"]:
        bos = family["bos"]
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, core.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=family["bos"], eos_token=family["eos"],
                                        pad_token=family["pad"])
    tokenizer.chat_template = None
    return tokenizer


def trained_runs(rows) -> list[list[int]]:
    """The token ids of each run of consecutive trained tokens, over all rows."""
    runs = []
    for row in rows:
        previous = False
        for token, label in zip(row.input_ids, row.labels, strict=True):
            trained = label != IGNORE
            if trained and not previous:
                runs.append([])
            if trained:
                runs[-1].append(token)
            previous = trained
    return runs
