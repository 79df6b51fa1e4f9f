"""Run pip-audit on the installed environment; fail on findings, tolerate only no network.

pip-audit asks PyPI's JSON API (or OSV) about every installed distribution. A package it
could not look up is reported as skipped, not vulnerable, so a machine that cannot reach
the advisory service would pass silently: this script says so loudly instead, and exits 0
only in that case or when every audited package is clean.
"""

from __future__ import annotations

import json
import subprocess  # nosec B404
import sys


def main() -> int:
    """Exit status: 1 on any known vulnerability, else 0 (with a warning when unaudited)."""
    cmd = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--skip-editable",
           "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # nosec B603
    try:
        deps = json.loads(proc.stdout)["dependencies"]
    except (ValueError, KeyError):
        err = proc.stderr.strip().splitlines()
        if any(w in proc.stderr for w in ("ConnectionError", "NameResolution", "Timeout")):
            print(f"pip-audit: WARNING: advisory service unreachable, nothing audited: "
                  f"{err[-1] if err else ''}")
            return 0
        print(proc.stdout + proc.stderr)
        return 1
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d]
    for d in vulnerable:
        ids = ", ".join(v["id"] + (f" (fix: {', '.join(v['fix_versions'])})"
                                   if v.get("fix_versions") else "") for v in d["vulns"])
        print(f"pip-audit: {d['name']} {d['version']}: {ids}")
    audited = len(deps) - len(skipped)
    print(f"pip-audit: {audited} distributions audited, {len(vulnerable)} vulnerable, "
          f"{len(skipped)} not audited")
    if skipped and not audited:
        print("pip-audit: WARNING: no distribution could be looked up (PyPI's JSON API "
              "unreachable from here?)")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
