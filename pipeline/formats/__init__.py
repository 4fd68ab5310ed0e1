"""Our artifacts in other engines' formats, unchanged where the formats agree: llama.cpp's GGUF,
compressed-tensors checkpoints (transformers, vLLM) and onnxruntime-genai's config for our ONNX graph."""
