#!/usr/bin/env bash
# The demo workspace (`make demo`'s demo/, and the e2e tests' copies of it) is a git repository
# of its own, so the DVC commands that compare revisions (`dvc exp run/show`, `dvc metrics
# diff`, `dvc params diff`) work there. The outer repo ignores demo/, so the two never mix.
#
#   scripts/demo-git.sh begin DIR          before make demo writes anything in DIR
#   scripts/demo-git.sh commit DIR MESSAGE after its `dvc repro`
#
# `commit` commits what the run changed: always the first time (no HEAD yet), afterwards only
# when the workspace matched HEAD when `begin` ran. A workspace that already held changes
# (yours: an experiment applied, an edited params.yaml) is left for you to commit, so no
# work of yours is ever committed under make demo's name. Nothing changed: no commit.
set -euo pipefail

usage() { echo "usage: $0 begin DIR | commit DIR MESSAGE" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$2
# Where `begin` records whether the workspace matched HEAD, until `commit` reads it. Kept
# across a failed run: the rerun still knows how the workspace was before the first try.
marker=.git/ferflow-demo-start

case $action in
begin)
  mkdir -p "$dir"
  cd "$dir"
  if [ ! -d .git ]; then
    git init -q -b main
  fi
  # Commits need an identity; use the user's when git has one, else a local one (this
  # repository only; the global config is never written).
  git config user.name >/dev/null || git config --local user.name "ferflow demo"
  git config user.email >/dev/null || git config --local user.email "demo@ferflow.invalid"
  # The MLflow store; data/, as the outer repo's .gitignore has it: only DVC-cached outputs
  # live there, and DVC then writes no .gitignore into data/raw, which prepare-union depends
  # on as a folder (its hash would differ from the repo root's, and after a `dvc pull`).
  # fetch's bookkeeping beside the archives (.dvcignore'd too), wherever data.raw_dir is.
  for pattern in /mlruns/ /data/ '.*.zip.verified' '*.zip.part'; do
    grep -qxF -- "$pattern" .gitignore 2>/dev/null || echo "$pattern" >> .gitignore
  done
  # A workspace made before it was a git repository (`dvc init --no-scm`): let DVC use git
  # and git-ignore the outputs it already holds, before anything is added.
  if [ -f .dvc/config ] && grep -q 'no_scm' .dvc/config; then
    dvc config --unset core.no_scm
    python - <<'EOF'
from dvc.repo import Repo

with Repo(".") as repo, repo.scm_context:
    for stage in repo.index.stages:
        stage.ignore_outs()
EOF
  fi
  if [ ! -f "$marker" ]; then
    if git rev-parse -q --verify HEAD >/dev/null && [ -n "$(git status --porcelain)" ]; then
      echo dirty > "$marker"
    else
      echo clean > "$marker"
    fi
  fi
  ;;
commit)
  [ $# -eq 3 ] || usage
  cd "$dir"
  start=$(cat "$marker" 2>/dev/null || echo clean)
  if git rev-parse -q --verify HEAD >/dev/null && [ "$start" = dirty ]; then
    echo "$dir: not committed: it held uncommitted changes before this run (see git -C $dir status)"
  else
    git add -A
    if git rev-parse -q --verify HEAD >/dev/null && git diff --cached --quiet; then
      echo "$dir: nothing changed since $(git rev-parse --short HEAD)"
    else
      # The demo's own commit: the user's signing and hook settings are not for it.
      git -c commit.gpgsign=false commit -q --no-verify -m "$3"
      echo "$dir: committed $(git rev-parse --short HEAD) ($3)"
    fi
  fi
  rm -f "$marker"
  ;;
*)
  usage
  ;;
esac
