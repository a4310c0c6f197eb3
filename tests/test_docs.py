"""The docs that are generated from data are up to date; the README's commands are the ones CI runs."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_supported_ops_table_is_generated_from_the_backend_data():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_supported_ops.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = readme[3].strip()
    assert "pytest" in test_cmd and test_cmd in ci
