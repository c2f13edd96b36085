# The two commands a new machine needs (see README):
#   make run    build moemesh and generate from the embedded default model
#   make test   everything CI checks: formatting, clippy, unit, reference and end-to-end tests
.PHONY: run test build fmt lint e2e cuda-check

CHAT ?= Explain mixture-of-experts models in one sentence.

build:
	scripts/setup.sh
	cargo build --release -p moemesh

run: build
	./target/release/moemesh generate --chat "$(CHAT)" --max-new-tokens 48

fmt:
	cargo fmt --all -- --check

lint:
	cargo clippy --workspace --all-targets -- -D warnings
	@# The engine must not depend on the wire (docs/DESIGN.md, Crates: model math with no gRPC types).
	@! cargo tree -p moemesh-engine -e normal --prefix none | grep -E '^(tonic|prost|tower|tokio|etcd-client) ' \
	  || (echo "moemesh-engine depends on a wire/runtime crate" && false)
	@# One rustls crypto provider, ring: aws-lc-rs must not come in through a default feature.
	@! cargo tree --workspace --prefix none | grep -E '^aws-lc-(rs|sys) ' \
	  || (echo "aws-lc-rs is in the dependency tree; only ring may provide rustls' crypto" && false)

# The end-to-end tests run target/debug/moemesh; `cargo test --workspace` rebuilds it first
# (the moemesh package has tests of its own). To run only tests/: make e2e.
e2e:
	cargo build -p moemesh
	cargo test -p moemesh-tests

# The CUDA feature's Rust code, type-checked without the toolkit (a stand-in nvcc), so that it
# cannot rot unseen in a CPU-only CI. The kernels themselves are compiled by scripts/build-cuda.sh
# and checked on a GPU by scripts/gpu-check.sh.
cuda-check:
	scripts/build-cuda.sh --check

test:
	scripts/setup.sh --test
	$(MAKE) fmt
	$(MAKE) lint
	$(MAKE) cuda-check
	cargo test --workspace
