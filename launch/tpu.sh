#!/usr/bin/env bash
# Cloud TPU VMs for busgen-jax: create, set up every worker, mount data, run any stage on all workers, logs, delete.
#
#   bash launch/tpu.sh create --name busgen --zone us-east5-a --type v5p-64 [--spot] [--queued] [--num_slices 2]
#   bash launch/tpu.sh setup  --name busgen --zone us-east5-a [--wheel dist/busgen_jax-0.1.0-py3-none-any.whl]
#   bash launch/tpu.sh mount  --name busgen --zone us-east5-a --bucket my-bucket      # gcsfuse at /gcs/my-bucket
#   bash launch/tpu.sh run    --name busgen --zone us-east5-a [--detach] -- train --config configs/busgen_official.py \
#       --workdir gs://my-bucket/runs/official --config.data.sources.real.path=/gcs/my-bucket/data/corpus/1.0.0
#   bash launch/tpu.sh logs   --name busgen --zone us-east5-a [--worker 0] [--run train]
#   bash launch/tpu.sh ssh    --name busgen --zone us-east5-a -- 'nproc; ls /gcs'
#   bash launch/tpu.sh copy   --src /tmp/data --dst gs://my-bucket/data            # local -> GCS (runs here)
#   bash launch/tpu.sh status --name busgen --zone us-east5-a
#   bash launch/tpu.sh delete --name busgen --zone us-east5-a
#
# Every command takes --dry_run (print each gcloud command instead of running it; or BUSGEN_DRY_RUN=1) and
# --project. Flags go before `--`; what follows `--` is the busgen-jax stage (run) or the shell command (ssh).
# Flags may also come from the environment: BUSGEN_TPU_NAME, BUSGEN_TPU_ZONE, BUSGEN_TPU_TYPE, BUSGEN_TPU_PROJECT.
# Multi-slice (--num_slices N > 1) goes through a queued resource with N nodes; JAX finds the slices itself
# (MEGASCALE_* variables set by the runtime) and busgen-jax's mesh puts its data axis across them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${BUSGEN_TPU_NAME:-busgen}"
zone="${BUSGEN_TPU_ZONE:-}"
type="${BUSGEN_TPU_TYPE:-v5p-8}"
project="${BUSGEN_TPU_PROJECT:-}"
runtime=""
spot=0
queued=0
num_slices=1
dry_run="${BUSGEN_DRY_RUN:-0}"
detach=0
worker="all"
wheel=""
bucket=""
mount_path=""
src=""
dst=""
run_name=""
python="python3.11"
remote_dir="busgen-jax"     # on each worker, relative to the home directory
venv_dir="busgen-venv"
cmd_args=()

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "launch/tpu.sh: $*" >&2; exit 2; }

command="${1:-}"
[[ -n "$command" ]] || { usage >&2; exit 2; }
shift
while (($#)); do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type|--accelerator_type) type="$2"; shift 2 ;;
    --runtime|--runtime_version) runtime="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --num_slices) num_slices="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --detach) detach=1; shift ;;
    --worker) worker="$2"; shift 2 ;;
    --wheel) wheel="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --mount_path) mount_path="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --dst) dst="$2"; shift 2 ;;
    --run) run_name="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; cmd_args=("$@"); break ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
done
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num_slices must be a positive integer, got $num_slices"
((num_slices > 1)) && queued=1   # multi-slice needs a queued resource

# The runtime image for the accelerator family (cloud.google.com/tpu/docs/runtimes).
if [[ -z "$runtime" ]]; then
  case "$type" in
    v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator type $type; pass --runtime" ;;
  esac
fi

# Run (or, with --dry_run, print) one command, quoted so it can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
x() {
  if ((dry_run)); then
    local a sep=""
    for a in "$@"; do printf '%s' "$sep"; quote "$a"; sep=" "; done
    echo
  else
    "$@"
  fi
}

gflags=(--zone "$zone")
[[ -n "$project" ]] && gflags+=(--project "$project")
need_zone() { [[ -n "$zone" ]] || die "--zone is required (or BUSGEN_TPU_ZONE)"; }

# The TPU VM nodes: one per slice ($name, or $name-0 ... $name-(N-1) for multi-slice queued resources).
nodes() {
  if ((num_slices > 1)); then
    for ((i = 0; i < num_slices; i++)); do echo "$name-$i"; done
  else
    echo "$name"
  fi
}

# Run a shell command on workers of every node ($worker: all, or one index).
on_workers() {
  local node
  while read -r node; do
    x gcloud compute tpus tpu-vm ssh "$node" "${gflags[@]}" --worker="$worker" --command "$1"
  done < <(nodes)
}

scp_all() {
  local node
  while read -r node; do
    x gcloud compute tpus tpu-vm scp "$1" "$node:$2" "${gflags[@]}" --worker=all
  done < <(nodes)
}

# The run's log file on each worker (~/busgen-logs/<run>.log), named after the stage unless --run is given.
log_file() { echo "busgen-logs/${run_name:-${cmd_args[0]:-busgen}}.log"; }

case "$command" in
  create)
    need_zone
    if ((queued)); then
      args=(gcloud compute tpus queued-resources create "$name" "${gflags[@]}" --accelerator-type "$type"
            --runtime-version "$runtime")
      if ((num_slices > 1)); then
        args+=(--node-count "$num_slices" --node-prefix "$name")
      else
        args+=(--node-id "$name")
      fi
      ((spot)) && args+=(--spot)
      x "${args[@]}"
      echo "# queued; wait for ACTIVE: bash launch/tpu.sh status --name $name --zone $zone --queued" >&2
    else
      args=(gcloud compute tpus tpu-vm create "$name" "${gflags[@]}" --accelerator-type "$type" --version "$runtime")
      ((spot)) && args+=(--spot)
      x "${args[@]}"
    fi
    ;;
  setup)
    need_zone
    # Ship this checkout (tracked and untracked-but-not-ignored files) or a wheel to every worker, then install
    # it with the `tpu` extra into a venv under python >= 3.11 (the TPU images ship 3.10: add 3.11 from apt).
    if [[ -n "$wheel" ]]; then
      [[ -f "$wheel" ]] || die "no wheel at $wheel"
      payload="$wheel"
      install="$venv_dir/bin/pip install -q \"\$HOME/$(basename "$wheel")[tpu]\""
    else
      payload="$(mktemp -d)/busgen-src.tgz"
      if ((dry_run)); then
        echo "# (cd $root && git ls-files -co --exclude-standard | tar czf $payload -T -)"
      else
        (cd "$root" && git ls-files -co --exclude-standard | tar czf "$payload" -T -)
      fi
      install="rm -rf $remote_dir && mkdir -p $remote_dir && tar xzf busgen-src.tgz -C $remote_dir && $venv_dir/bin/pip install -q -e \"${remote_dir}[tpu]\""
    fi
    scp_all "$payload" ""   # into the home directory
    on_workers "set -e; cd \$HOME; if ! command -v $python >/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv; fi; [ -x $venv_dir/bin/python ] || $python -m venv $venv_dir; $venv_dir/bin/pip install -q --upgrade pip; $install; $venv_dir/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  mount)
    need_zone
    [[ -n "$bucket" ]] || die "--bucket is required (the GCS bucket to mount, without gs://)"
    bucket="${bucket#gs://}"
    mount_path="${mount_path:-/gcs/$bucket}"
    # ArrayRecord (0.8.6) reads local files only: shards on GCS are read through a gcsfuse mount, at the same
    # path on every worker. Checkpoints and metrics take gs:// paths directly.
    on_workers "set -e; if ! command -v gcsfuse >/dev/null; then export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; sudo mkdir -p $mount_path && sudo chown \$USER $mount_path; mountpoint -q $mount_path || gcsfuse --implicit-dirs --file-cache-max-size-mb=-1 --cache-dir=/tmp/gcsfuse-cache $bucket $mount_path; ls $mount_path | head"
    ;;
  copy)
    [[ -n "$src" && -n "$dst" ]] || die "copy needs --src and --dst (e.g. --src /tmp/data --dst gs://bucket/data)"
    x gcloud storage cp -r "$src" "$dst"
    ;;
  run)
    need_zone
    ((${#cmd_args[@]})) || die "run needs a busgen-jax stage after --, e.g. -- train --config configs/busgen_official.py --workdir gs://..."
    stage="$(printf '%q ' "${cmd_args[@]}")"
    log="$(log_file)"
    body="cd \$HOME/$remote_dir 2>/dev/null || cd \$HOME; mkdir -p \$HOME/busgen-logs"
    if ((detach)); then
      on_workers "$body; nohup \$HOME/$venv_dir/bin/busgen-jax $stage > \$HOME/$log 2>&1 < /dev/null & echo started on \$(hostname): \$HOME/$log"
      echo "# follow it: bash launch/tpu.sh logs --name $name --zone $zone --run ${run_name:-${cmd_args[0]}}" >&2
    else
      # Foreground: gcloud streams every worker's output; the log keeps a copy on each worker.
      on_workers "$body; \$HOME/$venv_dir/bin/busgen-jax $stage 2>&1 | tee \$HOME/$log"
    fi
    ;;
  logs)
    need_zone
    [[ "$worker" == all ]] && worker=0
    on_workers "tail -n 200 -F \$HOME/$(log_file)"
    ;;
  ssh)
    need_zone
    ((${#cmd_args[@]})) || die "ssh needs a command after --"
    on_workers "${cmd_args[*]}"
    ;;
  status)
    need_zone
    if ((queued)); then
      x gcloud compute tpus queued-resources describe "$name" "${gflags[@]}"
    else
      x gcloud compute tpus tpu-vm describe "$name" "${gflags[@]}"
    fi
    ;;
  delete)
    need_zone
    if ((queued)); then
      x gcloud compute tpus queued-resources delete "$name" "${gflags[@]}" --force --quiet
    else
      x gcloud compute tpus tpu-vm delete "$name" "${gflags[@]}" --quiet
    fi
    ;;
  -h|--help|help) usage ;;
  *) die "unknown command $command (create, setup, mount, copy, run, logs, ssh, status, delete)" ;;
esac
