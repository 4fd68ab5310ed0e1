"""Weight quantization: primitives (group-wise INT4/INT8, MatMulNBits packing) and algorithms (RTN, GPTQ, AWQ)."""
