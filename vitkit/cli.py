"""`vitkit VERB ...`: a table from verb to command module. Thin: parse, call the Python API, print.

Each module in vitkit/commands/ defines HELP (one line), add_arguments(parser) and run(args) -> int.
Adding a verb = adding a module there; nothing else changes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import sys
from types import ModuleType

from . import allocator, commands, threads


def discover() -> dict[str, ModuleType]:
    """Verb name -> command module (module names use _ where the verb uses -)."""
    found = {}
    for info in pkgutil.iter_modules(commands.__path__):
        if not info.name.startswith("_"):
            found[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return dict(sorted(found.items()))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `vitkit` parser with every verb. `only`: add the flags of that verb alone, the one being run ("": of
    none): building the others' would cost their imports (the training flags read TrainConfig: torchvision)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vitkit", description="Vision Transformers: train, fine-tune, explain, serve."
    )
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, mod in discover().items():
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP)
        if only is None or verb == only:
            mod.add_arguments(p)
            add_threads_argument(p)
        p.set_defaults(_run=mod.run)
    return parser


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """`--threads N|auto` for every verb; the training verbs declare their own (a TrainConfig option)."""
    with contextlib.suppress(argparse.ArgumentError):  # "conflicting option string": the verb has one
        p.add_argument(
            "--threads",
            default=threads.AUTO,
            help="CPU threads: a number, or auto: every core, without long OpenMP spins while other processes hold "
            "cores, re-read as it runs (default: auto; docs/speed.md)",
        )


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as their bytes (like ls), not crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=next((a for a in argv if not a.startswith("-")), ""))  # the verb, if any
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    allocator.configure()  # big activations without page faults on every step (vitkit/allocator.py)
    try:
        with threads.configured(getattr(args, "threads", None)):  # None: the training verbs' flag left off: auto
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        # expected failures (bad path, bad input, missing extra) get one clear line, not a traceback
        print(f"vitkit {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
