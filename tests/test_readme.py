"""CI must run exactly what the README tells a newcomer to run."""

import re

from tests.conftest import REPO


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    command = re.search(r'^TEST_COMMAND="(.*)"$', ci, re.MULTILINE).group(1)
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    assert len(blocks) >= 2, "README must start with two set-up commands"
    assert blocks[1] == command
    assert blocks[0].endswith("s2flash demo")
