"""How user strings become shell text: the one place a launch script's words are checked and quoted.

A launch script (a dry run's output, an sbatch script, a remote `--command`) is written from flags a
user typed. Two rules make it safe by construction rather than by care at each call:

- `check` refuses a value holding a control character (a newline above all: in a script it starts
  a command of its own), a Unicode line or paragraph separator, or an invisible format character (a
  right-to-left override makes the printed script read otherwise than it runs). No flag of
  `heft launch` has a use for one, so this is a one-line error, not an escape.
- `quote` is the only way a value becomes a word of shell text: `check`, then POSIX single quotes
  (shlex), so `$(...)`, backticks, `;` and quotes reach the command as one literal argument.

- `resource` checks the names of cloud resources (a TPU, a zone, a project, a cluster) against
  the forms Google Cloud gives them, so that none can start with `-` and reach gcloud as a flag.

A here-document's end marker is chosen so that no line of its text equals it (`heredoc`). YAML is
written by the YAML emitter (gke.py), never by formatting strings.
"""

import re
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


# Google Cloud's own forms (cloud.google.com/compute/docs/naming-resources, .../resource-manager/docs/
# creating-managing-projects): lower-case letters, digits and '-', starting with a letter.
RESOURCE = {
    "tpu": (r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", "a TPU name: up to 63 lower-case letters, digits and '-', "
                                                 "starting with a letter and not ending with '-'"),
    "cluster": (r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", "a GKE cluster name: up to 40 lower-case letters, digits "
                                                     "and '-', starting with a letter and not ending with '-'"),
    "zone": (r"[a-z]+-[a-z]+[0-9]+-[a-z]", "a zone such as us-central2-b"),
    "project": (r"([a-z0-9][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]",
                "a project ID: 6 to 30 lower-case letters, digits and '-', starting with a letter"),
}


def resource(flag: str, value: str) -> str:
    """`value` of --`flag` (a key of RESOURCE), if it has the form Google Cloud gives such names; else
    a ConfigError saying the form."""
    pattern, form = RESOURCE[flag]
    if not re.fullmatch(pattern, str(value)):
        raise ConfigError(f"--{flag}={value!r} is not {form}")
    return value


def local_path(path: str) -> str:
    """A path as a command's argument: one starting with '-' gets './' before it, or the command
    would read it as an option."""
    return "./" + path if path.startswith("-") else path
