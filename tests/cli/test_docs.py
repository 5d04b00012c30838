"""Every code block in README.md and docs/ runs as written: Python blocks are executed (the
MiniLM checkpoint stands for "path/to/bert-dir" and the model dirs, a temp dir for outputs), and
every `bertrt` command line in a shell block names a real command and real options."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest

from bertrt.cli import main

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(lang: set[str]) -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            if m.group(1) in lang:
                line = text[: m.start()].count("\n") + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", line, m.group(2)))
    return found


PYTHON = _blocks({"python"})
SHELL = _blocks({"bash", "sh", ""})


@pytest.fixture
def workdir(tmp_path, minilm_dir, monkeypatch):
    """A folder holding what the blocks name: model dirs, a vocabulary and a small corpus."""
    for name in ("model-dir", "model_dir", "dir"):
        (tmp_path / name).symlink_to(minilm_dir, target_is_directory=True)
    shutil.copy(Path(minilm_dir) / "vocab.txt", tmp_path / "vocab.txt")
    lines = [f"Sentence number {i} talks about topic {i % 7}." for i in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(
        line + ("\n" if i % 5 == 4 else "") for i, line in enumerate(lines)) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("where,line,code", PYTHON, ids=[b[0] for b in PYTHON])
def test_python_block_runs(where, line, code, workdir, minilm_dir):
    code = code.replace("path/to/bert-dir", os.fspath(minilm_dir))
    exec(compile(code, where, "exec"), {"__name__": "__doc_block__"})


def _commands(code: str) -> list[list[str]]:
    """The argument lists of every `bertrt …` (or `-m bertrt.train.cli …`) command."""
    text = re.sub(r"\\\n\s*", " ", code)
    found = []
    for line in text.splitlines():
        line = line.split(" #")[0]
        for part in re.split(r"&&|\|", line):
            words = shlex.split(part.replace("…", ""))
            if "bertrt" in words:
                found.append(words[words.index("bertrt") + 1:])
            elif "bertrt.train.cli" in words:
                found.append(["train", *words[words.index("bertrt.train.cli") + 1:]])
    return found


def _options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}


@pytest.mark.parametrize("where,line,code", SHELL, ids=[b[0] for b in SHELL])
def test_shell_block_names_real_commands_and_options(where, line, code):
    commands = _commands(code)
    for args in commands:
        if not args:
            continue
        sub = main.commands.get(args[0])
        assert sub is not None, f"{where}: no command bertrt {args[0]}"
        flags = [a.lstrip("[") for a in args if a.lstrip("[").startswith("-")]
        given = {re.split(r"[=\]]", a)[0] for a in flags}
        unknown = given - _options(sub)
        assert not unknown, f"{where}: bertrt {args[0]} has no option(s) {sorted(unknown)}"


def test_the_docs_hold_runnable_examples():
    assert len(PYTHON) >= 6 and any("bertrt" in code for _, _, code in SHELL)
