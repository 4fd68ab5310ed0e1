"""What the Makefile runs: the prepared device checks (`make gpu-check`, `serve-gpu-check`, `distill-gpu-check`) and the load test."""
