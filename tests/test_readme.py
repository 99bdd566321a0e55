"""The README's commands still parse: every ``rlhf-lightning ...`` line of its code blocks goes through the command's
own argument parser (LightningCLI for ``fit``/``validate``, jsonargparse for the others), which stops right after
parsing. A renamed flag, subcommand or config key fails here instead of in a newcomer's shell.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from rlhf_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The ``rlhf-lightning`` command lines of README.md's fenced code blocks (continuation lines joined)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("rlhf-lightning "):
                commands.append(line.strip())
    return commands


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a command line has been parsed: nothing runs."""


def test_readme_has_commands() -> None:
    commands = readme_commands()
    assert len(commands) > 10
    assert "rlhf-lightning pipeline --config configs/pipeline.yaml" in commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parse_args = ArgumentParser.parse_args
    depth = [0]

    def parse_then_stop(self, *args, **kwargs):
        depth[0] += (
            1  # jsonargparse parses nested class arguments with inner parse_args calls: let those return
        )
        try:
            parsed = parse_args(self, *args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0]:
            return parsed
        raise _Parsed(parsed)

    monkeypatch.setattr(ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(REPO)  # the commands name configs/... relative to the repository root
    argv = shlex.split(re.sub(r"<[^>]+>", "placeholder.ckpt", command), comments=True)
    assert argv[0] == "rlhf-lightning"
    with pytest.raises((_Parsed, SystemExit)) as stopped:  # --print_config prints and exits 0 after parsing
        main(argv[1:])
    assert stopped.type is _Parsed or stopped.value.code == 0


def readme_scripts() -> list[str]:
    """The repository scripts the README tells a reader to run: named in its code blocks, or in inline code that
    starts with ``python`` (a script named only as the source of a figure is not a command)."""
    text = (REPO / "README.md").read_text()
    blocks = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M))
    named = re.findall(r"(?:^|\s)((?:scripts|benchmarks)/[\w./-]*\w)", blocks, flags=re.M)
    named += re.findall(r"`python ((?:scripts|benchmarks)/[\w./-]*\w)", text)
    return sorted(set(named))


def test_readme_scripts_exist_and_a_test_runs_each() -> None:
    """Commands other than ``rlhf-lightning ...`` name a script that exists and that a test runs (``scripts/test``
    is the test command itself)."""
    scripts = readme_scripts()
    assert {"scripts/run_notebook.py", "benchmarks/vs_trl.py", "benchmarks/smollm2_pipeline.py"} <= set(
        scripts
    )
    tests = "".join(
        path.read_text() for path in (REPO / "tests").glob("test_*.py") if path.name != "test_readme.py"
    )
    for script in scripts:
        assert (REPO / script).is_file(), f"README names {script}, which does not exist"
        if script != "scripts/test":
            assert Path(script).name in tests, f"no test runs {script}, which the README tells readers to run"
