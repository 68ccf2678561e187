"""What the per-call argument checks cost: `_check` (shapes, dtypes, devices, inputs, params)
timed alone, on the host, for a spec with an input tensor and a param.

    python benchmarks/call_overhead.py
"""

import sys
import tempfile
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attngen.runtime import compile_file, import_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
dev = "cuda" if torch.cuda.is_available() else "cpu"
with tempfile.TemporaryDirectory() as tmp:
    mod = import_path(compile_file(ROOT / "examples/document.attn", tmp)[0])
    q = torch.randn(2, 16, 1024, 128, device=dev, dtype=torch.bfloat16)
    doc = torch.zeros(2, 1024, dtype=torch.int32, device=dev)
    n = 20000
    t = timeit.timeit(lambda: mod._check(q, q, q, {"doc_id": doc}, {}), number=n) / n
    print(f"_check: {t * 1e6:.1f} us per call ({dev}, torch {torch.__version__})")
