"""A first hour without friction: `--help` describes every option with its default, long commands print results as
they come, and scripts/setup.sh installs what it says."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from cogvx_core import cli
from cogvx_core.models import TINY_MODEL, builtin_models

ROOT = Path(__file__).resolve().parents[2]


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(command path, parser, action) for every option of `parser` and of its sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, path + (name,))
        elif action.option_strings and action.dest != "help" and action.help is not argparse.SUPPRESS:
            yield path, parser, action


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_describes_every_option_with_its_default(command):
    top = cli.build_parser(command)
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    options = list(_options(sub.choices[command], (command,)))
    assert options
    for path, parser, action in options:
        assert action.help and action.help.strip(), (path, action.option_strings)
        default = action.default
        if default is None or default is False or default == []:
            continue  # nothing to show (the help says what an unset option means)
        shown = parser.formatter_class("cogvx")._get_help_string(action) % {"default": default}
        assert "default" in shown, (path, action.option_strings, shown)


def test_help_text_shows_the_defaults():
    top = cli.build_parser("generate")
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    text = " ".join(sub.choices["generate"].format_help().split())
    assert "sampling steps (default: 50)" in text and "guidance scale (default: 6.0)" in text


@pytest.mark.skipif(not builtin_models(), reason=f"the built-in model is not in this checkout ({TINY_MODEL})")
def test_eval_prints_each_row_as_its_setting_finishes(monkeypatch, capsys):
    import cogvx_core.recipes.quality as quality

    real, printed_before = quality.adherence, []

    def adherence(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)  # what the user has seen when this setting starts
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "adherence", adherence)
    assert cli.main(["eval", "--prompts", "1", "--steps", "1,2", "--samplers", "ddim", "--vae-clips", "0",
                     "--batch-size", "1"]) == 0
    rest = capsys.readouterr().out
    assert len(printed_before) == 2
    assert printed_before[0].startswith("| sampler | steps |")  # the header before the first setting runs
    assert "| ddim | 1 |" in printed_before[1]  # the first row before the second setting runs
    assert "| ddim | 2 |" in rest


def _setup_with(tmp_path, torch_installed: bool) -> tuple[str, list[str]]:
    """Runs scripts/setup.sh with a stand-in Python that records every call instead of installing anything."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [ "$1" = "-c" ]; then {'echo 2.13.0' if torch_installed else 'exit 1'}; fi
""")
    stub.chmod(0o755)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": str(stub)})
    assert run.returncode == 0, run.stderr
    return run.stdout, [line for line in log.read_text().splitlines() if not line.startswith("-c")]


def test_setup_installs_the_cpu_torch_only_when_none_is_there(tmp_path):
    said, calls = _setup_with(tmp_path, torch_installed=False)
    # exactly the pin, from the configured package sources (no other index: only PyPI is reachable here)
    assert calls == ["-m pip install -q torch==2.13.0", "-m pip install -q -e .[test]"]
    assert "installing torch 2.13.0 (CPU build)" in said and "test extra" in said

    again = tmp_path / "again"
    again.mkdir()
    said, calls = _setup_with(again, torch_installed=True)
    assert calls == ["-m pip install -q -e .[test]"]  # a torch that is there is kept (a CUDA build stays)
    assert "torch 2.13.0 is installed; keeping it" in said
