"""Text for calibration and evaluation: sources, token windows, seeded block samples."""

from calibration.datasets import DataError, Window, load_text, sample_blocks, text_fingerprint, windows

__all__ = ["DataError", "Window", "load_text", "sample_blocks", "text_fingerprint", "windows"]
