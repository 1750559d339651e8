# Progress for the scripts' long steps (sourced by scripts/services and scripts/demo).
#
# A first run compiles for many minutes (tansu ~11 min, the workspace ~11 min on 2 cores) with
# its output in a log file, so without this the terminal shows nothing the whole time and a new
# user cannot tell a slow step from a hung one.
#
#   long_step WHAT USUALLY LOG COMMAND...
#
# runs COMMAND in the foreground (Ctrl-C stops it as usual) with its stdout and stderr appended
# to LOG, and prints
#   WHAT (usually USUALLY; log: LOG)                                   at the start,
#   still WHAT (3m30s elapsed, usually USUALLY; log: LOG) | <last line of LOG>
#                                                                      every PROGRESS_INTERVAL s (30),
#   WHAT: done in 3m42s                                                at the end.
# When COMMAND fails it prints the last lines of LOG and the log's path, and returns COMMAND's
# status (so `set -e` stops the caller). Messages go through the function named in
# $progress_say (the caller's own `say`/`log`, so they carry its prefix); default: stderr.

progress_say=${progress_say:-progress_default_say}
progress_default_say() { printf '%s\n' "$*" >&2; }

# 75 -> 1m15s, 9 -> 9s
progress_duration() {
  local s=$1
  if [ "$s" -ge 60 ]; then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}

# The last non-empty line of a log, without carriage returns, cut to fit one terminal line.
progress_last_line() {
  [ -s "$1" ] || return 0
  tail -n 5 "$1" 2>/dev/null | tr -d '\r' | sed '/^[[:space:]]*$/d' | tail -n 1 | sed 's/^[[:space:]]*//' | cut -c1-100
}

long_step() {
  local what=$1 usually=$2 log=$3
  shift 3
  local interval=${PROGRESS_INTERVAL:-30} started status=0 heartbeat
  started=$(date +%s)
  mkdir -p "$(dirname "$log")"
  "$progress_say" "$what (usually $usually; log: $log)"
  # The heartbeat runs beside the command and ends with it; it also stops by itself if this
  # shell is gone (killed), so it never outlives the script.
  (
    parent=$$
    next=$((started + interval))
    while kill -0 "$parent" 2>/dev/null; do
      now=$(date +%s)
      if [ "$now" -ge "$next" ]; then
        line=$(progress_last_line "$log")
        "$progress_say" "still $what ($(progress_duration $((now - started))) elapsed, usually $usually; log: $log)${line:+ | $line}"
        next=$((next + interval))
      fi
      sleep 1 </dev/null >/dev/null 2>&1
    done
  ) &
  heartbeat=$!
  "$@" >>"$log" 2>&1 || status=$?
  kill "$heartbeat" 2>/dev/null || true
  wait "$heartbeat" 2>/dev/null || true
  local took
  took=$(progress_duration $(($(date +%s) - started)))
  if [ "$status" -ne 0 ]; then
    {
      echo "--- last lines of $log"
      tail -n 20 "$log"
      echo "---"
    } >&2
    "$progress_say" "$what FAILED after $took (exit status $status); full log: $log"
    return "$status"
  fi
  "$progress_say" "$what: done in $took"
}
