"""`segmentation data`: its help, synth from the command line, one-line errors."""

from __future__ import annotations

from segmentation import cli
from segmentation.data.commands import main


def test_data_commands_answer_with_help_or_one_error_line(capsys):
    assert cli.main(["data"]) == 2  # no data command: its help, as a usage error
    assert "synth" in capsys.readouterr().out
    assert cli.main(["data", "check", "/nonexistent/dataset"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error: ") and "/nonexistent/dataset" in out and "Traceback" not in out
    assert cli.main(["data", "synth", "--out", "/nonexistent/dataset", "--seed", "-1"]) == 1
    assert capsys.readouterr().err == "error: --seed -1: must be an integer >= 0\n"


def test_synth_command_writes_and_refuses_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["data", "synth", "--out", str(out), "--cases", "2", "--test-cases", "1",
            "--shape", "20", "20", "16", "--seed", "4"]
    assert main(argv) == 0
    assert "wrote 2 training case(s)" in capsys.readouterr().out
    assert len(list((out / "imagesTr").iterdir())) == 2
    assert main(argv) == 1
    assert "not empty; use --force" in capsys.readouterr().err
    (out / "splits.json").write_text("[]")  # stale split of the old cases
    (out / "keep.txt").write_text("mine")
    assert main([*argv[:4], "--cases", "3", "--test-cases", "0", "--shape", "20", "20", "16",
                 "--force"]) == 0
    assert len(list((out / "imagesTr").iterdir())) == 3
    assert not (out / "imagesTs").exists() and not (out / "splits.json").exists()
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--dims", "2",
                 "--shape", "20", "20", "16"]) == 1
    assert capsys.readouterr().err == "error: --shape 20 20 16: has 3 entries but dims=2\n"
    assert not (tmp_path / "bad").exists()


def test_synth_command_refuses_a_negative_seed_before_touching_the_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["data", "synth", "--out", str(out), "--seed", "-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: --seed -1: must be an integer >= 0\n"
    assert not out.exists()
    existing = tmp_path / "existing"
    argv = ["data", "synth", "--out", str(existing), "--cases", "1", "--test-cases", "0",
            "--shape", "16", "16", "16"]
    assert main(argv) == 0
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    assert main([*argv, "--seed", "-1", "--force"]) == 1  # --force removes nothing either
    assert "--seed -1" in capsys.readouterr().err
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before
