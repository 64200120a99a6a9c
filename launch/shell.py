"""Shell text the launchers render, and submitting it or printing it instead (--dry-run).

Literal values are single-quoted (shlex) wherever they go; a value that must be evaluated by the
shell that runs the line (a SLURM variable, a command substitution) is marked `Expr` and
double-quoted, so it expands but is not split.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

SCRIPT_HEADER = "#!/usr/bin/env bash\nset -euo pipefail"


class Expr(str):
    """A shell expression such as "$SLURM_PROCID", expanded by the shell that runs the line."""


def quote(value: str) -> str:
    return f'"{value}"' if isinstance(value, Expr) else shlex.quote(value)


def command_line(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """`cd CWD && K=V ... ARGV`, every part quoted for a POSIX shell."""
    assignments = [f"{key}={quote(value)}" for key, value in (env or {}).items()]
    line = " ".join([*assignments, *map(quote, argv)])
    return f"cd {quote(cwd)} && {line}" if cwd else line


def quoted_with_variable(text: str, placeholder: str, variable: str) -> str:
    """`text` as one single-quoted shell word in which `placeholder` becomes the value of the
    running shell's `variable`: for a command passed to a remote shell (ssh) that needs a value
    only known locally when the script runs. The placeholder must be made of characters shlex
    leaves unquoted (letters, digits, @%+=:,./-_), so quoting the text cannot change it."""
    if placeholder not in text or shlex.quote(placeholder) != placeholder:
        raise ValueError(f"placeholder {placeholder!r} must appear in the text and need no quoting")
    single_quoted = "'" + text.replace("'", "'\"'\"'") + "'"  # always quoted, unlike shlex.quote
    return single_quoted.replace(placeholder, f"'\"${{{variable}}}\"'")


def submit(text: str, via: Sequence[str], *, dry_run: bool) -> int:
    """Pipe `text` (a script or manifest) into `via` (bash, sbatch, kubectl apply -f -), or print it
    unchanged when dry_run, so that `--dry-run | VIA` is the same launch. Returns the exit status."""
    if dry_run:
        sys.stdout.write(text)
        return 0
    return subprocess.run(list(via), input=text, text=True, check=False).returncode
