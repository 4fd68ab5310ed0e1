"""`optimize bench`: speed and memory of an exported artifact through our runner, and the same work
through the tools a user would pick instead (transformers, optimum, onnxruntime-genai, llama.cpp)."""
