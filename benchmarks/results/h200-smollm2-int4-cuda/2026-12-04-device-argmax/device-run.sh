#!/bin/bash
# Device run: unpack the carried payload (onnxruntime-gpu 1.31.1, onnxruntime-genai-cuda 0.18.0, gguf;
# the smollm2-int4-cuda export; genai's own build in our layout; bench text), then the GPU checks.
set -x
ROOT=$PWD
mkdir -p /tmp/parts /tmp/g
for d in .gp*; do [ -f $d/part? ] && cp $d/part? /tmp/parts/; done
ls -la /tmp/parts
t=$(date +%s)
[ -d /tmp/g/site ] || { cat /tmp/parts/part0 /tmp/parts/part1 /tmp/parts/part2 /tmp/parts/part3 /tmp/parts/part4 /tmp/parts/part5 /tmp/parts/part6 | xz -dc -T16 | tar xf - -C /tmp/g || exit 3; }
echo "unpacked in $(( $(date +%s) - t )) s"
SP=$(python3 -c 'import site;print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$(find $SP/nvidia -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' :)/usr/local/nvidia/lib64:/usr/local/nvidia/lib
export PYTHONPATH=/tmp/g/site:$ROOT PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import onnxruntime as o, onnxruntime_genai as g; print(o.__version__, o.get_available_providers(), g.__version__)"
git log --oneline -1 2>/dev/null; git diff --stat 2>/dev/null | tail -1
python3 benchmarks/gpu_check.py /tmp/g/model --out /tmp/g/check; echo "gpu_check rc=$?"
cp /tmp/g/check/gpu_check.json $OUT/ 2>/dev/null
python3 benchmarks/cuda_decode_overhead.py /tmp/g/model --out /tmp/g/cdo; echo "cdo rc=$?"
cp /tmp/g/cdo/cuda_decode_overhead.json $OUT/ 2>/dev/null
python3 -m pipeline.cli bench /tmp/g/model --provider cuda --text /tmp/g/bench_text.txt --compare \
  --peers onnxruntime-genai,onnxruntime-genai-cuda-graph,transformers-sdpa --out /tmp/g/bench; echo "bench rc=$?"
cp /tmp/g/bench/bench.json /tmp/g/bench/bench.png $OUT/ 2>/dev/null
ls -la $OUT
