"""The baseline's answers kept in the workdir: computed once per model and question, read back by the next
run on the same model, computed again for anything else."""

import json

from pipeline.stages.validate.baseline import FOLDER, BaselineMemo


def test_an_answer_is_computed_once_and_read_back_by_a_later_run(tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return value

        return run

    logged = []
    first = BaselineMemo(tmp_path, {"artifact": "abc"}, logged.append)
    assert first.get("greedy", {"prompts": [[1, 2]]}, compute([[[5, 6], 2]])) == [[[5, 6], 2]]
    later = BaselineMemo(tmp_path, {"artifact": "abc"}, logged.append)
    assert later.get("greedy", {"prompts": [[1, 2]]}, compute("never")) == [[[5, 6], 2]]
    assert calls == [[[[5, 6], 2]]] and "kept from an earlier run" in logged[-1]
    other_model = BaselineMemo(tmp_path, {"artifact": "def"}, logged.append)
    assert other_model.get("greedy", {"prompts": [[1, 2]]}, compute("b")) == "b"
    assert later.get("greedy", {"prompts": [[1, 3]]}, compute("c")) == "c"
    assert later.get("chat", {"prompts": [[1, 2]]}, compute("d")) == "d"
    assert calls[1:] == ["b", "c", "d"]
    forced = BaselineMemo(tmp_path, {"artifact": "abc"}, logged.append, fresh=True)  # optimize --force
    assert forced.get("greedy", {"prompts": [[1, 2]]}, compute("e")) == "e"
    assert later.get("greedy", {"prompts": [[1, 2]]}, compute("never")) == "e"


def test_a_damaged_or_foreign_file_is_computed_again(tmp_path):
    memo = BaselineMemo(tmp_path, {"artifact": "abc"}, print)
    memo.get("greedy", {"prompts": [[1]]}, lambda: 1)
    (kept,) = tmp_path.glob("greedy-*.json")
    kept.write_text("{not json")
    assert memo.get("greedy", {"prompts": [[1]]}, lambda: 2) == 2
    data = json.loads(kept.read_text())
    data["key"]["inputs"] = {"prompts": [[9]]}  # another question under the same file name
    kept.write_text(json.dumps(data))
    assert memo.get("greedy", {"prompts": [[1]]}, lambda: 3) == 3


def test_a_second_recipe_on_the_same_model_reuses_the_baselines_replies(tmp_path, tiny_llama, eval_text, monkeypatch):
    """Run 1 exports the float model, run 2 an INT4 one: same baseline, so run 2 computes no baseline reply,
    and its report's baseline figures are run 1's."""
    from conftest import write_recipe

    import pipeline.stages.validate.chat as chat
    import pipeline.stages.validate.stage as stage
    from pipeline import run

    calls = []
    for module in (stage, chat):
        real = module.torch_greedy

        def counting(*a, real=real, **k):
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(module, "torch_greedy", counting)
    checks = "chat: {max_new_tokens: 6, batch_size: 8}\n"
    recipe = write_recipe(tmp_path, tiny_llama, eval_text, extra_validate=checks)
    float_run = run(recipe, workdir=tmp_path / "w")
    assert len(calls) == 2  # the prompts, the chat set
    int4 = "{method: rtn, bits: 4, group_size: 32, lm_head: float, embedding: float}"
    quantized = tmp_path / "int4.yaml"
    quantized.write_text(recipe.read_text().replace("stages:\n", f"stages:\n  - quantize: {int4}\n"))
    int4_run = run(quantized, workdir=tmp_path / "w", overrides=["name=int4"])
    assert len(calls) == 2
    assert len(list((tmp_path / "w" / FOLDER).glob("*.json"))) == 2
    a, b = (json.loads(next(r.glob("*-validate-*/report.json")).read_text()) for r in (float_run, int4_run))
    for name in ("chat_fact_accuracy_baseline", "chat_turn_end_rate_baseline", "chat_reply_perplexity_baseline"):
        assert a["metrics"][name] == b["metrics"][name], name
    assert [r["baseline"] for r in a["chat"]["replies"]] == [r["baseline"] for r in b["chat"]["replies"]]
    assert [s["baseline"] for s in a["samples"]] == [s["baseline"] for s in b["samples"]]
    assert a["metrics"]["chat_reply_perplexity"] != b["metrics"]["chat_reply_perplexity"]  # the artifacts differ
    run(quantized, workdir=tmp_path / "w", overrides=["name=int4"], force=True)
    assert len(calls) == 4  # --force computes the baseline's answers again
