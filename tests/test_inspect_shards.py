"""docs/data.md's "Inspecting MDS shards" example runs as written (issue 23: `import streaming`
fails in the venv for want of torchvision; the documented helper reads a shard)."""
import re
import subprocess

from tests.conftest import PY, ROOT


def doc_example(heading: str) -> str:
    """The first ```python block under `## heading` of docs/data.md."""
    page = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    section = page.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_shard_reading_works(tiny_data):
    code = doc_example("Inspecting MDS shards").replace("runs/data/tiny", str(tiny_data))
    # what the example leaves behind: torchvision absent again (datasets fails on a stand-in)
    code += "import sys\nassert 'torchvision' not in sys.modules\nimport datasets\nprint('ok')\n"
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    # tiny_data's new_facts: 8 facts x 64 paraphrases, grouped; the first sample is fact 0's
    assert lines[0] == "512 samples; group 0", r.stdout
    text, trained = lines[1].removeprefix("text:    "), lines[2].removeprefix("trained: ")
    assert text.startswith("<s> ") and trained.endswith("</s>") and trained.removesuffix(" </s>") in text
    assert lines[-1] == "ok"
