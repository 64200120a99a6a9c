"""CI must run exactly what the README tells a newcomer to run: its two set-up commands, the main
job in quick mode."""

import re
import subprocess

import pytest

from tests.conftest import REPO


def ci_command(name: str) -> str:
    return re.search(rf'^{name}="(.*)"$', (REPO / ".ci/run").read_text(), re.MULTILINE).group(1)


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    assert len(blocks) >= 2, "README must start with two set-up commands"
    main_job, tests = blocks[:2]
    assert tests == ci_command("TEST_COMMAND")
    assert main_job.endswith("s2flash demo")
    assert ci_command("MAIN_COMMAND") == main_job + " --quick"


@pytest.mark.parametrize("tests, main_job, expected", [("exit 0", "exit 0", 0), ("exit 5", "exit 0", 1),
                                                      ("exit 3", "exit 0", 3), ("exit 0", "exit 4", 4)])
def test_ci_fails_when_either_command_fails(tmp_path, tests, main_job, expected):
    """.ci/run with its two commands replaced by stand-ins: a pass only when both pass, pytest's
    "no tests collected" a failure, and the main job run even though it comes second."""
    script = (REPO / ".ci/run").read_text()
    script = re.sub(r'^TEST_COMMAND=".*"$', f'TEST_COMMAND="{tests}"', script, flags=re.MULTILINE)
    script = re.sub(r'^MAIN_COMMAND=".*"$', f'MAIN_COMMAND="touch main-job-ran; {main_job}"', script,
                    flags=re.MULTILINE)
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci/run").write_text(script)
    assert subprocess.run(["bash", str(tmp_path / ".ci/run")], capture_output=True).returncode == expected
    assert (tmp_path / "main-job-ran").exists() == (tests == "exit 0")
