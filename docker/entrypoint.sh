#!/bin/sh
# Container entrypoint. With DEMO_IF_EMPTY=1 and no model in the store, trains the offline demo model
# first: into the store when it is writable, otherwise into DEMO_STORE (default /tmp/model_store),
# which then becomes the store served. Then runs the command (the service by default) as PID 1.
set -eu

store="${IMGSERVE_MODEL_STORE:-/models}"

has_model() {
    find "$1" -mindepth 3 -maxdepth 3 -name model.json 2>/dev/null | grep -q .
}

if [ "${DEMO_IF_EMPTY:-0}" = "1" ] && ! has_model "$store"; then
    if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is None)"; then
        echo "entrypoint: no model in $store, and this is the serving image (no TensorFlow): it cannot train" \
             "the demo model; train it with the full image (docker compose run demo-init) or publish a version" >&2
        exit 2
    fi
    if [ -d "$store" ] && [ -w "$store" ]; then
        target="$store"
    else
        target="${DEMO_STORE:-/tmp/model_store}"
    fi
    echo "entrypoint: no model in $store; training the demo model into $target" >&2
    # shellcheck disable=SC2086  # DEMO_ARGS is a list of options
    python -m train demo --store "$target" --if-missing ${DEMO_ARGS:-}
    IMGSERVE_MODEL_STORE="$target"
    export IMGSERVE_MODEL_STORE
fi

exec "$@"
