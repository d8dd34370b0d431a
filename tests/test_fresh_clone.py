"""The card's command as a new user runs it, on a fresh copy of the repository: it trains and writes where the
README says, runs again after a finished run, and leaves every tracked file (the shipped runs) as it was."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--max-steps", "2", "--epochs", "1", "--eval-samples", "2", "--eval-limit", "4", "--curve-images", "4",
         "--device", "cpu", "--no-compile", "--no-download"]


def fresh_copy(dest):
    """The repository's files as a clone would have them (tracked, and new files git does not ignore), committed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in [["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]]:
        subprocess.run(git + command, cwd=dest, check=True, capture_output=True)


def test_the_cards_command_runs_twice_and_changes_no_tracked_file(cifar_bin_dir, tmp_path):
    repo = tmp_path / "repo"
    fresh_copy(repo)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # the second run follows a finished run
        proc = subprocess.run([sys.executable, "model03.py", "--data-dir", str(cifar_bin_dir), *SMALL], cwd=repo,
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished run: starting afresh" in proc.stderr
    for grid in ["imgs", "recs", "samples", "samples_var"]:
        assert (repo / "runs" / f"model03_{grid}.png").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert status.stdout == "", f"a user's run changed files of the repository:\n{status.stdout}"
