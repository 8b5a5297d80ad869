"""examples/huggingface_causal_lm.py: token-weighted accumulation on a transformers causal LM.

Needs transformers (the ``hf`` extra); skipped where it does not import.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import transformers  # noqa: F401
except Exception:  # a transformers that does not match the torch fails with more than ImportError
    pytest.skip("transformers does not import (the hf extra)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "examples/huggingface_causal_lm.py"
NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]\d+)?)"
EXACT = re.compile(
    rf"^torch_accum vs full-batch token mean: max \|param difference\| = {NUMBER}$", re.MULTILINE
)
NAIVE = re.compile(
    rf"^naive mean of means vs full-batch token mean: max \|param difference\| = {NUMBER}$",
    re.MULTILINE,
)
TOKENS = re.compile(r"holding (\d+) to (\d+) target tokens")


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # One thread: the model is tiny, and oversubscribed threads slow a busy machine down.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def differences(stdout: str) -> tuple[float, float]:
    exact, naive = EXACT.search(stdout), NAIVE.search(stdout)
    assert exact and naive, stdout
    return float(exact.group(1)), float(naive.group(1))


def test_token_weights_match_the_full_batch_where_the_mean_of_means_does_not():
    result = run()
    assert result.returncode == 0, result.stderr[-3000:]
    exact, naive = differences(result.stdout)
    assert exact <= 1e-10
    assert naive >= 1e-6
    # The micro-batches hold different numbers of tokens: the case that weights exist for.
    low, high = TOKENS.search(result.stdout).groups()
    assert int(low) < int(high)
    assert "MATCH: acc.backward(loss, weight=n_tokens) vs full-batch token mean" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_local_checkpoint_with_other_flags(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    size = {"vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2}
    config = GPT2Config(**size, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    result = run(
        *("--model-dir", str(tmp_path), "--accumulation-steps", "3", "--micro-batch-size", "2"),
        *("--steps", "2", "--max-length", "16", "--seed", "1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPT2LMHeadModel with" in result.stdout
    assert "2 optimizer steps of 3 micro-batches" in result.stdout
    exact, naive = differences(result.stdout)
    assert exact <= 1e-10
    assert naive >= 1e-6


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--accumulation-steps", "0"], "--accumulation-steps: expected a positive integer, got 0"),
        (["--tolerance", "-1"], "--tolerance: expected a positive number, got -1.0"),
        (["--max-length", "1"], "--max-length must be at least 2"),
        (["--model-dir", "no/such/dir"], "--model-dir no/such/dir: no config.json there"),
    ],
)
def test_bad_flags_exit_2_with_the_fix(flags, message, capsys):
    # In-process: a subprocess would spend seconds importing transformers for each case.
    import huggingface_causal_lm

    with pytest.raises(SystemExit) as exit_info:
        huggingface_causal_lm.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sequences_longer_than_the_model_exit_2(capsys):
    import huggingface_causal_lm

    assert huggingface_causal_lm.main(["--max-length", "65"]) == 2
    error = capsys.readouterr().err
    assert "--max-length 65 is more than the model's 64 positions; pass a smaller one" in error
