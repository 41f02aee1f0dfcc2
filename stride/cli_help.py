"""`stride --help` and `stride COMMAND --help`, written from the commands' own signatures and docstrings.

Flags appear as the README spells them (`--tasks-per-node N`), with their defaults, and without a framework's
banner or type reprs. Only `-h` is a short option: single letters would mean different things in different
commands (`-n`: processes or nodes), so stride refuses them and names the long options instead.
"""
from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any, Callable, Optional, Sequence

from stride.errors import StrideError

HELP_WORDS = ("--help", "-h")
WIDTH = 100


def wants_help(argv: Sequence[str]) -> bool:
    """`--help` or `-h` anywhere before a `--` (after it, the words are for the completion script)."""
    for word in argv:
        if word == "--":
            return False
        if word in HELP_WORDS:
            return True
    return False


def refuse_short_options(argv: Sequence[str], command: Optional[Callable], name: str) -> None:
    """A short option other than -h is refused with the long options it could have meant."""
    for word in argv:
        if word == "--":
            return
        if re.fullmatch(r"-[A-Za-z](=.*)?", word) and word[:2] not in HELP_WORDS:
            letter = word[1]
            options = [f"--{flag}" for flag in _options(command)] if command else []
            meant = [option for option in options if option[2] == letter.lower()]
            hint = f"write {' or '.join(meant)}" if meant else "write the long option"
            where = f"`stride {name}`" if command else "stride"
            raise StrideError(f"short option {word[:2]} is not used by {where} (only -h is): {hint}; "
                              f"`stride {name + ' ' if command else ''}--help` lists the options")


def _options(command: Callable) -> list[str]:
    params = inspect.signature(command).parameters
    return [p.replace("_", "-") for p, spec in params.items()
            if p != "self" and spec.kind is not spec.VAR_POSITIONAL and spec.default is not spec.empty]


def _split_doc(doc: str) -> tuple[str, str, dict[str, str]]:
    """(summary, description, {argument: help}) from a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary = lines[0] if lines else ""
    body, args, current = [], {}, None
    in_args = False
    for line in lines[1:]:
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            body.append(line)
            continue
        match = re.match(r"^  (\*{0,2}\w+): (.*)$", line)
        if match:
            current = match.group(1).lstrip("*")
            args[current] = match.group(2).strip()
        elif current and line.strip():
            args[current] += " " + line.strip()
    return summary, "\n".join(body).strip("\n"), args


def _metavar(spec: inspect.Parameter) -> str:
    default = spec.default
    if isinstance(default, bool):
        return ""
    annotation = str(spec.annotation)
    return " N" if "int" in annotation and "str" not in annotation else " VALUE"


def _wrap(text: str, indent: int) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent)


def command_help(name: str, command: Callable) -> str:
    summary, description, docs = _split_doc(command.__doc__)
    params = [(p, spec) for p, spec in inspect.signature(command).parameters.items() if p != "self"]
    positional = [(p, spec) for p, spec in params if spec.default is spec.empty or spec.kind is spec.VAR_POSITIONAL]
    options = [(p, spec) for p, spec in params if (p, spec) not in positional]
    usage = " ".join(f"[{p.upper()} ...]" if spec.kind is spec.VAR_POSITIONAL else p.upper()
                     for p, spec in positional)
    out = [f"stride {name} - {summary}", "", f"usage: stride {name} {usage + ' ' if usage else ''}[options]"]
    if description:
        out += ["", description]
    if positional:
        out += ["", "arguments:"]
        for p, spec in positional:
            out += [f"  {p.upper()}{' ...' if spec.kind is spec.VAR_POSITIONAL else ''}",
                    _wrap(docs.get(p, ""), 6)]
    out += ["", "options:"]
    for p, spec in options:
        flag = f"  --{p.replace('_', '-')}{_metavar(spec)}"
        default = spec.default
        shown = "" if default is None or isinstance(default, bool) else f" (default: {default})"
        out += [flag, _wrap(docs.get(p, "") + shown, 6)]
    out += ["  -h, --help", _wrap("show this help", 6)]
    return "\n".join(out)


def top_help(cli: Any) -> str:
    summary, description, _ = _split_doc(type(cli).__doc__)
    out = [summary, "", "usage: stride COMMAND [ARGS ...] [options]", "", description, "", "commands:"]
    names = sorted(name for name in dir(type(cli)) if not name.startswith("_"))
    for name in names:
        first = _split_doc(getattr(type(cli), name).__doc__)[0]
        out += [f"  {name}", _wrap(first, 6)]
    return "\n".join(out)
