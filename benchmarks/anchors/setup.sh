#!/usr/bin/env bash
# The anchors of benchmarks/qwen_anchors.py, made outside the repository (nothing here is installed
# into the project's venv): a venv with torch 2.14.1 (the project's pin, from the machine's local
# wheels), transformers, ONNX Runtime GenAI 0.18.0 and llama-cpp-python 0.3.36 built from source
# for this CPU; then the random Qwen2-VL-2B checkpoint's language model as a Qwen2ForCausalLM folder,
# converted by llama.cpp's converter to GGUF F32 / F16 / Q8_0 and built by ONNX Runtime GenAI's
# model builder to int8 / int4 (CPU). Every step is skipped when its output is already there.
#
#   bash benchmarks/anchors/setup.sh [ANCHORS=/work/anchors] [CHECKPOINT=/work/qwen2b/ckpt]
#   (env: GGUF_TYPES="q8_0 f16 f32", GENAI_PRECISIONS="int8 int4": which of them to make)
#
# CHECKPOINT: the folder `kiln export qwen2-vl-2b-random --weights DIR` (or
# modelkiln.zoo.qwen_vl.ensure_random_checkpoint) writes. Steps that need more than ~4 GB of RAM
# (conversions, builds) run under the machine's heavy-work lock (/tmp/heavy.lock), one at a time.
# The llama.cpp build takes ~25-40 min on 2 shared cores.
set -euo pipefail

ANCHORS=${1:-/work/anchors}
CHECKPOINT=${2:-/work/qwen2b/ckpt}
THREADS=${THREADS:-2}
LOCK=${LOCK:-/tmp/heavy.lock}
HERE=$(cd "$(dirname "$0")" && pwd)
PY="$ANCHORS/venv/bin/python"
LLAMA_VERSION=0.3.36
SDIST="$ANCHORS/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
LLAMA_SRC="$ANCHORS/src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
mkdir -p "$ANCHORS"
log() { echo "[anchors $(date -u +%H:%M:%S)] $*" >&2; }
# a command, not a function: flock execs its argument, so `timed` must be a program too
TIMED=(/usr/bin/time -f "%e s, peak RSS %M kB")
timed() { "${TIMED[@]}" "$@"; }

# 1. The venv. torch is pinned in every install so pip never resolves another one.
if [ ! -x "$PY" ]; then
  log "venv"
  python3.11 -m venv "$ANCHORS/venv"
  "$PY" -m pip install -q --upgrade pip
fi
if ! "$PY" -c "import torch, transformers, onnxruntime_genai" 2>/dev/null; then
  log "torch 2.14.1, transformers, onnxruntime-genai"
  "$PY" -m pip install -q "torch==2.14.1" "transformers==5.24.0" "onnxruntime-genai==0.18.0" \
    safetensors sentencepiece "numpy==2.4.6" onnx onnx-ir
fi

# 2. llama-cpp-python from source (the sdist vendors llama.cpp, its converter and gguf-py),
#    compiled for this CPU (GGML_NATIVE: AVX-512, VNNI, AMX where the CPU has them).
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$ANCHORS/sdist" "llama-cpp-python==$LLAMA_VERSION"
fi
if [ ! -d "$LLAMA_SRC" ]; then
  mkdir -p "$ANCHORS/src" && tar -xzf "$SDIST" -C "$ANCHORS/src"
fi
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  log "building llama-cpp-python $LLAMA_VERSION from source (long)"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 timed nice -n 10 \
    "$PY" -m pip install -v --no-binary llama-cpp-python "$SDIST" "torch==2.14.1" > "$ANCHORS/build_llama.log" 2>&1
fi

# 3. The language model as Qwen2ForCausalLM (bf16 bytes copied, visual.* left out).
TEXT="$ANCHORS/qwen2-text"
if [ ! -f "$TEXT/model.safetensors" ]; then
  log "text model from $CHECKPOINT"
  python3 "$HERE/text_model.py" "$CHECKPOINT" "$TEXT"
fi

# 4. GGUF by llama.cpp's converter (its own Q8_0 quantization).
mkdir -p "$ANCHORS/gguf"
for t in ${GGUF_TYPES:-q8_0 f16 f32}; do
  out="$ANCHORS/gguf/qwen2-vl-2b-random-text-$t.gguf"
  if [ ! -f "$out" ]; then
    log "GGUF $t"
    flock "$LOCK" "${TIMED[@]}" nice -n 5 "$PY" "$HERE/convert_gguf.py" "$LLAMA_SRC" "$TEXT" "$out.partial" --outtype "$t" \
      > "$ANCHORS/gguf_$t.log" 2>&1
    mv "$out.partial" "$out"
  fi
done

# 5. ONNX Runtime GenAI's model builder, CPU, its defaults for int8 and int4 (MatMulNBits, block 32,
#    accuracy level 4); then the decoder session's intra-op threads set to THREADS.
for p in ${GENAI_PRECISIONS:-int8 int4}; do
  out="$ANCHORS/genai-$p"
  if [ ! -f "$out/genai_config.json" ]; then
    log "ONNX Runtime GenAI $p"
    flock "$LOCK" "${TIMED[@]}" nice -n 5 "$PY" -m onnxruntime_genai.models.builder -i "$TEXT" -o "$out" -p "$p" -e cpu \
      -c "$ANCHORS/hfcache" > "$ANCHORS/genai_$p.log" 2>&1
  fi
  "$PY" - "$out/genai_config.json" "$THREADS" <<'EOF'
import json, sys
path, threads = sys.argv[1], int(sys.argv[2])
config = json.load(open(path))
config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
json.dump(config, open(path, "w"), indent=4)
EOF
done
log "done: $ANCHORS"
