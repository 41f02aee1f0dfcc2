"""Read an sbatch script's `#SBATCH` directives back the way sbatch itself does (Slurm 22.05's _get_argument).

sbatch reads `#SBATCH` lines (at the very start of a line) until the first line that is neither blank nor a comment;
in each it splits arguments at ASCII whitespace, honours single and double quotes, treats a backslash as an escape
even inside quotes, and stops at an unquoted `#`. tests/test_hardening_input.py checks this reader against the real
sbatch (`sbatch --test-only -vvv` prints every argument it found).
"""
from __future__ import annotations

_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale: Unicode spaces are ordinary bytes to sbatch


def _arguments(rest: str) -> list[str]:
    args, i, n = [], 0, len(rest)
    while True:
        while i < n and rest[i] in _C_SPACE:
            i += 1
        if i >= n:
            return args
        arg, quote, escape, comment = [], "", False, False
        while i < n and (quote or rest[i] not in _C_SPACE):
            char = rest[i]
            i += 1
            if escape:
                escape = False
            elif char == "\\":
                escape = True
                continue
            elif quote:
                if char == quote:
                    quote = ""
                    continue
            elif char in "'\"":
                quote = char
                continue
            elif char == "#":
                comment = True
                break
            arg.append(char)
        # sbatch drops an argument whose quote never closes, and every directive after it.
        assert not quote, f"unterminated {quote} in #SBATCH line: {rest!r}"
        if arg or not comment:
            args.append("".join(arg))
        if comment:
            return args


def sbatch_arguments(script: str) -> list[str]:
    """Every argument sbatch takes from the script's directives, in order."""
    found = []
    for line in script.split("\n"):  # sbatch splits at \n only
        if line.startswith("#SBATCH"):
            found += _arguments(line[len("#SBATCH"):])
        elif line.strip(_C_SPACE) and not line.lstrip(_C_SPACE).startswith("#"):
            break
    return found


def directives(script: str) -> list[tuple[str, object]]:
    """[(option, value or None for a switch)] from `--option=value` / `--option` arguments."""
    out = []
    for arg in sbatch_arguments(script):
        assert arg.startswith("--"), f"not a long option: {arg!r}"
        name, eq, value = arg[2:].partition("=")
        out.append((name, value if eq else None))
    return out
