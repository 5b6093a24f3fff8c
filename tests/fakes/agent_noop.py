"""Fake coding agent that reads the prompt and changes nothing."""

import sys

sys.stdin.read()
print("I looked around and found nothing worth changing.")
