"""The `aepo` console script: instant help, every command reachable."""

import subprocess
import sys

from services.cli.main import COMMANDS


def test_help_imports_neither_torch_nor_ray():
    code = (
        "import sys; from services.cli.main import build_parser; build_parser().format_help();"
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_has_help_and_an_importable_target():
    import importlib

    for cmd in COMMANDS:
        assert cmd.help
        module, func = cmd.target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_no_command_prints_usage_and_fails():
    from services.cli.main import main

    assert main([]) == 2


def test_check_config_reports_a_bad_file(tmp_path, capsys):
    from services.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: {type: nope}\n")
    assert main(["check-config", str(bad)]) == 1
    assert "nope" in capsys.readouterr().out
