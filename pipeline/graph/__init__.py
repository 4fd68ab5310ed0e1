"""ONNX graph builders and rewrites: the runner's fused graph (fused.py), block-quantized MatMulNBits
and GatherBlockQuantized ops (quant_ops.py), sibling matmul packing (pack.py), float zero points
(float_zero.py), W8A8 through ONNX Runtime's quantizer (w8a8.py)."""
