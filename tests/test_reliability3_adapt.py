"""Issue 24, round three: an adapt run is never silently replaced, ``--run`` never silently
overrides a flag, and a full disk mid-write is one line that keeps the previous complete file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memdec.files import atomic_write, atomic_write_text

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- a full disk mid-write ---------------------------------------------------------------------


def run_with_file_size_limit(limit: int, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE,
    SIGXFSZ ignored): a write past it fails with EFBIG, as a write to a full disk fails with ENOSPC."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old and complete\n")
    proc = run_with_file_size_limit(64, f"""
        from memdec.files import atomic_write_text
        try:
            atomic_write_text({str(target)!r}, "x" * 1000)
        except OSError as exc:
            print(exc.errno, exc.filename)
    """, tmp_path)
    errno_, filename = proc.stdout.split()
    assert (int(errno_), filename) == (27, str(target))  # EFBIG, the target named (not the temporary file)
    assert target.read_text() == "old and complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_a_full_disk_in_a_command_is_one_line_and_the_previous_files_stay(tmp_path):
    """`memdec tasks general` rewrites its task files; the second call's files do not fit: one line on
    stderr naming the file, exit code 1, the first call's complete files unchanged."""
    out = tmp_path / "tasks"
    cmd = ["tasks", "general", "--out", str(out), "--n-items", "3"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.run([sys.executable, "-m", "memdec.cli", *cmd], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    jsonl = out / "memdec_general.jsonl"
    limit = jsonl.stat().st_size + 10  # the first call's file fits; one with 40 items does not
    proc = run_with_file_size_limit(limit, f"""
        from memdec.cli import main
        sys.exit(main({cmd[:-1] + ["40"]!r}))
    """, tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"memdec: error: {jsonl}: File too large (EFBIG)")
    assert "previous complete file or step is kept" in lines[0] and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The power-loss half: the temporary file's bytes reach the disk before it is renamed, and the
    rename before atomic_write returns (os.fsync watched, not replaced)."""
    synced, real_fsync = [], os.fsync

    def watching_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path.name, (tmp_path / "a.txt").exists()))
        return real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name an fd")
    monkeypatch.setattr(os, "fsync", watching_fsync)
    atomic_write(tmp_path / "a.txt", lambda p: p.write_text("hello"))
    assert synced == [(".a.txt.tmp", False), (tmp_path.name, True)]
    assert (tmp_path / "a.txt").read_text() == "hello"
