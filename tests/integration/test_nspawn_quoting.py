"""What the real systemd-nspawn makes of the words pymachine writes into .nspawn files.

Each case renders a ``Parameters=`` or ``Environment=`` line with
``units.nspawn_words``, writes it into a trusted settings file
(/run/systemd/nspawn/NAME.nspawn), starts systemd-nspawn on a minbase root and
compares what the payload received with what was meant.

What systemd 252 does with these two settings (``config_parse_strv``, which splits
with ``EXTRACT_UNQUOTE|EXTRACT_RETAIN_ESCAPE``), pinned by ``test_nspawn_word_grammar``:

- words are separated by blanks; ``"..."`` and ``'...'`` group and are removed,
  and quoted and bare pieces next to each other join into one word;
- a backslash is an ordinary character, inside quotes or not: ``\\"`` does not
  escape a quote, ``\\\\`` stays two backslashes, ``\\n`` stays backslash-n;
  so a ``"`` can only be written inside ``'...'``, and a ``'`` inside ``"..."``;
- ``%`` and ``$`` are passed through: no specifiers, no variables;
- a line that cannot be split (an unbalanced quote) is ignored from the bad word
  on, with a warning, but the words before it are kept.

``Parameters=`` only takes effect together with ``Boot=`` (or ``ProcessTwo=``): without
a start mode nspawn ignores it and runs the root's shell. Every settings file here
also carries pymachine's owner comment and ``X-Pymachine-Owner=`` key, and every test
asserts that nspawn printed no diagnostic about the file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymachined.core import render, units

NSPAWN = shutil.which("systemd-nspawn")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run systemd-nspawn"),
    pytest.mark.skipif(
        NSPAWN is None,
        reason="systemd-nspawn is not installed (apt-get install systemd-container)",
    ),
]

SETTINGS_DIR = Path("/run/systemd/nspawn")
PROBE_DIR = "/run/pymachine-probe"
PROBE = f"{PROBE_DIR}/probe"
TIMEOUT = 120.0

# Run with /bin/sh (not exec'd), so a noexec /tmp on the host does not matter.
PROBE_SCRIPT = f"""\
for word in "$@"; do printf '%s\\0' "$word"; done > {PROBE_DIR}/argv
exec /usr/bin/env -0 > {PROBE_DIR}/env
"""

HEADER = f"""\
# {render.MARKER}
# Written by tests/integration/test_nspawn_quoting.py; removed when the test ends.

[Exec]
{units.OWNER_MARKER}=pymachine
# PrivateUsers=no: no user namespace, so nspawn never chowns the shared root.
PrivateUsers=no
"""


@dataclass(frozen=True)
class Seen:
    """What one machine's payload received (None: the probe did not run), and what
    nspawn said about the settings file."""

    argv: list[str] | None
    env: dict[str, str]
    diagnostics: list[str]


def _nul_separated(path: Path) -> list[str]:
    return [item.decode() for item in path.read_bytes().split(b"\0")[:-1]]


def run_machine(root: Path, probe: Path, exec_lines: list[str], *, boot: bool = True) -> Seen:
    """Start a machine on root whose settings file has exec_lines in [Exec] and
    report what its payload received. Only the settings file chooses the payload:
    nothing follows the options on the command line."""
    assert NSPAWN is not None
    probe.mkdir(exist_ok=True)
    (probe / "probe").write_text(PROBE_SCRIPT)
    for output in ("argv", "env"):
        (probe / output).unlink(missing_ok=True)
    name = f"pmq-{secrets.token_hex(6)}"
    settings = SETTINGS_DIR / f"{name}.nspawn"
    # Parameters= needs a start mode (Boot= or ProcessTwo=), else nspawn ignores it.
    text = HEADER + ("Boot=no\n" if boot else "") + "".join(f"{line}\n" for line in exec_lines)
    SETTINGS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        settings.write_text(text)
        result = subprocess.run(
            [
                NSPAWN,
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                # The cached root is shared: keep it unchanged. (A --bind given here
                # masks Bind= in the file, which these tests do not use.)
                "--read-only",
                f"--directory={root}",
                f"--machine={name}",
                f"--bind={probe}:{PROBE_DIR}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        settings.unlink(missing_ok=True)
    assert result.returncode == 0, f"{text}\n{result.stderr}"
    diagnostics = [line for line in result.stderr.splitlines() if str(settings) in line]
    if not (probe / "argv").exists():
        return Seen(argv=None, env={}, diagnostics=diagnostics)
    env = dict(item.split("=", 1) for item in _nul_separated(probe / "env"))
    return Seen(argv=_nul_separated(probe / "argv"), env=env, diagnostics=diagnostics)


def start(root: Path, probe: Path, exec_lines: list[str]) -> Seen:
    """run_machine, asserting that the probe ran and nspawn found nothing to say
    about the settings file (so the owner comment and X- key pass silently)."""
    seen = run_machine(root, probe, exec_lines)
    assert seen.diagnostics == [], "\n".join(seen.diagnostics)
    assert seen.argv is not None, "the probe did not run"
    return seen


def parameters(words: list[str]) -> str:
    """The Parameters= line that runs the probe with words, as pymachine writes it."""
    return "Parameters=" + units.nspawn_words(["/bin/sh", PROBE, *words])


@pytest.fixture(scope="module")
def baseline_env(slim_root: Path, tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    """The names nspawn and the shell put into every payload's environment."""
    seen = start(slim_root, tmp_path_factory.mktemp("baseline"), [parameters([])])
    return frozenset(seen.env)


VALUES = [
    pytest.param("plain", id="plain"),
    pytest.param("two words", id="space"),
    pytest.param("  padded  twice  ", id="outer-and-double-spaces"),
    pytest.param("", id="empty"),
    pytest.param("it's", id="single-quote"),
    pytest.param("'", id="lone-single-quote"),
    pytest.param('say "hi"', id="double-quote"),
    pytest.param('"', id="lone-double-quote"),
    pytest.param('it\'s "x"', id="both-quotes"),
    pytest.param('q\\"', id="backslash-double-quote"),
    pytest.param("back\\slash", id="backslash"),
    pytest.param("q\\\\q", id="two-backslashes"),
    pytest.param("tail\\", id="trailing-backslash"),
    pytest.param("a\\nb\\t\\x41\\101\\u00e9", id="c-escape-lookalikes"),
    pytest.param("100%", id="percent"),
    pytest.param("%n %% %%% %i", id="specifier-lookalikes"),
    pytest.param("$HOME", id="dollar"),
    pytest.param("${HOME} $$ $1", id="dollar-braces-and-doubled"),
    pytest.param("{{7*7}} {% raw %}", id="jinja-lookalikes"),
    pytest.param("héllo wörld ☃ 日本", id="unicode"),
    pytest.param("#not a comment", id="hash"),
    pytest.param(";not a comment", id="semicolon"),
    pytest.param("key=value", id="equals"),
    pytest.param("~@:,+./-", id="bare-punctuation"),
    pytest.param("--quiet", id="option-lookalike"),
]


@pytest.mark.parametrize("value", VALUES)
def test_parameters_reach_the_payload(slim_root: Path, tmp_path: Path, value: str) -> None:
    # Words on both sides catch a value that swallows or spills into its neighbours.
    seen = start(slim_root, tmp_path, [parameters(["before", value, "after"])])
    assert seen.argv == ["before", value, "after"]


@pytest.mark.parametrize("value", VALUES)
def test_environment_reaches_the_payload(
    slim_root: Path, tmp_path: Path, baseline_env: frozenset[str], value: str
) -> None:
    # One assignment a line, as templates/machine.nspawn.j2 writes them.
    assignments = {"PMQ_BEFORE": "1", "PMQ_VALUE": value, "PMQ_AFTER": "1"}
    lines = [f"Environment={units.nspawn_words([f'{k}={v}'])}" for k, v in assignments.items()]
    seen = start(slim_root, tmp_path, [parameters([]), *lines])
    added = {k: v for k, v in seen.env.items() if k not in baseline_env}
    assert added == assignments


# Raw settings text -> the words nspawn passes on. Independent of pymachine's quoting,
# so these hold whatever units.nspawn_words becomes; they show how it must write words.
GRAMMAR = [
    pytest.param('"two words"', ["two words"], id="double-quotes-group"),
    pytest.param("'two words'", ["two words"], id="single-quotes-group"),
    pytest.param("\"a\"'b'c", ["abc"], id="pieces-join"),
    pytest.param('""', [""], id="empty-word"),
    pytest.param("'say \"hi\"'", ['say "hi"'], id="double-quote-inside-single"),
    pytest.param('"it\'s"', ["it's"], id="single-quote-inside-double"),
    pytest.param('"it\'s "\'"\'"x"\'"\'', ['it\'s "x"'], id="both-quotes-by-joining"),
    pytest.param('"back\\slash"', ["back\\slash"], id="backslash-literal-in-quotes"),
    pytest.param("back\\\\slash", ["back\\\\slash"], id="double-backslash-stays-double"),
    pytest.param('"tail\\"', ["tail\\"], id="backslash-does-not-escape-the-quote"),
    pytest.param('"say \\"hi\\""', ["say \\hi\\"], id="backslash-quote-is-not-an-escape"),
    pytest.param("c\\nesc \\101", ["c\\nesc", "\\101"], id="no-c-escapes"),
    pytest.param("100% %n %%", ["100%", "%n", "%%"], id="no-specifiers"),
    pytest.param("$HOME ${HOME} $$", ["$HOME", "${HOME}", "$$"], id="no-variables"),
]


@pytest.mark.parametrize(("text", "words"), GRAMMAR)
def test_nspawn_word_grammar(slim_root: Path, tmp_path: Path, text: str, words: list[str]) -> None:
    seen = start(slim_root, tmp_path, [f"Parameters=/bin/sh {PROBE} {text}"])
    assert seen.argv == words


def test_environment_grammar(slim_root: Path, tmp_path: Path, baseline_env: frozenset[str]) -> None:
    lines = [
        "Environment=PMQ_GONE=1",
        "Environment=",  # an empty assignment empties the list
        "Environment=PMQ_A=1 PMQ_B=2",  # several assignments on one line
        "Environment=PMQ_C=hello world",  # "world" is no assignment: dropped silently
        'Environment="PMQ_D=hello world"',
        "Environment=PMQ_E=first",
        "Environment=PMQ_E=second",  # the last one wins
    ]
    seen = start(slim_root, tmp_path, [parameters([]), *lines])
    added = {k: v for k, v in seen.env.items() if k not in baseline_env}
    assert added == {
        "PMQ_A": "1",
        "PMQ_B": "2",
        "PMQ_C": "hello",
        "PMQ_D": "hello world",
        "PMQ_E": "second",
    }


def test_a_line_nspawn_cannot_split_is_cut_at_the_bad_word(slim_root: Path, tmp_path: Path) -> None:
    # The unbalanced ' after the backslash ends the line's words with a warning;
    # the words before it still reach the payload.
    seen = run_machine(slim_root, tmp_path, [f"Parameters=/bin/sh {PROBE} kept x\\'y lost"])
    assert seen.argv == ["kept"]
    assert len(seen.diagnostics) == 1
    assert "Invalid syntax, ignoring" in seen.diagnostics[0]


def test_parameters_need_a_start_mode(slim_root: Path, tmp_path: Path) -> None:
    # Without Boot= nspawn ignores Parameters= and runs the root's shell instead,
    # which is why templates/machine.nspawn.j2 always writes Boot=.
    seen = run_machine(slim_root, tmp_path, [parameters(["x"])], boot=False)
    assert seen.argv is None
    assert seen.diagnostics == []
