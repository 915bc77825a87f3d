"""fcnseg.progress: tqdm's bar on a terminal, plain whole lines (bounded, never redrawn) everywhere else."""
from __future__ import annotations

import io

from fcnseg.progress import PlainProgress, format_duration, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_come_at_most_every_interval_with_rate_eta_and_postfix():
    clock, out = FakeClock(), io.StringIO()
    bar = PlainProgress(total=1000, desc="epoch 1/3", unit="step", file=out, interval=10.0, clock=clock)
    for step in range(1000):
        clock.now = (step + 1) / 10  # 10 steps a second for 100 s
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", lr="1.00e-02", img_s="40.0")
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 10 <= len(lines) <= 11  # one per 10 s of 100 s, plus the closing one; not one per step
    first = lines[0]
    assert first.startswith("epoch 1/3: 100/1000 step (10%)"), first
    assert "10 step/s" in first and "elapsed 0:10" in first and "ETA 1:30" in first
    assert "loss=0.010 lr=1.00e-02 img_s=40.0" in first
    assert lines[-1].startswith("epoch 1/3: 1000/1000 step (100%)") and "ETA 0:00" in lines[-1]


def test_a_short_loop_writes_one_closing_line_and_counts_from_initial():
    clock, out = FakeClock(), io.StringIO()
    with PlainProgress(total=10, initial=4, desc="epoch 2/2", unit="step", file=out, clock=clock) as bar:
        for _ in range(6):
            clock.now += 0.5
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines == ["epoch 2/2: 10/10 step (100%) | 2 step/s, elapsed 0:03, ETA 0:00"]


def test_no_closing_line_repeats_the_last_one():
    clock, out = FakeClock(), io.StringIO()
    bar = PlainProgress(total=2, unit="step", file=out, interval=10.0, clock=clock)
    clock.now = 11.0
    bar.update(2)
    bar.close()
    assert len(out.getvalue().splitlines()) == 1


def test_wrapping_an_iterable_yields_its_items_and_closes_at_the_end():
    out = io.StringIO()
    assert list(progress_bar(range(5), desc="eval val", unit="batch", file=out)) == list(range(5))
    assert out.getvalue().startswith("eval val: 5/5 batch (100%)") and out.getvalue().count("\n") == 1


def test_bytes_are_scaled_and_an_unknown_total_has_no_eta():
    clock, out = FakeClock(), io.StringIO()
    bar = PlainProgress(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="x.tar", file=out, clock=clock)
    clock.now = 2.0
    bar.update(3 * 1024 * 1024)
    bar.close()
    line = out.getvalue().strip()
    assert line.startswith("x.tar: 3MiB |") and "1.5MiB/s" in line and "ETA" not in line


def test_a_terminal_gets_tqdm_and_disable_silences_both_forms():
    from tqdm import tqdm

    terminal = Terminal()
    bar = progress_bar(total=3, desc="t", file=terminal)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue()  # the bar redraws in place, as a terminal wants
    for stream in (Terminal(), io.StringIO()):
        quiet = progress_bar(range(3), desc="q", file=stream, disable=True)
        assert list(quiet) == [0, 1, 2]
        quiet.close()
        assert stream.getvalue() == ""


def test_write_prints_a_message_line(capsys):
    bar = progress_bar(total=2, file=io.StringIO())
    bar.write("failed: x.jpg")
    assert capsys.readouterr().out == "failed: x.jpg\n"


def test_format_duration():
    assert format_duration(0) == "0:00" and format_duration(75.4) == "1:15" and format_duration(3725) == "1:02:05"
