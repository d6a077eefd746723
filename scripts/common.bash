# Sourced by the shell scripts (not run): `--help` prints the calling script's header, and a Python without this
# project's packages (the venv not activated) is one line of error instead of a Python traceback.

# script_help SCRIPT ARGS...: print SCRIPT's header comment and exit when ARGS hold -h or --help.
script_help() {
  local script="$1" arg; shift
  for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then
      sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$script"
      exit 0
    fi
  done
}

# require_python NAME: exit 1 with one line when $PYTHON cannot import torch and megatron-core.
require_python() {
  local missing
  if ! missing="$("$PYTHON" -c 'import importlib.util as u
def has(name):
    try:
        return u.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
print(", ".join(n for n in ("torch", "megatron.core") if not has(n)))' 2>/dev/null)"; then
    echo "$1: error: cannot run PYTHON=$PYTHON: install Python 3.12 and run \`make install\`, or set PYTHON" >&2
    exit 1
  fi
  if [[ -n "$missing" ]]; then
    echo "$1: error: $(command -v "$PYTHON") cannot import $missing: run \`make install\` and" \
         "\`source .venv/bin/activate\` first (or set PYTHON to the Python that has megatron-prune)" >&2
    exit 1
  fi
}

# need NAME VAR FLAGS WHAT ARGS...: exit 2 unless the variable VAR is set or one of FLAGS ("--a|--b") is in ARGS.
need() {
  local name="$1" var="$2" flags="$3" what="$4" arg flag; shift 4
  [[ -n "${!var:-}" ]] && return 0
  for arg in "$@"; do
    for flag in ${flags//|/ }; do [[ "$arg" == "$flag" || "$arg" == "$flag="* ]] && return 0; done
  done
  echo "$name: error: set $var (or pass ${flags//|/ or }) to $what" >&2
  exit 2
}

# whole_numbers SCRIPT NAME...: exit 2 with one line unless each variable NAME holds a whole number >= 1.
whole_numbers() {
  local script="$1" name; shift
  for name in "$@"; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] ||
      { echo "$script: error: $name=${!name}: expected a whole number >= 1" >&2; exit 2; }
  done
}

# flag_wins SCRIPT VAR FLAGS ARGS...: where one of FLAGS ("--a|--b") is in ARGS, it wins over the variable VAR (as
# check_model.sh's later flags win): VAR is unset, with a one-line note when the two differ, never a silent choice.
flag_wins() {
  local script="$1" var="$2" flags="$3" flag given="" value=""; shift 3
  [[ -n "${!var:-}" ]] || return 0
  while (($#)); do
    for flag in ${flags//|/ }; do
      if [[ "$1" == "$flag" ]]; then given="$flag"; value="${2-}"; fi
      if [[ "$1" == "$flag="* ]]; then given="$flag"; value="${1#*=}"; fi
    done
    shift
  done
  [[ -n "$given" ]] || return 0
  [[ "$value" == "${!var}" ]] ||
    echo "$script: note: $given $value is used, not $var=${!var} (a flag given as an argument wins)"
  unset "$var"
}
