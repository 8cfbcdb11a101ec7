# One command to set up and run each thing; everything installs into .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: demo test lint build bench clean wheel

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2" "numpy>=1.22" "typer>=0.12" "rich>=13" "huggingface_hub>=0.23" "pyyaml>=6" "cmaes>=0.10" \
		"pytest>=8" "ml_dtypes>=0.3" "ruff>=0.6" "mypy>=1.10" "matplotlib>=3.6" "ray[default]>=2.9"
	touch $(STAMP)

build: $(STAMP)
	$(VENV)/bin/maturin develop --release --quiet

demo: build
	rm -rf demo-out
	$(VENV)/bin/modelkin example demo-out/family
	$(VENV)/bin/modelkin kinship demo-out/family/math-a demo-out/family/math-b --base demo-out/family/base
	$(VENV)/bin/modelkin matrix demo-out/family/math-a demo-out/family/math-b demo-out/family/code \
		demo-out/family/math-code --base demo-out/family/base --metric pcc --plot demo-out/kinship.png
	$(VENV)/bin/merge_cal demo-out/family/math-a demo-out/family/code demo-out/family/base "pcc cs ed"
	printf 'models:\n  - model: demo-out/family/math-a\n    parameters: {weight: 1.0, density: 0.5}\n  - model: demo-out/family/code\n    parameters: {weight: 0.7, density: 0.5}\nmerge_method: ties\nbase_model: demo-out/family/base\ndtype: float32\nout_dtype: bfloat16\n' > demo-out/ties.yml
	$(VENV)/bin/modelkin merge demo-out/ties.yml demo-out/merged-ties --seed 0
	$(VENV)/bin/modelkin kinship demo-out/merged-ties demo-out/family/math-b --base demo-out/family/base --metric pcc
	$(VENV)/bin/modelkin example --tasks demo-out/tasks
	$(VENV)/bin/modelkin evolve demo-out/tasks/evolve.yml demo-out/evolve-run
	$(VENV)/bin/modelkin runs tree demo-out/evolve-run --plot demo-out/lineage.png

# An abi3 wheel for manylinux2014 x86_64 (glibc 2.17: Ubuntu 18.04+, RHEL 7+, Amazon Linux 2),
# linked by zig from PyPI's ziglang package, so nothing outside the registries is needed.
wheel: $(STAMP)
	$(PY) -m pip install --quiet "ziglang>=0.11"
	rm -rf dist
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --zig --compatibility manylinux2014 --out dist --quiet

lint: build
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --quiet
	$(VENV)/bin/ruff check python tests benches scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m mypy.stubtest modelkin._core

test: build wheel
	cargo test --workspace --quiet
	$(VENV)/bin/python -m pytest -q tests

bench: build
	$(VENV)/bin/python benches/bench_kinship.py
	$(VENV)/bin/python benches/bench_merge.py
	$(VENV)/bin/python benches/bench_library.py
	$(VENV)/bin/python benches/bench_evolve.py
	$(VENV)/bin/python benches/bench_search.py

clean:
	rm -rf $(VENV) target demo-out dist
