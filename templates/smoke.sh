#!/bin/sh
# Smoke test of one built template image, run inside it with no network:
#
#   docker run --rm --network=none --entrypoint /bin/sh IMAGE /template/templates/smoke.sh
#
# Checks what the launcher and the workers rely on: the launcher binary and the Beam
# boot are where Dataflow looks, the entry point exists, nothing asks for pip at
# launch, and the Beam release is setup.py's. For the batch job it then does what
# the launcher does, offline: `python $FLEX_TEMPLATE_PYTHON_PY_FILE --name=value ...`
# on a tiny generated world with the DirectRunner, which proves every dependency is
# already installed. tests/test_templates.py runs this same script outside Docker.
set -eu

LAUNCHER_BIN=${LAUNCHER_BIN:-/opt/google/dataflow/python_template_launcher}
BOOT_BIN=${BOOT_BIN:-/opt/apache/beam/boot}
PYTHON=${PYTHON:-python}
SETUP_PY=${SETUP_PY:-/template/setup.py}
WORK=${SMOKE_DIR:-/tmp/smoke}

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

[ -x "$LAUNCHER_BIN" ] || fail "no Flex Template launcher at $LAUNCHER_BIN"
[ -x "$BOOT_BIN" ] || fail "no Beam SDK boot at $BOOT_BIN"
[ -n "${FLEX_TEMPLATE_PYTHON_PY_FILE:-}" ] || fail "FLEX_TEMPLATE_PYTHON_PY_FILE is not set"
[ -f "$FLEX_TEMPLATE_PYTHON_PY_FILE" ] || fail "no entry point $FLEX_TEMPLATE_PYTHON_PY_FILE"
[ -z "${FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE:-}" ] || fail "requirements would be pip-installed at launch"
[ -z "${FLEX_TEMPLATE_PYTHON_SETUP_FILE:-}" ] || fail "setup.py would be pip-installed at launch"

"$PYTHON" - "$SETUP_PY" <<'EOF' || fail "Beam release differs from setup.py"
import ast, sys
import apache_beam
tree = ast.parse(open(sys.argv[1]).read())
pinned = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and getattr(node.targets[0], "id", "") == "BEAM_VERSION")
print(f"smoke: Beam {apache_beam.__version__}, setup.py pins {pinned}")
sys.exit(apache_beam.__version__ != pinned)
EOF

job=$(basename "$(dirname "$FLEX_TEMPLATE_PYTHON_PY_FILE")")
"$PYTHON" -c "import pipelines.$job" || fail "cannot import pipelines.$job"
if [ "$job" != batch_recommendations ]; then
  echo "smoke: $job OK"
  exit 0
fi

rm -rf "$WORK" && mkdir -p "$WORK"
"$PYTHON" -m pipelines.generate_world --preset tiny --seed 3 --out "$WORK/world" >/dev/null
as_of=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['as_of'])" "$WORK/world/world.json")
cd "$WORK"
"$PYTHON" "$FLEX_TEMPLATE_PYTHON_PY_FILE" --input_dir="$WORK/world" \
  --warehouse="$WORK/warehouse.duckdb" --as_of="$as_of" --run_id=smoke \
  --runner=DirectRunner --job_name=smoke --temp_location="$WORK/tmp" \
  || fail "the batch entry point exited $?"
"$PYTHON" - "$WORK/warehouse.duckdb" <<'EOF' || fail "the batch job published nothing"
import sys
import duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
rows = con.execute("SELECT count(*) FROM recommendations WHERE run_id = 'smoke'").fetchone()[0]
print(f"smoke: batch_recommendations published {rows} recommendations")
sys.exit(rows == 0)
EOF
echo "smoke: $job OK"
