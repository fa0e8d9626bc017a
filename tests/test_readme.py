"""The README stays true: every ```python block runs as written, every ```bash block's
`jaxdl` commands parse with the real CLI and name files that exist; a block that cannot
stand alone says so with an ``<!-- excerpt: why -->`` line just above its fence. Blocks
without a language are diagrams and output, not code."""

import re
import shlex
from pathlib import Path

import pytest

from jaxdl.cli import _parser, _split_overrides

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of the README's blocks in `language` not marked as excerpts."""
    text = (REPO / "README.md").read_text()
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if match.group(1) == language and not before.startswith("<!-- excerpt:"):
            out.append((text[: match.start()].count("\n") + 1, match.group(2)))
    return out


def commands(code: str) -> list[list[str]]:
    """The `jaxdl ...` command lines of a shell block (continuations joined, comments and
    environment assignments dropped) as argument lists."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"\w+=.*", words[0]):
            words = words[1:]
        for i, word in enumerate(words):  # "... && .venv/bin/jaxdl demo"
            if Path(word).name == "jaxdl" and (i == 0 or words[i - 1] in ("&&", ";")):
                out.append(words[i + 1 :])
    return out


def test_the_readme_has_runnable_blocks_of_both_kinds():
    assert len(blocks("python")) >= 1 and len(blocks("bash")) >= 5


@pytest.mark.parametrize("line, code", blocks("python"), ids=lambda v: str(v)[:12])
def test_python_blocks_run_as_written(tmp_path, monkeypatch, line, code):
    monkeypatch.chdir(tmp_path)  # runs/ and outputs land here; the repo's files are linked
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    exec(compile(code, f"README.md line {line}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("line, code", blocks("bash"), ids=lambda v: str(v)[:12])
def test_bash_commands_parse_and_name_files_that_exist(line, code):
    for argv in commands(code):
        overrides, rest = _split_overrides(argv)
        args = _parser().parse_args(rest)
        assert not overrides or args.command in ("train", "sweep"), (line, argv)
        config = getattr(args, "config", None)
        if config and config.startswith("experiments/"):
            assert (REPO / config).is_file(), (line, config)
