"""``python -m fastsgd``: version, help, info, progress output in logs, the bench plot."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import fastsgd
from fastsgd import _bench
from fastsgd.__main__ import main
from fastsgd._progress import Progress


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the command line in a fresh interpreter with stdout and stderr captured (no terminal)."""
    return subprocess.run([sys.executable, "-m", "fastsgd", *args], capture_output=True, text=True,
                          env=env, cwd=os.path.expanduser("~"), timeout=600)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastsgd {fastsgd.__version__}"


@pytest.mark.parametrize("command", [[], ["demo"], ["info"], ["bench"]])
def test_help_shows_every_default_and_no_markup(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert options
    for line in text.splitlines():
        if line.startswith("  --") and not line.startswith(("  --help", "  --version")):
            option = line.split()[0].rstrip(",")
            block = text[text.index(line):].split("\n  -")[0]
            assert "(default:" in block, f"{option} shows no default"


def test_info_says_plainly_what_cuda_can_do():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CUDA:"))
    cuda = fastsgd.cuda_info()
    if not cuda["built"]:
        assert "without CUDA kernels" in line
    elif not cuda["device_count"]:
        assert "no usable GPU on this machine" in line


def test_progress_is_plain_lines_without_a_terminal():
    stream = io.StringIO()
    progress = Progress(3, stream)
    progress.update(1, "one")
    progress.update(3, "three", milestone=True)
    progress.clear()
    assert stream.getvalue() == "  3/3 three\n"


def test_progress_redraws_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(2, stream)
    progress.update(1, "a")
    progress.update(2, "b")
    progress.clear()
    assert stream.getvalue().count("\r") >= 3
    assert "\n" not in stream.getvalue()


def test_demo_in_a_log_has_no_carriage_returns():
    proc = _cli("demo", "--epochs", "1", "--batch", "512")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    assert "NumPy reference" in proc.stdout
    for peer, module in (("torch", "torch"), ("Keras", "keras")):
        try:
            __import__(module)
        except ImportError:
            continue
        assert any(line.strip().startswith(peer) for line in proc.stdout.splitlines()), proc.stdout


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot is drawn only when matplotlib is installed")
    rows = _bench.run(quick=True, rounds=1, budget_s=0.001)
    path = tmp_path / "bench.png"
    assert _bench.write_plot(str(path), rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_matplotlib_says_so(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastsgd import _bench\n"
            "print(_bench.write_plot(sys.argv[1], [{'workload': 'w', 'config': 'c', 'fastsgd': 1.0, 'numpy': 2.0}]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert not (tmp_path / "x.png").exists()
