from convert.cli import run


def test_help_exits_zero(runner):
    out = runner("--help")
    assert out.exit_code == 0
    assert "to-linear" in out.stdout
    assert run(["--version"]) == 0
