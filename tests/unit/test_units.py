"""Quoting for unit and .nspawn files, read back the way systemd reads them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymachined.core import units

# Printable text without control characters: what validation lets through.
safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=0, max_size=40
)


@given(st.lists(safe_text, min_size=1, max_size=6))
def test_exec_words_round_trip(words: list[str]) -> None:
    line = units.unit_words(words, exec_line=True)
    assert units.split_words(units.unescape_specifiers(line), exec_line=True) == words


@given(st.lists(safe_text, min_size=1, max_size=6))
def test_nspawn_words_round_trip(words: list[str]) -> None:
    assert units.split_words(units.nspawn_words(words), escapes=False) == words


@pytest.mark.parametrize(
    ("words", "line"),
    [
        (["/usr/bin/env", "a"], "/usr/bin/env a"),
        (["echo", "two words"], 'echo "two words"'),
        (["echo", "100%"], "echo 100%%"),
        (["echo", "$HOME"], "echo $$HOME"),
        (["echo", 'say "hi"'], 'echo "say \\"hi\\""'),
        (["echo", "back\\slash"], 'echo "back\\\\slash"'),
        (["echo", ""], 'echo ""'),
        (["echo", "{{7*7}}"], 'echo "{{7*7}}"'),
    ],
)
def test_exec_line_quoting(words: list[str], line: str) -> None:
    assert units.unit_words(words, exec_line=True) == line


@pytest.mark.parametrize("bad", ["a\nb", "nul\x00", "tab\there", "esc\x1b[0m", "del\x7f"])
def test_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(units.UnsafeValue):
        units.unit_words([bad])
    with pytest.raises(units.UnsafeValue):
        units.nspawn_words([bad])
    with pytest.raises(units.UnsafeValue):
        units.unit_value(bad)


def test_trailing_backslash_is_refused_in_single_values() -> None:
    with pytest.raises(units.UnsafeValue):
        units.unit_value("C:\\")
    # As a quoted word it is escaped, so it cannot continue the line.
    assert units.unit_words(["C:\\"]) == '"C:\\\\"'


def test_unit_value_escapes_specifiers() -> None:
    assert units.unit_value("50% of %n") == "50%% of %%n"


def test_parse_unit_sections_comments_and_continuations() -> None:
    text = (
        "# comment\n"
        "[Unit]\n"
        "Description=one \\\n"
        "  two\n"
        "; other comment\n"
        "\n"
        "[Service]\n"
        "ExecStart=/bin/true\n"
        "Environment=A=1\n"
        "Environment=B=2\n"
    )
    assert units.parse_unit(text) == [
        units.Entry("Unit", "Description", "one  two"),
        units.Entry("Service", "ExecStart", "/bin/true"),
        units.Entry("Service", "Environment", "A=1"),
        units.Entry("Service", "Environment", "B=2"),
    ]


def test_parse_unit_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not an assignment"):
        units.parse_unit("[Unit]\njust words\n")


def test_unescape_specifiers_refuses_unknown_specifier() -> None:
    assert units.unescape_specifiers("100%%") == "100%"
    with pytest.raises(ValueError, match="specifier"):
        units.unescape_specifiers("%n")


def test_split_words_unterminated_quote() -> None:
    with pytest.raises(ValueError, match="unterminated"):
        units.split_words('"open')


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("back\\slash", '"back\\slash"'),
        ('say "hi"', "'say \"hi\"'"),
        ("it's", '"it\'s"'),
        ('it\'s "x"', '"it\'s "\'"\'"x"\'"\'""'),
        ("tail\\", '"tail\\"'),
    ],
)
def test_nspawn_quoting_never_uses_backslash_escapes(word: str, written: str) -> None:
    assert units.nspawn_words([word]) == written


def test_nspawn_path_escapes_backslash_and_colon() -> None:
    assert units.nspawn_path("/srv/a\\b") == "/srv/a\\\\b"
    assert units.nspawn_path("/srv/a:b") == "/srv/a\\:b"
