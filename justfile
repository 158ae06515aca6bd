# lambda-ctl — common tasks. `cargo install just` to use; CI calls cargo directly (.ci/run).

default: test

# Build the release binary.
build:
    cargo build --release

# Run the test suite (same command as CI; set LAMBDA_TEST_* URLs to include real services).
test:
    cargo test

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Check every pipeline and workflow of the project in the current directory.
validate:
    cargo run --release -- validate

# Run the speed layer, scheduler and HTTP API on the embedded defaults.
serve:
    cargo run --release -- serve

# Print throughput and latency figures.
bench:
    cargo bench

# Everything CI runs, with the local services.
ci:
    .ci/run

# Broker sources: events/s from each broker into partials (brokers from LAMBDA_TEST_*; .ci/run exports them).
bench-sources:
    cargo bench --bench sources

# Batch scale-out: one process against 3 workers, each on a "machine" of `cpus` CPUs (a cgroup; root).
bench-scaleout cpus="0.6":
    SCALEOUT_BENCH_CPUS={{cpus}} cargo bench --bench scaleout

# Speed layer on nodes: one `serve --node` against 3, each on a "machine" of `cpus` CPUs (a cgroup; root; LAMBDA_TEST_NATS).
bench-nodes cpus="0.5":
    NODES_BENCH_CPUS={{cpus}} cargo bench --bench nodes
