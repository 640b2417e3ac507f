"""How user strings become shell text: the one place a launch script's words are checked and quoted.

A launch script (a dry run's output, an sbatch script, a remote `--command`) is written from flags a
user typed. Two rules make it safe by construction rather than by care at each call:

- `check` refuses a value holding a control character (a newline above all: in a script it starts
  a command of its own), a Unicode line or paragraph separator, or an invisible format character (a
  right-to-left override makes the printed script read otherwise than it runs). No flag of
  `heft launch` has a use for one, so this is a one-line error, not an escape.
- `quote` is the only way a value becomes a word of shell text: `check`, then POSIX single quotes
  (shlex), so `$(...)`, backticks, `;` and quotes reach the command as one literal argument.

A here-document's end marker is chosen so that no line of its text equals it (`heredoc`). YAML is
written by the YAML emitter (gke.py), never by formatting strings.
"""

import shlex
import unicodedata

from heft.model.checks import ConfigError

REFUSED = {"Cc": "a control character", "Cf": "an invisible format character", "Zl": "a line separator",
           "Zp": "a paragraph separator"}


def check(what: str, value: str) -> str:
    """`value`, if it holds no character that could end a line of a script or hide part of it; else a
    ConfigError naming `what` (a flag, say) and the character."""
    for ch in str(value):
        kind = REFUSED.get(unicodedata.category(ch))
        if kind:
            name = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}.get(ch, f"{kind} (U+{ord(ch):04X})")
            raise ConfigError(f"{what} holds {name}, which a launch script cannot carry safely: {value!r}; "
                              "give it on one line, without control characters")
    return value


def quote(word: str, what: str = "a word of the launch script") -> str:
    """`word` as one shell word, after `check`."""
    return shlex.quote(check(what, word))


def join(argv) -> str:
    """A command line: each argument one shell word."""
    return " ".join(quote(a) for a in argv)


def heredoc(text: str) -> tuple[str, str]:
    """(end marker, body) for `text` as a quoted here-document: the marker is HEFT_EOF unless a line of
    `text` is exactly that, then the first of HEFT_EOF_1, HEFT_EOF_2, ... that no line is. The body
    ends with a newline, so the marker stands on a line of its own."""
    lines = set(text.split("\n"))
    marker, n = "HEFT_EOF", 0
    while marker in lines:
        n += 1
        marker = f"HEFT_EOF_{n}"
    return marker, text if text.endswith("\n") else text + "\n"
