"""`moe-launch schedule`: the printed timeline and bubble statistics, the PNG, and bad input."""

import subprocess
import sys

from launcher.cli import main


def test_prints_one_row_per_rank_with_step_time_and_bubbles(capsys):
    assert main(["schedule", "--schedule", "dualpipev", "--pp", "4", "--microbatches", "10"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("rank ") and "|" in line]
    assert len(rows) == 4
    assert rows[0].startswith("rank 0 |F0F1F2F3F4F5F6f0b0w0")  # 7 warm-up forwards, then stage 7's
    assert len({len(r) for r in rows}) == 1  # one column per time unit (x2 characters), same width
    assert "step time 66;" in out
    assert "  rank 3: 6 (9.1%)" in out
    assert "published bubble (PP/2-1)(F&B+B-3W), PP=8 = 6" in out


def test_times_change_the_timeline(capsys):
    argv = ["schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8"]
    assert main([*argv, "--f", "2", "--b", "1", "--w", "1", "--scale", "1"]) == 0
    out = capsys.readouterr().out
    assert "step time 44;" in out and "published bubble (PP-1)(F+B) = 12" in out
    assert "rank 3 |......F0BWF1BWF2BW" in out


def test_png_is_drawn(tmp_path, capsys):
    png = tmp_path / "dualpipe.png"
    argv = ["schedule", "--schedule", "dualpipe", "--pp", "4", "--microbatches", "8", "--fb", "2.5", "--png", str(png)]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_bad_sizes_exit_2_with_one_line():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "schedule",
            "--schedule",
            "dualpipe",
            "--pp",
            "3",
            "--microbatches",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr == "moe-launch: error: pp=3: dualpipe needs an even pp >= 2\n"
    assert out.stdout == ""


def test_unknown_schedule_and_negative_time_exit_2(capsys):
    try:
        main(["schedule", "--schedule", "pipedream", "--pp", "2", "--microbatches", "4"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "invalid choice: 'pipedream'" in capsys.readouterr().err
    assert main(["schedule", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--w", "-1"]) == 2
    assert capsys.readouterr().err == "moe-launch: error: w=-1.0: durations must be >= 0\n"


def test_message_costs_and_receives_posted_ahead(capsys):
    """1F1B pp=2: receives posted with their batch pay part of each 0.3 rendezvous; posted one
    compute action ahead, the rendezvous runs while the rank computes and the step is shorter."""
    argv = ["schedule", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4"]
    argv += ["--comm", "0.05", "--send", "0.05", "--recv", "0.3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "comm=0.05 send=0.05 recv=0.3; receives posted with their batch\n" in out
    assert "step time 15.55;" in out
    assert main([*argv, "--recv-lookahead", "1"]) == 0
    out = capsys.readouterr().out
    assert "comm=0.05 send=0.05 recv=0.3; receives posted 1 compute action ahead\n" in out
    assert "step time 15.25;" in out
    assert main([*argv[:7], "--recv-lookahead", "2"]) == 0  # free messages: posting early changes nothing
    out = capsys.readouterr().out
    assert "comm=0 send=0 recv=0; receives posted 2 compute actions ahead\n" in out and "step time 15;" in out


def test_bad_message_costs_exit_2_with_one_line(capsys):
    argv = ["schedule", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4"]
    for flags, error in [
        (["--recv-lookahead", "-1"], "--recv-lookahead=-1: must be >= 0 (compute actions ahead)"),
        (["--send", "-0.5"], "send=-0.5: durations must be >= 0"),
        (["--recv", "nan"], "recv=nan: durations must be finite numbers"),
        (["--comm", "inf"], "comm=inf: durations must be finite numbers"),
    ]:
        assert main([*argv, *flags]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"moe-launch: error: {error}\n" and captured.out == ""


def test_schedule_command_does_not_import_torch():
    code = "import sys; from launcher.cli import main; main(['schedule', '--schedule', 'zb1p', '--pp', '2', "
    code += "'--microbatches', '4', '--recv', '0.2', '--recv-lookahead', '1']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "False", out.stderr[-2000:]
