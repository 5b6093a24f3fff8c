"""Fake coding agent: raises MATRIX_LR in train.py and writes a proposal file."""

import json
import os
import re
from pathlib import Path

prompt = Path(os.environ["NIGHTLAB_PROMPT_FILE"]).read_text()
assert "Edit only train.py" in prompt, "the prompt states the rules"
src = Path("train.py").read_text()
Path("train.py").write_text(re.sub(r"^MATRIX_LR = .*$", "MATRIX_LR = 0.05", src, count=1, flags=re.MULTILINE))
Path(os.environ["NIGHTLAB_PROPOSAL_FILE"]).write_text(
    json.dumps({"description": "MATRIX_LR 0.04→0.05", "hypothesis": "A higher Muon LR converges faster."})
)
print("raised MATRIX_LR")
