"""Our quantized weights written in other engines' formats (llama.cpp's GGUF, ...), unchanged where the formats agree."""
