"""``zimagekit plot``: reads the metrics.csv a run writes (through MetricLog itself), draws the
moving mean it promises (checked by hand), and refuses a metric a run never logged in one line."""

from pathlib import Path

import pytest
from PIL import Image

from zimagekit.cli import main
from zimagekit.trainer.logs import MetricLog, moving_mean, read_metrics


def test_the_moving_mean_by_hand():
    assert moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_mean([2.0, 4.0, 6.0], 5) == [2.0, 3.0, 4.0]
    assert moving_mean([2.0, 4.0], 1) == [2.0, 4.0]
    nan = float("nan")
    assert moving_mean([1.0, nan, 3.0, 5.0], 2)[3] == 4.0  # the NaN spoils only its own windows


def write_run(run_dir: Path, rows):
    run_dir.mkdir()
    log = MetricLog(run_dir, ["step", "loss/student", "reward/mean"], resumed_step=0)
    for row in rows:
        log.write(row)
    log.close()


def test_plot_reads_runs_and_writes_a_png(tmp_path, capsys):
    write_run(tmp_path / "a", [{"step": 10, "loss/student": 0.5, "reward/mean": 0.25},
                               {"step": 20, "loss/student": 0.25, "reward/mean": None}])
    write_run(tmp_path / "b", [{"step": 10, "loss/student": 1.0, "reward/mean": 0.75}])
    assert read_metrics(tmp_path / "a") == {"loss/student": [(10, 0.5), (20, 0.25)], "reward/mean": [(10, 0.25)]}
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "loss/student",
                 "--metric", "reward/mean", "--window", "2", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 2 * im.height  # two panels side by side
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--metric", "reward/std"], "logged no reward/std; it has loss/student, reward/mean"),
    (["--metric", "loss/student", "--window", "0"], "--window must be at least 1"),
    (["--metric", "loss/student", "--label", "x", "--label", "y"], "2 labels for 1 runs"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    write_run(tmp_path / "a", [{"step": 10, "loss/student": 0.5, "reward/mean": 0.25}])
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()
    assert main(["plot", str(tmp_path / "missing"), "--metric", "x", "-o", str(out)]) == 2
    assert "no metrics.csv" in capsys.readouterr().err
    with (tmp_path / "a" / "metrics.csv").open("a") as fh:
        fh.write("20,oops,0.5\n")
    assert main(["plot", str(tmp_path / "a"), "--metric", "loss/student", "-o", str(out)]) == 2
    assert "metrics.csv:3: not a metrics row" in capsys.readouterr().err
