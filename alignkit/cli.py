"""The `alignkit` command: `alignkit sft|dpo --model M --data FILE --output-dir DIR [--config cfg.yaml] [...]`.

Every config field is a flag (`--max-length` and `--max_length` both work); values come from the defaults,
then the YAML file, then the flags. Errors are one line, `alignkit: error: ...`, with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from alignkit.config import DPOConfig, SFTConfig, field_type, fields_of, load_yaml, normalise, suggest, validate
from alignkit.errors import UserError

USAGE_HINT = "run 'alignkit sft --help' or 'alignkit dpo --help' for every field"


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become a UserError so they print as one line like every other error."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message)


def _field_help(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = "none" if default is None or default == [] else default
    return f"{f.metadata['help']} (default: {shown})"


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    parser.add_argument("--config", "-c", metavar="YAML", help="YAML file with any of the fields below")
    for name, f in fields_of(config_cls).items():
        kind = field_type(config_cls, name)
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        extra: dict = {"metavar": name.upper()}
        if kind is bool:
            extra = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif typing.get_origin(kind) is list:
            extra["nargs"] = "+"
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=_field_help(f), **extra)


def build_parser() -> argparse.ArgumentParser:
    from alignkit import __version__

    parser = _Parser(prog="alignkit", description="Fine-tune language models: SFT and DPO.",
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sft = commands.add_parser(
        "sft", help="supervised fine-tuning on prompt/completion, chat, alpaca, sharegpt or text rows",
        description="Supervised fine-tuning: cross-entropy on completion / assistant tokens only. "
                    "Outputs: metrics.jsonl, summary.json, config.yaml, final/, checkpoints/.",
        allow_abbrev=False)
    add_config_flags(sft, SFTConfig)
    dpo = commands.add_parser(
        "dpo", help="direct preference optimisation on (prompt, chosen, rejected) pairs",
        description="DPO and its relatives (robust, IPO, hinge, SimPO, + an SFT term) on preference pairs. "
                    "Outputs: metrics.jsonl, summary.json, config.yaml, final/, checkpoints/.",
        allow_abbrev=False)
    add_config_flags(dpo, DPOConfig)
    return parser


def parse_config(config_cls: type, args: argparse.Namespace) -> typing.Any:
    """Defaults, then the YAML file, then the flags; each source's errors name that source."""
    from_file = normalise(config_cls, load_yaml(args.config), args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        config_cls = {"sft": SFTConfig, "dpo": DPOConfig}[args.command]
        if unknown:
            _reject_unknown(unknown, config_cls)
        config = parse_config(config_cls, args)
        if args.command == "sft":
            from alignkit.recipes import sft as recipe
        else:
            from alignkit.recipes import dpo as recipe
        recipe.run(config)
        return 0
    except UserError as err:
        print(f"alignkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
