"""Fake coding agent that fails: writes to stderr and exits 1."""

import sys

print("starting", flush=True)
print("error: API key not set (ANTHROPIC_API_KEY)", file=sys.stderr)
sys.exit(1)
