"""The one place that imports mosaicml-streaming.

`import streaming` runs `streaming/__init__.py`, which imports `streaming.vision`, which imports
`torchvision.datasets.VisionDataset`. We never install torchvision (its registry wheels do not
import beside the CPU torch and break transformers), so for the duration of that import a stand-in
module provides `VisionDataset`; it is removed again afterwards because `datasets` fails on a
`torchvision` module whose `__spec__` is None.

Users inspecting shards call it too, in place of `import streaming` (docs/data.md "Inspecting MDS
shards", whose example tests/test_inspect_shards.py runs):

    streaming = import_streaming()
    sample = streaming.LocalDataset(local="runs/data/tiny/new_facts")[0]
"""
from __future__ import annotations

import importlib
import sys
import types


def import_streaming():
    """Import and return the `streaming` package (mosaicml-streaming)."""
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    try:
        import torchvision  # noqa: F401  (a real one, if a user has it)
        return importlib.import_module("streaming")
    except ImportError:
        pass
    # transformers probes for torchvision with find_spec, which fails on a stand-in: import it first.
    import transformers.feature_extraction_utils  # noqa: F401

    def unavailable(*_a, **_k):
        raise ImportError("torchvision is not installed: streaming's vision datasets are unavailable")

    # The names streaming's vision modules import at module level; nothing here is ever called.
    stand_in = {
        "torchvision": {},
        "torchvision.datasets": {"VisionDataset": type("VisionDataset", (object,), {}), "CIFAR10": unavailable},
        "torchvision.transforms": {},
        "torchvision.transforms.functional": {"to_tensor": unavailable},
    }
    saved = {n: sys.modules.get(n) for n in stand_in}
    for name, attrs in stand_in.items():
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so submodules resolve
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    try:
        return importlib.import_module("streaming")
    finally:
        for n, mod in saved.items():  # remove the stand-in again
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
