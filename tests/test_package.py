"""Packaging: the two set-up files agree, the CLI works, import stays light, the CI runs the README."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    from packaging.requirements import Requirement

    r = Requirement(req)
    return f"{r.name.lower()}{str(r.specifier)}"


def test_environment_yml_and_pyproject_agree():
    import tomllib

    import yaml

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip = [p for p in pip if not p.startswith("-e")]
    assert sorted(map(_norm, deps)) == sorted(map(_norm, pip))


def test_torch_requirement_admits_the_cpu_build_ci_installs():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if d.startswith("torch"))
    assert torch_req.specifier.contains("2.13.0"), "a requirement that excludes 2.13.0 would pull a CUDA build"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    test_cmd = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    assert test_cmd.strip() in [line.strip() for line in ci.splitlines()]


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "dlx", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_import_dlx_is_light():
    # With torch imported, `import dlx` loads dlx's own modules and nothing else: diffusers,
    # transformers, pandas, matplotlib and PIL wait until used. (How long it takes is measured by
    # bench/import_time.py, not asserted here.)
    code = ("import sys, torch; before = set(sys.modules); import dlx; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['dlx']"


def test_public_api_is_small_and_resolves():
    import dlx

    assert len(dlx.__all__) <= 25
    for name in dlx.__all__:
        assert getattr(dlx, name) is not None, name


def test_demo_records_and_prints_the_per_step_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dlx", "demo", "--record", "--model", "tiny", "--steps", "4", "--cutoff", "0.5",
         "--out", str(tmp_path)],
        capture_output=True, text=True, check=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    assert "cond_uncond_cos" in out and "stop_reason='completed'" in out and "nfe/sample=[6.0]" in out
    import dlx

    assert len(dlx.Trace.load(tmp_path / "trace.safetensors")) == 4


def test_recording_demo_runs_on_the_embedded_model():
    # The main job (the cutoff study) is tested in tests/test_cli.py; this is the single-run option.
    out = subprocess.run([sys.executable, "-m", "dlx", "demo", "--record", "--steps", "6"], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert "embedded shapes model" in out and "nfe/sample=[12.0]" in out
    assert "NaN" not in out.split("x0_std")[1].splitlines()[1], "x0 of the first step (σ = ∞) must be finite"
