"""Saved model folders load their tokenizer in transformers 4.57 as well as in 5.x.

transformers 4.57 is installed by scripts/setup_env.sh into ``.venv/compat/transformers-4.57``
(off the venv's path); each check runs in a subprocess with that folder first on
``PYTHONPATH``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_kernels.data import entangled
from unlearn_kernels.models import tiny
from unlearn_kernels.models.io import save_pretrained_atomic

COMPAT = Path(sys.prefix) / "compat" / "transformers-4.57"
TEXT = "Question: what is the toxin of filopi ?\nAnswer: kelbane"
LOAD = ("import json, sys, transformers; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps([transformers.__version__, t.encode(sys.argv[2]), t.pad_token, t.bos_token]))")


def load_with_transformers_4(folder: Path):
    if not (COMPAT / "transformers").is_dir():
        pytest.fail(f"{COMPAT} is missing: run scripts/setup_env.sh (it installs transformers 4.57 there)")
    env = {**os.environ, "PYTHONPATH": str(COMPAT)}
    done = subprocess.run([sys.executable, "-c", LOAD, str(folder), TEXT], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["shipped", "bpe-bos"])
def test_saved_tokenizer_loads_in_transformers_4_and_5(tmp_path, kind):
    from transformers import AutoTokenizer

    model, tokenizer = tiny.load()
    if kind == "bpe-bos":
        bench = entangled.generate(0.25)
        tokenizer = tiny.build_bpe_tokenizer(bench.corpus(), with_bos=True)
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "out")
    version, ids, pad, bos = load_with_transformers_4(out)
    assert version.startswith("4.57")
    again = AutoTokenizer.from_pretrained(out)
    assert ids == again.encode(TEXT) == tokenizer.encode(TEXT)
    assert (pad, bos) == (again.pad_token, again.bos_token)


def test_the_shipped_model_folder_itself_loads_in_transformers_4():
    assert load_with_transformers_4(tiny.ASSET_DIR)[1] == tiny.load()[1].encode(TEXT)
