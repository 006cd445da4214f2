"""`smft-stream` on 2 ranks (torchrun): 3 chunks of new facts learned in sequence, each evaluated
and logged; a stream killed during the second chunk resumes there and ends bitwise where an
uninterrupted stream ends."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import PY, ROOT, checkpoint_tensors, latest_dir, run_cli

pytestmark = pytest.mark.slow

TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launchers/stream.py"]


@pytest.fixture(scope="module")
def chunks(tiny_data, tmp_path_factory):
    """3 chunk folders of 2 new facts each (their paraphrases, grouped) with the facts' qa.jsonl."""
    from smft_dist.data.mds import write_mds
    from smft_dist.data.streaming_compat import import_streaming

    ds = import_streaming().StreamingDataset(local=str(tiny_data / "new_facts"), batch_size=1)
    samples = [ds[i] for i in range(ds.num_samples)]
    qa = {row["id"]: row for row in map(json.loads, (tiny_data / "eval/new_qa.jsonl").read_text().splitlines())}
    root = tmp_path_factory.mktemp("chunks")
    folders = []
    for c in range(3):
        facts = (2 * c, 2 * c + 1)
        folder = root / f"part{c}"
        folder.mkdir()
        write_mds(folder, ({k: s[k] for k in ("input_ids", "attention_mask", "loss_mask", "group")}
                           for s in samples if s["group"] in facts), grouped=True)
        (folder / "qa.jsonl").write_text("".join(json.dumps(qa[f]) + "\n" for f in facts))
        folders.append(folder)
    return folders


def _args(out, chunks, pretrained, tiny_data):
    return ["--config", "configs/tiny/finetune_sparse.yaml", "--out", str(out),
            *[a for c in chunks for a in ("--chunk", str(c))], "--eval-qa", str(tiny_data / "eval/known_qa.jsonl"),
            f"model.init_from={pretrained}", f"model.tokenizer={tiny_data / 'tokenizer'}", "checkpoint.every=1",
            "logging.progress=false", "eval.batch_size=8", "eval.max_new_tokens=4"]


def test_stream_learns_chunks_in_order_and_resumes_bitwise_after_a_kill(chunks, tiny_pretrained, tiny_data,
                                                                        tmp_path):
    whole = tmp_path / "whole"
    r = run_cli([*TORCHRUN, *_args(whole, chunks, tiny_pretrained, tiny_data)])
    log = [json.loads(line) for line in (whole / "stream.jsonl").read_text().splitlines()]
    assert [rec["chunk"] for rec in log] == [0, 1, 2] and r.stdout.count("stream: chunk") == 3
    samples_per_chunk = 2 * 64  # 2 facts x their paraphrases; global batch 2 ranks x 16
    assert all(rec["steps"] == samples_per_chunk // 32 for rec in log)
    for c, rec in enumerate(log):  # each chunk evaluated before and after on what it teaches and on known facts
        assert {f"eval/qa_f1/part{c}/qa", "eval/qa_f1/known_qa"} <= rec["before"].keys() & rec["after"].keys(), c
    assert log[1]["checkpoint"].endswith("chunk_1/checkpoints")
    meta = json.loads((latest_dir(whole / "chunk_1/checkpoints") / "meta.json").read_text())
    assert meta["step"] == log[1]["steps"]

    # The same stream, killed once chunk 1 (the second) has saved its second step, then run again.
    killed = tmp_path / "killed"
    args = [*TORCHRUN, *_args(killed, chunks, tiny_pretrained, tiny_data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = killed / "chunk_1/checkpoints/step_2/meta.json"
    deadline = time.monotonic() + 600
    while not target.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"no {target} (exit {proc.returncode})"
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [*workers, proc.pid]:  # the ranks run in sessions of their own: kill each, then the agent
        os.kill(int(pid), signal.SIGKILL)
    proc.wait()
    assert not (killed / "chunk_1/checkpoints/step_4").exists(), "chunk 1 ended before the kill: nothing was tested"
    assert len((killed / "stream.jsonl").read_text().splitlines()) == 1  # chunk 0 done, chunk 1 not
    r = run_cli(args)
    assert "resumed from" in r.stdout and "stream: chunk 2/3" in r.stdout and "stream: chunk 1/3" not in r.stdout
    assert len((killed / "stream.jsonl").read_text().splitlines()) == 3
    a = checkpoint_tensors(latest_dir(whole / "chunk_2/checkpoints"))
    b = checkpoint_tensors(latest_dir(killed / "chunk_2/checkpoints"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
