# Container images for Kubernetes (see docs/install.md). Needs Docker (or a compatible
# builder with BuildKit).
IMAGE ?= ghcr.io/trellis-mesh/trellis
TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/trellis/Chart.yaml)

.PHONY: images test kind
images:
	DOCKER_BUILDKIT=1 docker build -t $(IMAGE):$(TAG) .

# The README's test command.
test:
	./scripts/test-all.sh

# Trellis on a kind cluster, end to end (needs Docker, kind, kubectl, helm).
kind:
	./tests/kind/run.sh
