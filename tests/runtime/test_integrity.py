"""A damaged or hostile artifact is refused in one line that names the file, before ONNX Runtime reads it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import Generator, RuntimeFailure, find_model_folder
from runtime.io_spec import CONTRACT_FILE

pytestmark = pytest.mark.hostile


@pytest.fixture
def copy(tiny_export, tmp_path) -> Path:
    """A private copy of the tiny export step (the session's fixture stays intact)."""
    folder = tmp_path / "run" / tiny_export.name
    shutil.copytree(tiny_export, folder)
    return folder


def weights_of(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_truncated_file_is_named_before_loading(copy):
    data = weights_of(copy)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(
        RuntimeFailure, match=rf"{data.name}: \d+ bytes where manifest.json says \d+ \(truncated or replaced\); rebuild"
    ):
        Generator(copy, provider="cpu")


def test_a_missing_file_is_named(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(RuntimeFailure, match=r"tokenizer.json: missing \(listed in manifest.json\)"):
        Generator(copy, provider="cpu")


def test_same_size_corruption_is_caught_by_verify_and_otherwise_by_onnxruntime_in_one_line(copy):
    model = copy / "model.onnx"
    size = model.stat().st_size
    model.write_bytes(b"\x07" * size)
    with pytest.raises(RuntimeFailure, match=r"model.onnx: does not match its checksum in manifest.json"):
        Generator(copy, provider="cpu", verify=True)
    with pytest.raises(
        RuntimeFailure, match=r"model.onnx: onnxruntime cannot load it \(.*\); the artifact may be damaged"
    ):
        Generator(copy, provider="cpu", graph="portable")


def test_an_unreadable_manifest_is_named(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(RuntimeFailure, match=r"manifest.json: unreadable \(JSONDecodeError\)"):
        Generator(copy, provider="cpu")


@pytest.mark.parametrize(
    "key,value",
    [
        ("model_file", "../../outside.onnx"),
        ("model_file", "/etc/passwd"),
        ("kv_scales_file", "sub/../../x.npy"),
        ("model_file", 7),
    ],
)
def test_a_contract_naming_a_file_outside_the_artifact_is_refused(copy, key, value):
    for contract in copy.rglob(CONTRACT_FILE):
        data = json.loads(contract.read_text())
        data[key] = value
        contract.write_text(json.dumps(data))
    (copy / "manifest.json").unlink()  # hand-edited: no manifest to check sizes against
    with pytest.raises(RuntimeFailure, match=rf"{key} .* must be a file name in the artifact folder"):
        Generator(copy, provider="cpu")


def test_a_contract_with_an_unknown_key_is_one_line(copy):
    contract = copy / CONTRACT_FILE
    contract.write_text(json.dumps({**json.loads(contract.read_text()), "surprise": 1}))
    (copy / "manifest.json").unlink()
    with pytest.raises(RuntimeFailure, match=r"unknown key 'surprise'"):
        Generator(copy, provider="cpu", graph="portable")


def test_run_json_cannot_point_outside_the_run_folder(copy):
    run = copy.parent
    (run / "run.json").write_text(json.dumps({"steps": [{"dir": "../../elsewhere"}]}))
    with pytest.raises(RuntimeFailure, match=r"run.json names '../../elsewhere', outside the artifact folder"):
        find_model_folder(run)
    (run / "run.json").write_text("[1, 2")
    with pytest.raises(RuntimeFailure, match=r"run.json: unreadable"):
        find_model_folder(run)


def test_generate_on_a_truncated_artifact_exits_1_with_one_line(copy):
    data = weights_of(copy)
    with open(data, "r+b") as f:
        f.truncate(1000)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "generate", str(copy), "hi", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        line for line in done.stderr.splitlines() if "truncated or replaced" in line
    ]
