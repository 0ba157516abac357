"""Docs that run: the code blocks of README.md and docs/*.md are checked against the code.

- ```toml blocks load with the loader their content calls for: a capture spec
  (``[[capture]]``), a relay config (``[[source]]`` or ``[relay]``), or a
  participant's handlers file (``[participant]``, ``[[handler]]`` or
  ``[[schedule]]``). A block that is none of these fails.
- Every ``walsaga ...`` command line in ```sh, ```bash, ```console (and
  ``$ ``-prompted lines of untyped blocks) names an existing command and only
  options that command has, read from the click group; nothing is run.
- ```python blocks compile.

A block can be given directives in an HTML comment on the line before it
(invisible once rendered), several separated by ``;``:

- ``<!-- docs-test: skip -->`` — not checked at all (a deliberate fragment);
- ``<!-- docs-test: exec -->`` — a Python block that needs no services: it is
  run, after the earlier ``exec`` blocks of the same file, in one namespace;
- ``<!-- docs-test: from PATH -->`` — the block is a verbatim excerpt of the
  repository file PATH (whole lines; it may be shifted left as a whole).

No service is needed: this runs in about a second.
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from participants.declarative import load_participant_config
from relay.capture import parse_spec
from relay.config import load_relay_config
from walsaga.cli import main as walsaga_cli

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVES = ("skip", "exec", "from")
SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console", "shell-session", "zsh"})

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    readme = ROOT / "README.md"
    return ([readme] if readme.exists() else []) + sorted((ROOT / "docs").glob("*.md"))


def parse_directives(comment: str) -> dict[str, str]:
    directives = {}
    for part in comment.split(";"):
        word, _, argument = part.strip().partition(" ")
        if word:
            directives[word] = argument.strip()
    return directives


def blocks_of(path: Path) -> Iterator[Block]:
    """The fenced code blocks of a Markdown file, with the directives before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        info = m.group("info").strip()
        language = info.split()[0].lower() if info else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            i += 1
        i += 1
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = _MARKER.match(lines[before]) if before >= 0 else None
        directives = parse_directives(marker.group("body")) if marker else {}
        yield Block(path, start + 1, language, "\n".join(body) + "\n", directives)


BLOCKS = [block for path in doc_files() for block in blocks_of(path)]


def checked(language: str) -> list[Block]:
    return [b for b in BLOCKS if b.language == language and "skip" not in b.directives]


def ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


# -- directives -----------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.directives], ids=lambda b: b.where)
def test_directives_are_known(block: Block) -> None:
    unknown = set(block.directives) - set(DIRECTIVES)
    assert not unknown, f"{block.where}: unknown docs-test directive(s) {sorted(unknown)}"
    if "exec" in block.directives:
        assert block.language == "python", f"{block.where}: only Python blocks can be run"
    if "from" in block.directives:
        source = ROOT / block.directives["from"]
        assert source.is_file(), f"{block.where}: no file {block.directives['from']}"
        assert is_excerpt(block.text, source.read_text(encoding="utf-8")), (
            f"{block.where}: the block is no longer a verbatim excerpt of "
            f"{block.directives['from']}"
        )


def is_excerpt(excerpt: str, text: str) -> bool:
    """Whether `excerpt` is a run of whole lines of `text`, as is or shifted left as a whole."""
    wanted = textwrap.dedent(excerpt).strip("\n").splitlines()
    lines = text.splitlines()
    return any(
        textwrap.dedent("\n".join(lines[i : i + len(wanted)])).splitlines() == wanted
        for i in range(len(lines) - len(wanted) + 1)
    )


# -- TOML -----------------------------------------------------------------------------

CAPTURE, RELAY, PARTICIPANT = "capture spec", "relay config", "participant handlers file"


def toml_kind(data: dict[str, object]) -> str | None:
    kinds = set()
    if "capture" in data:
        kinds.add(CAPTURE)
    if "source" in data or "relay" in data:
        kinds.add(RELAY)
    if {"participant", "handler", "schedule"} & data.keys():
        kinds.add(PARTICIPANT)
    assert len(kinds) <= 1, f"the block looks like several files at once: {sorted(kinds)}"
    return kinds.pop() if kinds else None


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders read WALSAGA_* overrides: none may leak into the check."""
    for var in list(os.environ):
        if var.startswith("WALSAGA_"):
            monkeypatch.delenv(var)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize("block", checked("toml"), ids=ids(checked("toml")))
def test_toml_blocks_load(block: Block, tmp_path: Path) -> None:
    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"{block.where}: not valid TOML: {e}")
    kind = toml_kind(data)
    if kind is None:
        pytest.fail(
            f"{block.where}: a TOML block that is neither a capture spec ([[capture]]), "
            "a relay config ([[source]]) nor a handlers file ([participant], [[handler]]); "
            "complete it, or exempt it with <!-- docs-test: skip -->"
        )
    path = tmp_path / "example.toml"
    path.write_text(block.text, encoding="utf-8")
    if kind == CAPTURE:
        spec = parse_spec(block.text, source=block.where)
        assert spec.entries or data.get("capture") == []
    elif kind == RELAY:
        config = load_relay_config(path, environ={})
        assert config.source
    else:
        config_ = load_participant_config(path)
        assert config_.handler


# -- shell ----------------------------------------------------------------------------


def command_lines(block: Block) -> Iterator[str]:
    """Shell command lines of a block, continuations joined, output lines left out."""
    prompted = block.language in ("console", "shell-session", "")
    pending = ""
    heredoc: str | None = None
    for raw in block.text.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw
        if not pending:
            if line.startswith("$ "):
                line = line[2:]
            elif prompted:
                continue  # output
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = pending + line
        pending = ""
        found = re.search(r"<<-?\s*['\"]?(\w+)", command)
        if found:
            heredoc = found.group(1)
        yield command
    if pending:
        yield pending


_WRAPPERS = frozenset({"env", "exec", "nohup", "time", "command"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def walsaga_invocations(line: str) -> Iterator[list[str]]:
    """The arguments of each `walsaga` command in a shell line (pipelines, lists, `&`)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as e:
        raise AssertionError(f"cannot split {line!r}: {e}") from e
    segment: list[str] = []
    skip_next = False
    for token in [*tokens, ";"]:
        if skip_next:
            skip_next = False
            continue
        if token and all(c in "();<>|&" for c in token):
            if "<" in token or ">" in token:
                if segment and segment[-1].isdigit():
                    segment.pop()  # the descriptor of 2>&1
                skip_next = True
                continue
            words = segment
            segment = []
            while words and (_ASSIGNMENT.match(words[0]) or words[0] in _WRAPPERS):
                words = words[1:]
            if words and os.path.basename(words[0]) == "walsaga":
                yield words[1:]
            continue
        segment.append(token)


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    extra = command.context_settings if parent is None else {}
    return click.Context(command, info_name=name, parent=parent, **extra)


def check_invocation(args: list[str]) -> str | None:
    """What is wrong with `walsaga ARGS`, judged from the click commands; None if nothing."""
    ctx = _context(walsaga_cli, "walsaga", None)
    command: click.Command = walsaga_cli
    arguments_left = 0
    asked_for_help = False
    i = 0
    while i < len(args):
        token = args[i].strip("[]")
        i += 1
        if not token or token in ("...", "|"):
            continue
        params = command.get_params(ctx)
        if token.startswith("-") and token != "-":
            name, has_value, _ = token.partition("=")
            option = next(
                (
                    p
                    for p in params
                    if isinstance(p, click.Option) and name in (*p.opts, *p.secondary_opts)
                ),
                None,
            )
            if option is None:
                return f"`{ctx.command_path}` has no option {name}"
            if name in ctx.help_option_names or name == "--version":
                asked_for_help = True
            if not (option.is_flag or option.count) and not has_value:
                if i >= len(args):
                    return f"`{ctx.command_path} {name}` needs a value"
                i += 1
            continue
        sub = command.get_command(ctx, token) if isinstance(command, click.Group) else None
        if sub is not None:
            command = sub
            ctx = _context(command, token, ctx)
            arguments = [p for p in command.get_params(ctx) if isinstance(p, click.Argument)]
            arguments_left = sum(999 if p.nargs < 0 else p.nargs for p in arguments)
            continue
        if arguments_left > 0:
            arguments_left -= 1
            continue
        if isinstance(command, click.Group):
            return f"`{ctx.command_path}` has no command {token!r}"
        return f"`{ctx.command_path}` takes no argument {token!r}"
    if (
        isinstance(command, click.Group)
        and not command.invoke_without_command
        and not asked_for_help
    ):
        return f"`{ctx.command_path}` needs a command"
    return None


SHELL_BLOCKS = [
    b
    for b in BLOCKS
    if "skip" not in b.directives and (b.language in SHELL_LANGUAGES or b.language == "")
]
INVOCATIONS = [
    (block, args)
    for block in SHELL_BLOCKS
    for line in command_lines(block)
    for args in walsaga_invocations(line)
]


@pytest.mark.parametrize(
    ("block", "args"),
    INVOCATIONS,
    ids=[f"{b.where}:walsaga {' '.join(a)[:60]}" for b, a in INVOCATIONS],
)
def test_walsaga_commands_exist_with_their_options(block: Block, args: list[str]) -> None:
    problem = check_invocation(args)
    assert problem is None, f"{block.where}: walsaga {' '.join(args)}: {problem}"


def test_the_command_check_catches_what_it_should() -> None:
    assert check_invocation(["relay", "replay", "--since", "2024-01-01", "--source=a"]) is None
    assert check_invocation(["deploy", "--dsn", "x", "[--plan]", "[--spec", "FILE]"]) is None
    assert check_invocation(["--help"]) is None
    assert check_invocation(["relay", "--config", "r.toml"]) is None
    assert "no option --nope" in (check_invocation(["deploy", "--nope"]) or "")
    assert "no command 'replai'" in (check_invocation(["relay", "replai"]) or "")
    assert "needs a value" in (check_invocation(["participant", "--config"]) or "")
    assert "takes no argument" in (check_invocation(["deploy", "extra"]) or "")
    assert "needs a command" in (check_invocation([]) or "")
    line = "WALSAGA_X=1 walsaga relay --config r.toml 2>&1 | tee log & walsaga deploy --plan"
    assert list(walsaga_invocations(line)) == [
        ["relay", "--config", "r.toml"],
        ["deploy", "--plan"],
    ]
    assert list(walsaga_invocations("psql -U walsaga -c 'SELECT 1'")) == []


# -- Python ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", checked("python"), ids=ids(checked("python")))
def test_python_blocks_compile(block: Block) -> None:
    compile(textwrap.dedent(block.text), block.where, "exec")


RUNNABLE = sorted({b.path for b in checked("python") if "exec" in b.directives})


@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_runnable_python_blocks_run(path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "docs_example"}
    for block in checked("python"):
        if block.path == path and "exec" in block.directives:
            exec(compile(textwrap.dedent(block.text), block.where, "exec"), namespace)
