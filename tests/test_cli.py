"""The command's dispatch: every subcommand is listed, and only the one that runs is imported."""

from __future__ import annotations

import subprocess
import sys

from healthivert.cli import COMMANDS


def _python(code: str) -> str:
    """Stdout of ``code`` run by a fresh interpreter (this one has imported everything already)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_help_lists_every_command_without_importing_torch() -> None:
    out = _python("import sys\nfrom healthivert import cli\ntry:\n    cli.main(['--help'])\n"
                  "except SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    assert all(name in out for name in COMMANDS)
    assert out.rstrip().endswith("torch loaded: False")


def test_a_command_imports_its_own_module_only() -> None:
    out = _python("import sys\nfrom healthivert import cli\ncli.build_parser(['rhlv'])\n"
                  "print([module for module, _ in cli.COMMANDS.values() if module in sys.modules])")
    assert out.strip() == "['healthivert.stages.rhlv']"
