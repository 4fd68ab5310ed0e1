import json

from pipeline.artifacts import fingerprint, library_versions, load_verified


def test_fingerprint_depends_on_every_part_and_not_on_key_order():
    assert fingerprint("a", {"x": 1, "y": 2}) == fingerprint("a", {"y": 2, "x": 1})
    assert fingerprint("a", {"x": 1}) != fingerprint("a", {"x": 2})
    assert fingerprint("a", {"x": 1}) != fingerprint("b", {"x": 1})


def test_manifest_records_versions_config_and_checksums(tiny_run):
    export = next(tiny_run.glob("01-export-*"))
    m = json.loads((export / "manifest.json").read_text())
    for key in ("schema_version", "stage", "stage_version", "fingerprint", "parent", "config", "files",
                "metrics", "versions", "timing"):
        assert key in m, key
    assert m["stage"] == "export" and m["config"]["opset"] == 17
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m["versions"])
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "io_contract.json", "tokenizer.json"}
    model = next(tiny_run.glob("00-model-*"))
    assert m["parent"] == json.loads((model / "manifest.json").read_text())["fingerprint"]
    assert load_verified(export, m["fingerprint"])[0] is not None
    assert "fingerprint" in load_verified(export, "0" * 64)[1]


def test_library_versions_has_python():
    assert "python" in library_versions()
