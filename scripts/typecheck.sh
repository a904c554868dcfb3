#!/usr/bin/env bash
# mypy over kvconf as it installs: conf/ is the package kvconf.conf and connectors/ is
# kvconf_connectors (pyproject.toml's package-dir), a mapping mypy cannot follow from the
# repository's folders or from an editable install. So it checks a tree of links laid out as the
# installed packages (build/typecheck, rebuilt each time: it holds only links) and reports each
# finding at the repository's own path. Extra arguments go to mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BIN="${KVCONF_VENV:-.venv}/bin"
TREE=build/typecheck
rm -rf "$TREE"
mkdir -p "$TREE/kvconf"
for entry in kvconf/*; do
  [ "$(basename "$entry")" = __pycache__ ] || ln -s "$ROOT/$entry" "$TREE/$entry"
done
ln -s "$ROOT/conf" "$TREE/kvconf/conf"
ln -s "$ROOT/connectors" "$TREE/kvconf_connectors"
ln -s "$ROOT/hydra_plugins" "$TREE/hydra_plugins"
cd "$TREE"
"$ROOT/$BIN/mypy" --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" "$@" 2>&1 \
  | sed -e 's#^kvconf/conf/#conf/#' -e 's#^kvconf_connectors/#connectors/#'
