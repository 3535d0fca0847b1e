# Sourced by run_tests.sh and demo.sh: creates or updates .venv from requirements.txt.
# torch is installed in the same pip command as the rest so that pip takes the pinned CPU wheel.
ensure_venv() {
  local stamp=.venv/.requirements.sha256
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [[ -x .venv/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "[venv] installing requirements.txt into .venv" >&2
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
}
