"""Fake coding agent that breaks the rules: edits the protected harness and adds a line to
train.py, writes no proposal file and ends with a closing paragraph."""


with open("prepare.py", "a") as f:
    f.write("CHEAT = True\n")
with open("train.py", "a") as f:
    f.write("WARMUP_RATIO = 0.1\n")
print("working...\n\nI made evaluation easier and added warmup.")
