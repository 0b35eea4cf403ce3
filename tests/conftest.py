"""Offline, CPU-first test kit: tiny random models and an in-memory tokenizer, built in process."""

import os
import subprocess
import sys


# Shared 2-core machines: OpenMP threads spin under contention. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)


torch.set_num_threads(1)

TOKENIZER_TEXTS = [
    "premise: a man plays a guitar. hypothesis: a person makes music. entailment",
    "premise: the cat sleeps. hypothesis: the cat runs. contradiction",
    "What is 2 + 3? 5. What is 7 + 1? 8. The capital of France is Paris.",
    "yes no maybe neutral entailment contradiction 0 1 2 3 4 5 6 7 8 9",
]


# Two gloo ranks on this machine; --standalone lets torchrun take a free port itself (no probe-then-bind race)
TORCHRUN_TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_worker(command: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a worker command; if it fails, fail the test with the tail of its output.

    CI keeps the test report, not the workers' streams: without the tail a failed rank leaves no cause behind.
    """
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited with {result.returncode}\n--- stdout (tail) ---\n{result.stdout[-3000:]}"
            f"\n--- stderr (tail) ---\n{result.stderr[-8000:]}",
            pytrace=False,
        )
    return result


def make_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences (3 ms, no download); round-trips any text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TOKENIZER_TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_llama(
    vocab_size: int = 300, attn_implementation: str = "sdpa", seed: int = 0, initializer_range: float = 0.02
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        initializer_range=initializer_range,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def make_t5(
    vocab_size: int = 300, attn_implementation: str = "sdpa", seed: int = 0, dropout_rate: float = 0.0
) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=dropout_rate,
    )
    config._attn_implementation = attn_implementation
    return T5ForConditionalGeneration(config)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(vocab_size=300)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def tiny_t5() -> T5ForConditionalGeneration:
    return make_t5()


@pytest.fixture
def tiny_model_dir(tmp_path) -> str:
    """A tiny Llama and its tokenizer saved as a model folder (what recipes and experiments load by path)."""
    folder = tmp_path / "tiny"
    make_llama(initializer_range=0.2).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def addition_rows(tokenizer, n: int = 16, seq2seq: bool = False) -> list[dict]:
    """Tokenized "What is a + b?" -> " c" examples of varying lengths; labels only on the answer (causal) or
    the whole target (seq2seq)."""
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        prompt = tokenizer(f"What is {a} + {b}?" + " please" * (i % 3)).input_ids
        answer = tokenizer(f" {a + b}" + "!" * (i % 2)).input_ids + [tokenizer.eos_token_id]
        if seq2seq:
            rows.append({"input_ids": prompt, "attention_mask": [1] * len(prompt), "labels": answer})
        else:
            ids = prompt + answer
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + answer})
    return rows


def delta_config(tmp_path, **overrides):
    from delta_trl import DeltaConfig

    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    defaults.update(overrides)
    return DeltaConfig(**defaults)


LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "t5": ["q", "v", "wo"]}


def make_student_and_teacher(
    kind: str,
    *,
    attn: str = "sdpa",
    r: int = 3,
    teacher_r: int = 2,
    std: float = 0.3,
    dtype: torch.dtype = torch.float64,
):
    """A tiny Llama or T5 with a LoRA student ("default") and teacher ("teacher") on attention and MLP layers, all
    LoRA weights random (non-zero: the teacher's tangent must not see the student)."""
    from peft import LoraConfig, get_peft_model

    from delta_trl.core.adapters import add_teacher_adapter

    base = make_llama(attn_implementation=attn) if kind == "llama" else make_t5(attn_implementation=attn)
    task = "CAUSAL_LM" if kind == "llama" else "SEQ_2_SEQ_LM"
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS[kind], task_type=task)
    model = get_peft_model(base, config)
    add_teacher_adapter(model, "default", "teacher", teacher_r=teacher_r)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)
    return model.to(dtype)
