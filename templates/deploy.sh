#!/usr/bin/env bash
# Build and publish the Flex Templates; optionally launch or update the streaming job.
#
#   templates/deploy.sh images [JOB...]     # docker build: one image per template, shared layers
#   templates/deploy.sh smoke [JOB...]      # templates/smoke.sh inside each image, no network
#   templates/deploy.sh push [JOB...]       # docker push to Artifact Registry
#   templates/deploy.sh templates [JOB...]  # template spec per job -> gs://$BUCKET/templates/
#   templates/deploy.sh streaming           # STREAMING_MODE=none|launch|update|drain
#   templates/deploy.sh schedules           # Cloud Scheduler jobs (templates/schedules/*.json)
#   templates/deploy.sh alerts              # log-based metrics + alert policies (templates/alerts/)
#   templates/deploy.sh list                # the templates it would build
#   templates/deploy.sh service-image       # SERVICE_MODE=deploy: build and push the API image
#   templates/deploy.sh service             # SERVICE_MODE=deploy: the API on Cloud Run
#
# cloudbuild.yaml runs images, smoke, push, templates and streaming in that order;
# docs/deploy.md runs them by hand. The templates are the directories with a
# metadata.json (written by `python -m templates.metadata --write`), so a new
# registry entry needs no change here.
#
# Configuration, from the environment (cloudbuild.yaml maps its substitutions):
#   PROJECT_ID REGION BUCKET REPOSITORY   required
#   IMAGE_TAG                             required (falls back to SHORT_SHA)
#   SERVICE_ACCOUNT                       worker service account e-mail
#                                         (default dataflow-worker@PROJECT_ID.iam.gserviceaccount.com)
#   LAUNCHER_TAG                          tag of the Flex Template launcher base image
#   STREAMING_MODE STREAMING_TEMPLATE STREAMING_JOB_NAME STREAMING_PARAMETERS
#   DRAIN_TIMEOUT (s, default 3600)  POLL_SECONDS (default 30)
#   SOURCE_COMMIT                         the commit built (falls back to COMMIT_SHA, then git)
#   schedules/alerts: RECS_DATASET INPUT_DIR SCHEDULER_SERVICE_ACCOUNT ALERT_CHANNELS
#                     DEAD_LETTER_THRESHOLD (templates/ops.py, docs/operations.md)
#   SERVICE_MODE (none|deploy) SERVICE_NAME SERVING_STORE SERVICE_VPC_CONNECTOR
#                                         the API (pipelines.serve, docs/serving.md)
set -euo pipefail

SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
TEMPLATES_DIR=${TEMPLATES_DIR:-templates}
DOCKERFILE=${DOCKERFILE:-templates/Dockerfile}
IMAGE_TAG=${IMAGE_TAG:-${SHORT_SHA:-}}
SOURCE_COMMIT=${SOURCE_COMMIT:-${COMMIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}}

die() { echo "deploy: $*" >&2; exit 1; }
need() {
  local v
  for v in "$@"; do [ -n "${!v:-}" ] || die "set $v (see docs/deploy.md)"; done
}
say() { echo "deploy: $*"; }

template_jobs() {
  local f
  for f in "$TEMPLATES_DIR"/*/metadata.json; do
    [ -f "$f" ] && basename "$(dirname "$f")"
  done
  return 0
}

registry() { echo "$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY/segment-recs"; }
image() { echo "$(registry)/$1:$IMAGE_TAG"; }
spec_path() { echo "gs://$BUCKET/templates/$1/$IMAGE_TAG.json"; }

cmd_images() {
  need PROJECT_ID REGION REPOSITORY IMAGE_TAG
  export DOCKER_BUILDKIT=1
  local job
  for job in "$@"; do
    # The first build makes every layer; the others reuse them and add one ENV.
    docker build --file "$DOCKERFILE" --build-arg JOB="$job" \
      --build-arg SOURCE_COMMIT="$SOURCE_COMMIT" --build-arg TEMPLATE_VERSION="$IMAGE_TAG" \
      ${LAUNCHER_TAG:+--build-arg LAUNCHER_TAG="$LAUNCHER_TAG"} \
      --tag "$(image "$job")" .
  done
}

cmd_smoke() {
  need PROJECT_ID REGION REPOSITORY IMAGE_TAG
  local job
  for job in "$@"; do
    docker run --rm --network=none --entrypoint /bin/sh "$(image "$job")" \
      /template/templates/smoke.sh
  done
}

cmd_push() {
  need PROJECT_ID REGION REPOSITORY IMAGE_TAG
  local job
  for job in "$@"; do docker push "$(image "$job")"; done
}

cmd_templates() {
  need PROJECT_ID REGION REPOSITORY BUCKET IMAGE_TAG
  local sa=${SERVICE_ACCOUNT:-dataflow-worker@$PROJECT_ID.iam.gserviceaccount.com}
  local tmp job img spec streaming
  tmp=$(mktemp -d)
  for job in "$@"; do
    img=$(image "$job")
    spec="$tmp/$job.json"
    streaming=()
    if python3 -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("streaming"))' \
        "$TEMPLATES_DIR/$job/metadata.json"; then
      streaming=(--enable-streaming-engine)
    fi
    # gcloud has no flag for the worker image, so the spec is printed, given
    # defaultEnvironment.sdkContainerImage (the same image), then uploaded.
    gcloud dataflow flex-template build "$(spec_path "$job")" \
      --project="$PROJECT_ID" \
      --image="$img" \
      --sdk-language=PYTHON \
      --metadata-file="$TEMPLATES_DIR/$job/metadata.json" \
      --service-account-email="$sa" \
      --staging-location="gs://$BUCKET/staging" \
      --temp-location="gs://$BUCKET/temp" \
      ${streaming[@]+"${streaming[@]}"} \
      --print-only --format='value(.)' > "$spec"
    python3 - "$spec" "$img" "$SOURCE_COMMIT" "$IMAGE_TAG" <<'EOF'
import json
import re
import sys

path, image, commit, version = sys.argv[1:]
with open(path) as handle:
    spec = json.load(handle)
if spec.get("image") != image:
    sys.exit(f"deploy: the spec names image {spec.get('image')!r}, expected {image!r}")
spec.setdefault("defaultEnvironment", {})["sdkContainerImage"] = image
# What `python -m pipelines.status --verify` compares with the runs (Dataflow also puts
# these labels on every job launched from the spec); label values: [a-z0-9_-], <= 63.
label = lambda value: re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]
spec["defaultEnvironment"].setdefault("additionalUserLabels", {}).update(
    source_commit=label(commit), template_version=label(version))
with open(path, "w") as handle:
    json.dump(spec, handle, indent=2, sort_keys=True)
EOF
    gcloud storage cp "$spec" "$(spec_path "$job")"
    gcloud storage cp "$spec" "gs://$BUCKET/templates/$job/latest.json"
    say "template $job: $(spec_path "$job") (launcher and worker image $img)"
  done
  rm -rf "$tmp"
}

# templates/<job>/transform_name_mappings.json ({"OldStep": "NewStep"}) -> Old=New,...
transform_name_mappings() {
  local file="$TEMPLATES_DIR/$1/transform_name_mappings.json"
  [ -f "$file" ] || return 0
  python3 - "$file" <<'EOF'
import json
import sys

mappings = json.load(open(sys.argv[1]))
bad = [k for k, v in mappings.items() if not isinstance(v, str) or set(",=") & set(k + v)]
if bad:
    sys.exit(f"deploy: transform names with ',' or '=' cannot be mapped: {bad}")
print(",".join(f"{old}={new}" for old, new in mappings.items()))
EOF
}

wait_until_drained() {
  local id=$1 state
  local deadline=$(( $(date +%s) + ${DRAIN_TIMEOUT:-3600} ))
  while :; do
    state=$(gcloud dataflow jobs describe "$id" --project="$PROJECT_ID" --region="$REGION" \
      --format='value(currentState)')
    case "$state" in
      JOB_STATE_DRAINED|JOB_STATE_CANCELLED|JOB_STATE_DONE|JOB_STATE_UPDATED)
        say "job $id is $state"; return 0 ;;
      JOB_STATE_FAILED)
        die "job $id failed while draining; not relaunching (see docs/deploy.md)" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || die "job $id still $state after ${DRAIN_TIMEOUT:-3600}s"
    sleep "${POLL_SECONDS:-30}"
  done
}

cmd_streaming() {
  local mode=${STREAMING_MODE:-none}
  case "$mode" in
    none) say "STREAMING_MODE=none: no streaming job launched or updated"; return 0 ;;
    launch|update|drain) ;;
    *) die "STREAMING_MODE must be none, launch, update or drain, not '$mode'" ;;
  esac
  need PROJECT_ID REGION BUCKET IMAGE_TAG
  local job=${STREAMING_TEMPLATE:-streaming_refresh}
  [ -f "$TEMPLATES_DIR/$job/metadata.json" ] \
    || die "no template '$job': register it in templates/metadata.py and run --write"
  local name=${STREAMING_JOB_NAME:-segment-recs-${job//_/-}}
  local active
  active=$(gcloud dataflow jobs list --project="$PROJECT_ID" --region="$REGION" \
    --status=active --filter="name=$name" --format='value(id)')
  [ "$(printf '%s' "$active" | grep -c .)" -le 1 ] \
    || die "more than one active job named $name: $(echo $active)"
  local run=(gcloud dataflow flex-template run "$name" --project="$PROJECT_ID"
             --region="$REGION" --template-file-gcs-location="$(spec_path "$job")")
  [ -z "${STREAMING_PARAMETERS:-}" ] || run+=(--parameters="$STREAMING_PARAMETERS")
  case "$mode" in
    launch)
      [ -z "$active" ] || die "$name is already running ($active); use STREAMING_MODE=update or drain"
      "${run[@]}" ;;
    update)
      [ -n "$active" ] || die "no running job named $name to update; use STREAMING_MODE=launch"
      local mappings
      mappings=$(transform_name_mappings "$job")
      run+=(--update)
      [ -z "$mappings" ] || run+=(--transform-name-mappings="$mappings")
      "${run[@]}" ;;
    drain)
      if [ -n "$active" ]; then
        gcloud dataflow jobs drain "$active" --project="$PROJECT_ID" --region="$REGION"
        wait_until_drained "$active"
      fi
      "${run[@]}" ;;
  esac
}

service_image() { echo "$(registry)/serve:$IMAGE_TAG"; }

service_wanted() {
  case "${SERVICE_MODE:-none}" in
    none) say "SERVICE_MODE=none: the recommendations API is not built or deployed"; return 1 ;;
    deploy) return 0 ;;
    *) die "SERVICE_MODE must be none or deploy, not '${SERVICE_MODE}'" ;;
  esac
}

cmd_service_image() {
  service_wanted || return 0
  need PROJECT_ID REGION REPOSITORY IMAGE_TAG
  docker build --file templates/serve/Dockerfile --tag "$(service_image)" .
  docker push "$(service_image)"
}

# Cloud Run reaches Memorystore through a Serverless VPC Access connector in its network.
cmd_service() {
  service_wanted || return 0
  need PROJECT_ID REGION REPOSITORY IMAGE_TAG SERVING_STORE SERVICE_VPC_CONNECTOR
  case "$SERVING_STORE" in
    redis://*|rediss://*) ;;
    *) die "SERVING_STORE must be redis://HOST:PORT/DB (the Memorystore instance)" ;;
  esac
  local name=${SERVICE_NAME:-segment-recs-api}
  gcloud run deploy "$name" --project="$PROJECT_ID" --region="$REGION" \
    --image="$(service_image)" --port=8080 \
    --set-env-vars="SERVING_STORE=$SERVING_STORE,SERVING_WORKERS=2" \
    --vpc-connector="$SERVICE_VPC_CONNECTOR" --vpc-egress=private-ranges-only \
    --cpu=2 --memory=1Gi --concurrency=200 --no-allow-unauthenticated
  say "service $name: $(service_image) serving $SERVING_STORE"
}

main() {
  local cmd=${1:-}
  [ $# -eq 0 ] || shift
  case "$cmd" in
    images|smoke|push|templates)
      local jobs=("$@") job
      [ ${#jobs[@]} -gt 0 ] || mapfile -t jobs < <(template_jobs)
      [ ${#jobs[@]} -gt 0 ] || die "no templates: nothing matches $TEMPLATES_DIR/*/metadata.json"
      for job in "${jobs[@]}"; do
        [ -f "$TEMPLATES_DIR/$job/metadata.json" ] || die "no template '$job'"
      done
      "cmd_$cmd" "${jobs[@]}" ;;
    streaming) cmd_streaming ;;
    schedules|alerts)
      need PROJECT_ID REGION BUCKET
      python3 -m templates.ops "$cmd" ;;
    service-image) cmd_service_image ;;
    service) cmd_service ;;
    list) template_jobs ;;
    *) sed -n '2,13p' "$SCRIPT" >&2; exit 2 ;;
  esac
}

main "$@"
