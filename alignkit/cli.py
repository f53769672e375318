"""The `alignkit` command: `alignkit sft|dpo --model M --data FILE --output-dir DIR [--config cfg.yaml] [...]`.

Every config field is a flag (`--max-length` and `--max_length` both work); values come from the defaults,
then the YAML file, then the flags. Errors are one line, `alignkit: error: ...`, with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing

from alignkit.config import (
    ChatConfig,
    DataConfig,
    DemoConfig,
    DPOConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    KTOConfig,
    ORPOConfig,
    PipelineConfig,
    PrefsConfig,
    ReportConfig,
    RMConfig,
    SFTConfig,
    UIConfig,
    field_type,
    fields_of,
    load_yaml,
    normalise,
    suggest,
    validate,
)
from alignkit.errors import Interrupted, RunError, UserError
from alignkit.training import kernel_caches


@dataclasses.dataclass(frozen=True)
class Command:
    config: type
    runner: str  # the module whose run(config) does the work
    help: str
    description: str


OUTPUTS = "Outputs: metrics.jsonl, summary.json, config.yaml, final/, checkpoints/."
COMMANDS = {
    "sft": Command(SFTConfig, "alignkit.recipes.sft",
                   "supervised fine-tuning on prompt/completion, chat, alpaca, sharegpt or text rows",
                   f"Supervised fine-tuning: cross-entropy on completion / assistant tokens only. {OUTPUTS}"),
    "dpo": Command(DPOConfig, "alignkit.recipes.dpo",
                   "direct preference optimisation on (prompt, chosen, rejected) pairs",
                   f"DPO and its relatives (robust, IPO, hinge, SimPO, + an SFT term) on preference pairs. {OUTPUTS} "
                   "With --online: rounds of sampling --prompts from the policy being trained, scoring with --reward "
                   "and training on best-vs-worst pairs (docs/dpo.md); each round in RUN/round-R/."),
    "orpo": Command(ORPOConfig, "alignkit.recipes.orpo",
                    "ORPO: SFT plus an odds-ratio preference term on (prompt, chosen, rejected) pairs, no reference",
                    "ORPO (Hong et al. 2024, arXiv 2403.07691): the chosen completions' NLL plus beta (lambda) "
                    f"times -log sigmoid of the log odds ratio of chosen over rejected; no reference model. {OUTPUTS}"),
    "kto": Command(KTOConfig, "alignkit.recipes.kto",
                   "KTO on unpaired (prompt, completion, label) rows: thumbs-up/down feedback",
                   "KTO (Ethayarajh et al. 2024, arXiv 2402.01306): desirable and undesirable completions, each "
                   "pushed against a KL reference point estimated from mismatched prompt/completion pairs. "
                   f"{OUTPUTS}"),
    "rm": Command(RMConfig, "alignkit.recipes.rm",
                  "train a reward model (a scalar head, Bradley–Terry loss) on (prompt, chosen, rejected) pairs",
                  "Reward modelling as in InstructGPT (Ouyang et al. 2022, arXiv 2203.02155): the model with a "
                  "one-output score head on the last non-padding token, trained with −log σ(r_c − r_r − margin) "
                  "(+ λ·(r_c + r_r)²). final/ is a sequence-classification folder that alignkit prefs --reward and "
                  f"alignkit eval --reward take. {OUTPUTS}"),
    "pipeline": Command(PipelineConfig, "alignkit.pipeline",
                        "run stages of SFT/DPO in sequence (multi-task, sequential, DMT), scoring abilities",
                        "Stages of SFT and DPO from a plan, each starting from the previous stage's final model, "
                        "each with its own data mixture; per-ability scores after every stage (abilities.md). "
                        "See docs/data-mixtures.md."),
    "prefs": Command(PrefsConfig, "alignkit.make_prefs",
                     "sample completions, score them with a reward and write preference pairs",
                     "Preference data as in the DPO paper: n samples per prompt from --model, scored by --reward, "
                     "best vs worst (or all pairs above a margin) written as JSONL for alignkit dpo."),
    "demo": Command(DemoConfig, "alignkit.demo.pipeline",
                    "the whole pipeline on the embedded model: SFT → preference data → DPO → evaluation → report",
                    "The DPO paper's controlled-sentiment experiment scaled to a CPU: SFT teaches a review format, "
                    "the SFT model's samples scored by VADER become preference pairs, DPO (LoRA) trains on them, "
                    "and report.md compares SFT and DPO on held-out prompts (reward, win rate, KL)."),
    "data": Command(DataConfig, "alignkit.commands.inspect",
                    "inspect a data file: rendered rows with trained tokens marked, counts, a length histogram",
                    "alignkit data inspect FILE: render the first --rows rows with the model's chat template, the "
                    "trained tokens marked (colour in a terminal, [[brackets]] otherwise), and for the whole file: "
                    "rows, tokens, trained fraction, rows truncated, dropped, repaired or skipped and why, and a "
                    "PNG histogram of row lengths. Tokenised exactly as training would (and cached the same way)."),
    "generate": Command(GenerateConfig, "alignkit.commands.generate",
                        "sample from a model with its chat template (streams a single prompt)",
                        "Batched generation with the model's chat template: --prompt TEXT (streamed) or "
                        "--prompts FILE."),
    "chat": Command(ChatConfig, "alignkit.commands.chat",
                    "an interactive chat in the terminal, with history (/reset, /exit)",
                    "Chat with a model in the terminal; the conversation so far is sent with each turn. "
                    "/reset forgets it, /exit (or Ctrl-D) leaves."),
    "eval": Command(EvalConfig, "alignkit.commands.evaluate",
                    "loss/perplexity, preference accuracies, sampled rewards, win rate and KL, or a benchmark",
                    "Evaluate a model: --data SFT rows → mean token loss and perplexity on completion tokens; "
                    "--data preference rows → implicit-reward and log-prob accuracies and margins; --prompts with "
                    "--reward → mean reward, win rate against --baseline (and --judge) and KL to the reference; "
                    "--benchmark humaneval → pass@k with 95% intervals; --benchmark mt-bench --judge J → "
                    "MT-Bench answers graded 1-10 by the local model J per category (and pairwise against "
                    "--baseline); a local judge is not GPT-4, so these are not leaderboard figures."),
    "export": Command(ExportConfig, "alignkit.commands.export",
                      "merge a LoRA adapter into its base and save a standalone model (transformers, vLLM, GGUF)",
                      "Export RUN/final as a standalone Hugging Face model: LoRA merged (its logits checked "
                      "against the adapter model's), safetensors, tokenizer, chat template and generation config; "
                      "or, with --format gguf, one GGUF file for llama.cpp and an ollama Modelfile "
                      "(docs/export-and-benchmarks.md)."),
    "report": Command(ReportConfig, "alignkit.commands.report",
                      "report.md and PNG plots from a run's metrics.jsonl",
                      "Write RUN_DIR/report.md with plots of loss, lr, grad norm, DPO rewards/margins/accuracies "
                      "and evaluation curves, read from metrics.jsonl and summary.json."),
    "ui": Command(UIConfig, "alignkit.ui.server",
                  "a local web dashboard: runs and their status, live curves, comparisons, launch and stop",
                  "Serve a web page over --runs: every run's status (running, finished, resumable, failed), live "
                  "curves from metrics.jsonl, config, summary and plots, several runs on one chart, and a form "
                  "that checks an SFT or DPO config like the CLI and starts it (Stop sends SIGINT, which saves). "
                  "Every request must name this server as its Host (a loopback name or the bound address), and every "
                  "/api request must carry the token from the printed URL (--no-auth: none; loopback only). "
                  "See docs/tracking.md."),
}
USAGE_HINT = "run 'alignkit COMMAND --help' for every field"


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become a UserError so they print as one line like every other error."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message)


def _field_help(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
    if "(default:" in text:
        return text
    shown = "none" if default is None or default == [] else default
    return f"{text} (default: {shown})"


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    parser.add_argument("--config", "-c", metavar="YAML", help="YAML file with any of the fields below")
    parser.set_defaults(config=None)
    for name, f in fields_of(config_cls).items():
        kind = field_type(config_cls, name)
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        if f.metadata.get("positional"):
            parser.add_argument(f"{name}_positional", nargs="?", default=argparse.SUPPRESS, metavar=name.upper(),
                                help=f"same as --{name}")
        extra: dict = {"metavar": name.upper()}
        if kind is bool:
            extra = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif typing.get_origin(kind) is list:
            extra["nargs"] = "+"
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=_field_help(f), **extra)


def build_parser() -> argparse.ArgumentParser:
    from alignkit import __version__

    parser = _Parser(prog="alignkit", allow_abbrev=False,
                     description="Fine-tune language models: SFT and DPO, preference data, and the demo pipeline.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description, allow_abbrev=False)
        add_config_flags(sub, command.config)
    return parser


def parse_config(config_cls: type, args: argparse.Namespace) -> typing.Any:
    """Defaults, then the YAML file, then the flags; each source's errors name that source."""
    from_file = normalise(config_cls, load_yaml(args.config), args.config) if args.config else {}
    flags = {k.removesuffix("_positional"): v for k, v in vars(args).items() if k not in ("command", "config")}
    from_flags = normalise(config_cls, flags, "command line")
    config = config_cls(**{**from_file, **from_flags})
    validate(config)
    return config


def _reject_unknown(unknown: list[str], config_cls: type) -> None:
    flag = next((u for u in unknown if u.startswith("-")), unknown[0])
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    hint = suggest(name, fields_of(config_cls))
    hint = hint.replace("'", "'--", 1).replace("_", "-") if hint else f"; {USAGE_HINT}"
    raise UserError(f"unknown option {flag.split('=')[0]}{hint}")


def one_line(err: Exception) -> str:
    """Library messages pasted into ours may hold line breaks; the error stays one line."""
    return " ".join(str(err).split())


def join_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-4` as `--lr=-1e-4`, so argparse does not take the number for an option (the check says why
    it is refused)."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                pass
            else:
                joined[-1] = f"{joined[-1]}={token}"
                continue
        joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    code = run_command(argv)
    if "deepspeed" in sys.modules:  # imported by a DeepSpeed launch only; the check costs no import
        from alignkit.training.zero import leave_deepspeed_process

        leave_deepspeed_process(code)  # returns only outside a DeepSpeed launch
    return code


def run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(join_negative_numbers(sys.argv[1:] if argv is None else argv))
        if args.command is None:
            parser.print_help()
            return 2
        command = COMMANDS[args.command]
        if unknown:
            _reject_unknown(unknown, command.config)
        kernel_caches.bound()  # before any command's first bf16 matmul (the demo samples before it trains)
        importlib.import_module(command.runner).run(parse_config(command.config, args))
        return 0
    except UserError as err:
        print(f"alignkit: error: {one_line(err)}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"alignkit: error: {one_line(err)}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"alignkit: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
