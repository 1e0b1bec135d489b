# vtpmd — see README.md. `make run` and `make test` set up everything they need.

GO          ?= go
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
BIN         := bin

.PHONY: all build run test lint deps libvirtd libvirt-hosts libvirt-hosts-down openstack demo demo-cluster fuzz bench bench-once bench-density bench-fanin bench-provision bench-console screenshots clean

all: build

# vtpm-guest goes into guests' images, so it is static (no cgo, no libc).
build:
	$(GO) build -o $(BIN)/ ./cmd/vtpmd ./cmd/vtpmctl
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/vtpm-guest

RUN_DIR ?= $(CURDIR)/.run

# The main job on embedded defaults: vtpmd all-in-one (API, SQLite store,
# embedded key manager, local CA, local swtpm agent) in the foreground.
run: deps build
	@mkdir -p $(RUN_DIR)
	@echo "vtpmctl is at $(BIN)/vtpmctl: export PATH=$(CURDIR)/$(BIN):\$$PATH VTPMD_SERVER=unix://$(RUN_DIR)/data/api.sock"
	@echo "web console: http://127.0.0.1:8780/ui/ (sign in with the link $(BIN)/vtpmctl --server unix://$(RUN_DIR)/data/api.sock console prints)"
	$(BIN)/vtpmd all-in-one --data-dir $(RUN_DIR)/data --listen 127.0.0.1:8780

# Everything CI runs: system packages, formatting, vet, staticcheck, all
# tests (the committed fuzz corpus included) under the race detector, and
# every benchmark once (bench-once).
test: deps lint libvirtd libvirt-hosts openstack
	$(GO) test -race -count=1 -timeout 50m ./...
	VTPMD_TEST_STORE=postgres $(GO) test -race -count=1 ./internal/server ./internal/verifier ./internal/webhook
	@$(MAKE) --no-print-directory bench-once

# Every go test benchmark in the repository run once (-benchtime 1x), not
# for its numbers but so that a benchmark that no longer runs, or that
# measures the wrong thing, fails CI instead of going unnoticed (one timed
# nothing but refused releases for weeks); the benchmarks fail when what
# they time is refused or empty. The packages are those with a Benchmark
# function, found afresh each run. Left out (BENCH_ONCE_SKIP):
# BenchmarkGuestStart and BenchmarkLiveMigration, which boot real guests
# under TCG, 49 s and 128 s even once on two cores; the tests boot
# the same guests (TestLibvirt, TestClusterLiveMigrate). The fan-in
# benchmarks mostly sleep (they average the server's memory and idle
# statements over 10-second windows): they run beside the others, in a
# second go test, with 100 agents for BenchmarkFanIn's 500. Without the
# race detector: under it the run took 313 s, without it 142 s on two
# loaded cores with the build cache warm (docs/benchmarks.md).
BENCH_ONCE_SKIP := ^Benchmark(GuestStart|LiveMigration)$$
bench-once:
	@pkgs=$$(git ls-files '*_test.go' | xargs grep -l '^func Benchmark' | xargs -n1 dirname | sort -u | sed 's|^|./|'); \
	$(GO) test -count=1 -timeout 20m -run '^$$' -bench . -benchtime 1x -skip '$(BENCH_ONCE_SKIP)|^BenchmarkFanIn' $$pkgs & others=$$!; \
	VTPMD_FANIN_AGENTS=100 $(GO) test -count=1 -timeout 20m -run '^$$' -bench '^BenchmarkFanIn' -benchtime 1x ./internal/daemon; fanin=$$?; \
	wait $$others; others=$$?; \
	[ $$fanin = 0 ] && [ $$others = 0 ]

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

# System packages (Debian) the product and its tests use.
deps:
	@scripts/deps.sh

# libvirtd and virtlogd for the libvirt backend's tests (root; no systemd).
libvirtd:
	@scripts/libvirtd-up.sh

# Two libvirt hosts on this machine, each in its own namespaces, joined by a
# veth pair, for the live migration tests (root; no systemd).
libvirt-hosts: libvirtd
	@scripts/libvirt-hosts.sh up

libvirt-hosts-down:
	@scripts/libvirt-hosts.sh down

# Keystone and Barbican for the OpenStack tests (root; no systemd).
openstack:
	@scripts/openstack-up.sh >/dev/null

# The attestation scenario in a real VM, step by step: a guest with a vTPM
# from vtpmd registers, is judged pending, trusted on a trusted host once
# its boot and the host's are the policies, on an untrusted host (naming
# the host's PCR 4) when the host reboots into another kernel, and
# untrusted (naming PCR 9) when booted another way; then the attacks (its
# evidence replayed, a quote by another key, another TPM registering).
demo: libvirtd
	CI=true $(GO) test -count=1 -run 'TestGuestAttestation$$' -v ./internal/daemon

# A throwaway cluster on this machine, narrated: PostgreSQL, vtpmd server
# and two vtpmd agents enrolled by join tokens; where vTPMs land, an agent
# stopped and its host reading down while its vTPMs keep running (the same
# swtpm processes, PCRs intact), and the agent back, adopting them. About
# 15 seconds; it cleans up after itself, on Ctrl-C too (KEEP=1 keeps its
# files and logs; DEMO_PORT picks the server's port, else the first free
# one from 8788).
demo-cluster: deps build
	BIN=$(BIN) scripts/demo-cluster.sh

# Grow the fuzz corpus; copy new entries into testdata/fuzz to keep them.
fuzz:
	$(GO) test ./internal/spec -run '^$$' -fuzz FuzzResolve -fuzztime 60s

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 5 ./internal/spec

# 1,000 running vTPMs on this host: create time, restart time, vtpmd memory.
bench-density: build
	N=$${N:-1000} scripts/bench-density.sh

# Create-to-active latency next to swtpm_setup, against a throwaway vtpmd;
# POOL=K keeps K manufactured TPMs ready (the run waits until they are).
bench-provision: build
	@dir=$$(mktemp -d); $(BIN)/vtpmd all-in-one --data-dir $$dir --listen 127.0.0.1:8791 --log-level error --pool-size $${POOL:-0} & pid=$$!; \
	until $(BIN)/vtpmctl --server unix://$$dir/api.sock hosts >/dev/null 2>&1; do sleep 0.05; done; \
	until [ $$(ls $$dir/vtpms/.pool/*/identity.json 2>/dev/null | wc -l) -ge $${POOL:-0} ]; do sleep 0.1; done; \
	$(BIN)/vtpmctl --server unix://$$dir/api.sock bench provision -n $${N:-30}; kill $$pid; wait $$pid; rm -rf $$dir

# 500 simulated hosts' agents over HTTPS/mTLS against vtpmd server on
# PostgreSQL, against all-in-one; then the agent's cost of one change at 10
# and 1,000 vTPMs. AGENTS, CREATES and CONCURRENCY tune the first.
bench-fanin:
	VTPMD_FANIN_AGENTS=$${AGENTS:-500} VTPMD_FANIN_CONCURRENCY=$${CONCURRENCY:-4} \
		$(GO) test -run '^$$' -bench FanIn -benchtime $${CREATES:-500}x -timeout 30m ./internal/daemon
	$(GO) test -run '^$$' -bench AgentWatch -benchtime 2000x ./internal/agent

# The web console's Instances page over 10,000 instances: server time per
# page (p50, p99) and the first page's size (docs/benchmarks.md).
bench-console:
	$(GO) test -run '^$$' -bench InstancesPage -benchtime 200x ./internal/console

# The web console's screenshots in docs/console (README), taken by its
# end-to-end test in headless Chromium.
screenshots: deps
	$(GO) test -count=1 -run 'TestConsoleInBrowser$$' ./internal/daemon -screenshots $(CURDIR)/docs/console

clean:
	rm -rf $(BIN)
