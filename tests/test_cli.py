"""The real `stillhouse` command: bad input gives one clear line and exit code 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["init", "check", "prep", "adapt", "label", "train", "eval", "redteam", "export", "serve", "monitor",
            "run", "demo", "status"]


def cli(*args, cwd=None):
    env = {**os.environ, "STILLHOUSE_QUIET": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "stillhouse", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def assert_clean_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_help_lists_every_command_with_examples():
    p = cli("--help")
    assert p.returncode == 0
    for c in COMMANDS:
        assert c in p.stdout
        sub = cli(c, "--help")
        assert sub.returncode == 0 and "Example" in sub.stdout, (c, sub.stdout)


def test_missing_config(tmp_path):
    assert_clean_error(cli("-w", str(tmp_path), "check"), "stillhouse.yaml not found", "init")


def test_init_then_unknown_key_and_bad_value(tmp_path):
    assert cli("-w", str(tmp_path), "init").returncode == 0
    text = (tmp_path / "stillhouse.yaml").read_text()
    assert "teacher:" in text and "# " in text
    assert_clean_error(cli("-w", str(tmp_path), "init"), "already exists", "--force")
    assert_clean_error(cli("-w", str(tmp_path), "check", "--set", "train.stepz=3"), "train.stepz", "steps")
    assert_clean_error(cli("-w", str(tmp_path), "label", "--set", "label.topk=-1"), "label.topk")
    (tmp_path / "stillhouse.yaml").write_text("teacher: [unclosed\n")
    assert_clean_error(cli("-w", str(tmp_path), "train"), "not valid YAML")


def test_missing_model_path(tmp_path):
    cli("-w", str(tmp_path), "init")
    assert_clean_error(cli("-w", str(tmp_path), "check", "--set", "teacher.model=/nonexistent/teacher"),
                       "/nonexistent/teacher", "does not exist")


def test_gguf_hash_mismatch(tmp_path):
    cli("-w", str(tmp_path), "init")
    assert_clean_error(cli("-w", str(tmp_path), "check", "--set", "teacher.sha256=" + "ab" * 32), "sha256", "does not match")


def test_unwritable_workspace(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_clean_error(cli("-w", str(blocker / "ws"), "init"), "cannot write")


def test_stage_before_its_inputs(tmp_path):
    cli("-w", str(tmp_path), "init")
    assert_clean_error(cli("-w", str(tmp_path), "train"), "stillhouse", "label")


def test_status_on_empty_workspace(tmp_path):
    p = cli("-w", str(tmp_path), "status")
    assert p.returncode == 0 and "not run" in p.stdout + p.stderr
