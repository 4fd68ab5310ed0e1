import json

from pipeline.artifacts import fingerprint, library_versions, load_verified


def test_fingerprint_depends_on_every_part_and_not_on_key_order():
    assert fingerprint("a", {"x": 1, "y": 2}) == fingerprint("a", {"y": 2, "x": 1})
    assert fingerprint("a", {"x": 1}) != fingerprint("a", {"x": 2})
    assert fingerprint("a", {"x": 1}) != fingerprint("b", {"x": 1})


def test_manifest_records_versions_config_and_checksums(tiny_run):
    export = next(tiny_run.glob("01-export-*"))
    m = json.loads((export / "manifest.json").read_text())
    for key in (
        "schema_version",
        "stage",
        "stage_version",
        "fingerprint",
        "parent",
        "config",
        "files",
        "metrics",
        "versions",
        "timing",
        "resources",
    ):
        assert key in m, key
    assert m["stage"] == "export" and m["config"]["opset"] == 18
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m["versions"])
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "io_contract.json", "tokenizer.json"}
    model = next(tiny_run.glob("00-model-*"))
    assert m["parent"] == json.loads((model / "manifest.json").read_text())["fingerprint"]
    assert load_verified(export, m["fingerprint"])[0] is not None
    assert "fingerprint" in load_verified(export, "0" * 64)[1]


def test_library_versions_has_python():
    assert "python" in library_versions()


def test_each_step_records_its_own_peak_memory(tiny_run):
    used = [json.loads((step / "manifest.json").read_text())["resources"] for step in sorted(tiny_run.glob("0*-*"))]
    assert len(used) == 3
    for u in used:
        assert u["peak_since"] == "step"  # restarted at the step's start (Linux)
        assert 0 < u["rss_mb"] <= u["peak_rss_mb"]


def test_peak_rss_restarts_after_a_large_allocation():
    """200 MB mapped and touched, then unmapped (an anonymous map: no allocator keeps it): a reset peak drops."""
    import mmap

    from pipeline import resources

    block = mmap.mmap(-1, 200 * 2**20)
    block.write(b"\x01" * len(block))
    assert resources.reset_peaks()
    before = resources.peaks(True)["peak_rss_mb"]
    block.close()
    assert resources.reset_peaks()
    after = resources.peaks(True)["peak_rss_mb"]
    assert after < before - 150
