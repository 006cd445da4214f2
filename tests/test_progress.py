"""Progress output: a tqdm bar on a terminal, plain periodic log lines in a job log file."""
import io
import re

from smft_dist.train.metrics import MetricLogger


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_logger(tmp_path, stream, steps=5, start=0, **kw) -> str:
    logger = MetricLogger(tmp_path, steps, start, enabled=True, desc="finetune/sparse_memory", stream=stream, **kw)
    for step in range(start + 1, steps + 1):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0 * step})
    logger.close()
    return stream.getvalue()


def test_log_file_gets_one_plain_line_per_interval(tmp_path):
    text = run_logger(tmp_path, io.StringIO(), progress_every_s=0)
    assert "\r" not in text
    lines = text.splitlines()
    assert [int(re.search(r"step (\d+)/5 ", line).group(1)) for line in lines] == [1, 2, 3, 4, 5]
    assert lines[1].startswith("finetune/sparse_memory step 2/5 (40%) loss 0.5000 lr 1.0e-03 tokens/s 200.0 elapsed ")
    assert "eta " in lines[1] and "eta " not in lines[-1]


def test_long_interval_logs_first_and_last_step_only(tmp_path):
    text = run_logger(tmp_path, io.StringIO(), steps=50, start=20, progress_every_s=3600)
    assert [re.search(r"step (\d+)/50", line).group(1) for line in text.splitlines()] == ["21", "50"]


def test_terminal_gets_the_tqdm_bar_and_no_lines(tmp_path):
    text = run_logger(tmp_path, Terminal(), progress_every_s=0)
    assert "\r" in text and "5/5" in text and "step 5/5" not in text


def test_progress_off_prints_nothing(tmp_path):
    assert run_logger(tmp_path, io.StringIO(), progress=False, progress_every_s=0) == ""
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
