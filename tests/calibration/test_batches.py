"""Calibration blocks from one text or from a weighted mix of texts."""

import numpy as np
import pytest
import torch

from calibration.batches import calibration_batches, describe_text, shares
from calibration.datasets import load_text, sample_blocks
from pipeline.configs import CalibrationConfig, MixedTextSourceConfig, TextSourceConfig
from runtime.tokenizer import Tokenizer


def test_shares_are_whole_proportional_and_sum_to_the_total():
    assert shares([2, 1, 1], 8) == [4, 2, 2]
    assert shares([1, 1, 1], 4) in ([2, 1, 1], [1, 2, 1], [1, 1, 2])
    assert sum(shares([0.3, 0.7], 101)) == 101 and shares([0.3, 0.7], 10) == [3, 7]


def test_one_text_gives_the_blocks_it_always_gave(tiny_llama, eval_text):
    cal = CalibrationConfig(TextSourceConfig(str(eval_text)), num_samples=6, sequence_length=16, seed=3, batch_size=4)
    batches = calibration_batches(cal, tiny_llama, "calibration")
    ids = np.array(Tokenizer(tiny_llama).encode(load_text(str(eval_text)), add_special_tokens=False), dtype=np.int64)
    assert torch.equal(torch.cat(batches), torch.from_numpy(sample_blocks(ids, 16, 6, 3)))
    assert [b.shape[0] for b in batches] == [4, 2]


def test_a_mix_takes_each_texts_share_by_weight_shuffled_and_reproducible(tiny_llama, tmp_path):
    tok = Tokenizer(tiny_llama)
    (tmp_path / "a.txt").write_text("apple " * 2000)
    (tmp_path / "b.txt").write_text("42 " * 2000)
    a_ids = set(tok.encode("apple apple", add_special_tokens=False))
    mix = (MixedTextSourceConfig(str(tmp_path / "a.txt"), weight=3), MixedTextSourceConfig(str(tmp_path / "b.txt")))
    cal = CalibrationConfig(mix, num_samples=8, sequence_length=8, seed=0, batch_size=8)
    blocks = torch.cat(calibration_batches(cal, tiny_llama, "calibration"))
    from_a = [bool(set(row.tolist()) & a_ids) for row in blocks]
    assert sum(from_a) == 6 and len(from_a) == 8
    assert from_a != sorted(from_a, reverse=True)  # shuffled together, not a's blocks then b's
    assert torch.equal(blocks, torch.cat(calibration_batches(cal, tiny_llama, "calibration")))
    assert describe_text(mix) == f"{tmp_path / 'a.txt'} test (75%) + {tmp_path / 'b.txt'} test (25%)"


def test_a_mix_in_a_recipe_is_checked_part_by_part(tmp_path, tiny_llama, eval_text):
    from conftest import write_recipe

    from pipeline import RecipeError
    from pipeline.recipe import load_recipe

    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    base = recipe.read_text()

    def with_data(data: str):
        recipe.write_text(
            base.replace(
                "  - export:", f"  - quantize: {{method: gptq, calibration: {{data: {data}}}}}\n  - export:", 1
            )
        )
        return load_recipe(recipe)

    loaded = with_data(f"[{{source: {eval_text}, weight: 2}}, {{source: python-code, split: valid}}]")
    data = loaded.stages[0].config.calibration.data
    assert [(p.weight, p.split) for p in data] == [(2.0, "test"), (1.0, "valid")]
    with pytest.raises(RecipeError, match=r"data\[1\]\.weight: must be positive, got 0"):
        with_data(f"[{{source: {eval_text}}}, {{source: python-code, split: valid, weight: 0}}]")
    with pytest.raises(RecipeError, match=r"data\[0\]\.splt: unknown key \(did you mean 'split'\?\)"):
        with_data("[{source: python-code, splt: valid}]")
    with pytest.raises(RecipeError, match=r"data: an empty mix"):
        with_data("[]")
