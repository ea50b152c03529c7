"""The README cannot drift from the code: every ```python block runs, every command is accepted.

Python blocks run in order in one namespace (as a reader pastes them into one session), in a
temporary folder, offline, on the CPU. Shell blocks are not executed (they install packages):
the test command must be the one `.ci/run` runs, and every `python -m dlx ...` command must be
accepted by dlx's command line (parsed by the real parser; the work itself is stubbed out).
"""

from __future__ import annotations

import linecache
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(*langs: str) -> list[tuple[int, str]]:
    """(line number, body) of each fenced block whose language is one of ``langs``."""
    return [(README.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(README) if m.group(1) in langs]


PYTHON = blocks("python")
SHELL = blocks("bash", "sh", "shell", "console")


def commands() -> list[str]:
    """Every command of the shell blocks, ``&&`` chains split, comments and prompts dropped."""
    out = []
    for _, body in SHELL:
        for line in body.splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ").strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def test_the_readme_has_code():
    assert PYTHON, "no ```python block in README.md"
    assert SHELL, "no shell block in README.md"


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (traces, sweep folders)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__readme__"}
    for line, body in PYTHON:
        name = f"README.md, python block at line {line}"
        linecache.cache[name] = (len(body), None, body.splitlines(True), name)  # tracebacks show the line
        code = compile(body, name, "exec")
        exec(code, namespace)  # noqa: S102 - the README's own code, which is the point


def test_the_test_command_is_what_ci_runs():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_cmd = next(ln for ln in ci if ln.startswith("pip install"))
    readme_cmds = [ln.strip() for _, body in SHELL for ln in body.splitlines() if ln.strip().startswith("pip install")]
    assert ci_cmd in readme_cmds, f".ci/run runs {ci_cmd!r}; the README shows {readme_cmds}"
    assert any("python -m pytest" in ln for ln in readme_cmds)


def test_pip_commands_name_extras_that_exist():
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))
    for cmd in commands():
        if cmd.startswith("pip install"):
            for target in shlex.split(cmd)[2:]:
                m = re.fullmatch(r"\.\[([\w,-]+)\]", target)
                if m:
                    assert set(m.group(1).split(",")) <= extras, (cmd, extras)
                else:
                    assert target in (".", "-e") or re.fullmatch(r"[\w.-]+(==[\w.+-]+)?", target), cmd


def _dlx_argv(cmd: str) -> list[str] | None:
    """The arguments after ``-m dlx`` of a ``python -m dlx`` or ``accelerate launch ... -m dlx`` command."""
    words = shlex.split(cmd)
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "dlx":
            if words[0] in ("python", "python3") or words[:2] == ["accelerate", "launch"]:
                return words[i + 2 :]
    return None


@pytest.mark.parametrize("cmd", [c for c in commands() if _dlx_argv(c) is not None] or ["python -m dlx demo"])
def test_dlx_commands_are_accepted_by_the_cli(cmd, monkeypatch):
    import dlx.__main__ as cli

    seen = []
    monkeypatch.setattr(cli, "_demo", lambda args, parser: seen.append(("demo", args)) or 0)
    monkeypatch.setattr(cli, "_sweep", lambda args, parser: seen.append(("sweep", args)) or 0)
    argv = _dlx_argv(cmd)
    assert cli.main(argv) == 0, cmd  # argparse exits with status 2 on anything it does not accept
    assert argv and seen and seen[0][0] == argv[0], cmd


def test_the_two_commands_are_there():
    cmds = commands()
    assert "python -m dlx demo" in cmds or any(c.startswith("python -m dlx demo") for c in cmds)
    assert "python -m pytest -q" in cmds


@pytest.mark.parametrize("line, body", blocks("yaml", "yml") or [(0, "")], ids=lambda v: str(v)[:20])
def test_yaml_blocks_are_valid_sweep_specs(line, body, tmp_path):
    if not body:
        pytest.skip("no yaml block in README.md")
    from dlx.sweeps.yaml_spec import read_yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(body)
    kw = read_yaml(spec)  # unknown keys, a bad model name or malformed configs raise DlxError
    assert kw["pipe"] and kw.get("prompts")


def test_images_and_files_the_readme_links_exist():
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert links, "the README shows no picture"
    for target in links:
        assert (ROOT / target).is_file(), target
    for path in re.findall(r"`((?:notebooks|docs|bench)/[\w./-]+\.(?:ipynb|md|py))`", README):
        assert (ROOT / path).is_file(), path


def test_every_notebook_is_listed_and_every_listed_one_exists():
    listed = set(re.findall(r"`(\d\d_\w+\.ipynb)`", README))
    present = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert listed == present, f"listed only: {sorted(listed - present)}; not listed: {sorted(present - listed)}"
