"""Calibration text as token-id batches: the blocks every calibrated step (GPTQ, AWQ, SmoothQuant,
the sensitivity pass, int8 KV scales) runs the model on."""
from __future__ import annotations

import numpy as np
import torch

from calibration.datasets import DataError, load_text, sample_blocks
from runtime.tokenizer import Tokenizer


def calibration_batches(cal, model_dir, where: str, length: int | None = None) -> list[torch.Tensor]:
    """The calibration blocks of `cal` (a recipe's CalibrationConfig) as token-id batches [batch_size, length].

    Raises DataError naming the recipe key `where` when the text cannot give the blocks."""
    try:
        text = load_text(cal.data.source, cal.data.split, cal.data.hub_config, cal.data.text_field)
    except DataError as e:
        raise DataError(f"{where}.data: {e}") from e
    ids = np.array(Tokenizer(model_dir).encode(text, add_special_tokens=False), dtype=np.int64)
    try:
        blocks = sample_blocks(ids, length or cal.sequence_length, cal.num_samples, cal.seed)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    return [torch.from_numpy(blocks[i:i + cal.batch_size]) for i in range(0, len(blocks), cal.batch_size)]
