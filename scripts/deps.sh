# Sourced by the other scripts: makes sure the Debian packages a build needs are installed.
# As root it installs what is missing with apt-get; otherwise it names the command to run.

ckpt_ensure_packages() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "-- installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "missing packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    return 1
  fi
}

# What the 'dev' preset needs (tests, benchmarks and examples).
CKPT_BUILD_PACKAGES=(cmake ninja-build g++ libeigen3-dev doctest-dev libopenblas-dev libbenchmark-dev)
