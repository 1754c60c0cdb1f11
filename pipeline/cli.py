"""`python -m pipeline <command>`: one thin entry point per capability.

Command modules are imported only when their command runs, so `--help` and the light commands start
without importing torch or DeepSpeed.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys

from pipeline.config import ConfigError
from pipeline.errors import UserError

# name -> (module, one-line summary). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("pipeline.tokenizer.command", "train a SentencePiece tokenizer with fixed special-token ids"),
    "shard": ("pipeline.preprocess.command", "turn raw documents into WebDataset shards of BERT pairs or GPT blocks"),
    "merge": ("pipeline.preprocess.merge", "join the parts of a multi-task sharding run into one manifest"),
    "inspect": ("pipeline.preprocess.inspect", "summarise, verify and decode a shard directory"),
    "train": ("pipeline.train.command", "pre-train BERT (MLM + NSP) or GPT-1 (causal LM) with DeepSpeed ZeRO"),
    "finetune": ("pipeline.finetune.command", "fine-tune a checkpoint: classification, pairs, SQuAD, multiple choice"),
    "unlabeled": ("pipeline.finetune.unlabeled", "write a task's training texts as a corpus for adaptive pre-training"),
    "export": ("pipeline.export.command", "export a checkpoint as a Hugging Face model directory with its lineage"),
    "evaluate": ("pipeline.evaluate.command", "fine-tune a model on a suite of tasks, against random initialisation"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose errors are one line with a pointer to ``--help``, not the 60-line usage of every
    config field first; an unknown option comes with the closest real one."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_message(unknown))
        return parsed

    def unknown_message(self, unknown: list[str]) -> str:
        options = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
        if not flags:
            return f"unrecognized arguments: {' '.join(unknown)}"
        parts = []
        for flag in flags:
            close = difflib.get_close_matches(flag, options, n=1)
            parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        return f"unrecognized option{'s' if len(flags) > 1 else ''}: {', '.join(parts)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="BERT / GPT-1 pre-training pipeline: preprocess -> pre-train -> fine-tune -> export.",
        epilog="Run `python -m pipeline <command> --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_module, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the command name first, so each command builds its own full parser lazily.
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv = argv[1:]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parser.error(f"unknown command {name!r}{hint}; choose from {', '.join(COMMANDS)}")
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    cmd_parser = _CommandParser(
        prog=f"python -m pipeline {name}",
        description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = int(module.run(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # In multi-process jobs, native threads of the gloo/NCCL stack sometimes abort the interpreter's
        # shutdown after all work is done ("terminate called without an active exception"), turning a finished
        # job into a failed one. Everything is written and closed by now: leave without static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code
