"""KTO against TRL's KTOTrainer (TRL 1.16) as the oracle: the same policy (the demo model with a random LoRA,
merged into a plain model for TRL), the same reference (the base model), the same tokenized batch (TRL's own:
its collator's rows and its KL rows become Duet's examples and their mismatched replies), β = 0.1 and
unequal class weights.

Compared within 1e-4 (float32 log-probs summed over replies of ≤ 60 tokens): the loss, ``kl`` (z0),
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/chosen`` and ``logps/rejected``.

The conventions, where the paper leaves a choice: z0 is the batch's mean log-ratio of the mismatched rows,
detached and clamped at 0, as TRL computes it. TRL picks each example's mismatched reply by rotating the
completions of its batch by one; Duet fixes it once at load time with a seeded shuffle (see
``core.data.unpaired``). Here the mismatched rows are TRL's, so both compute the same thing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL (the oracle) is not installed: pip install -e '.[dev]'")

from backends.torch_backend.backend import TorchBackend  # noqa: E402
from backends.torch_backend.ops import TorchOps  # noqa: E402
from core.batching import collate  # noqa: E402
from core.config import LoraConfig, ObjectiveConfig  # noqa: E402
from core.objectives import PolicyOutputs, build_objective, evaluate  # noqa: E402
from core.tokenization import TokenizedPair  # noqa: E402
from models.tiny_chat import preference_rows  # noqa: E402
from tests.helpers import DEMO_MODEL  # noqa: E402

EXAMPLES = 8
TOLERANCE = 1e-4
WEIGHTS = {"desirable_weight": 1.25, "undesirable_weight": 0.8}
COMPARED = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def policy() -> TorchBackend:
    backend = TorchBackend(device="cpu", dtype="float32")
    backend.load_model(str(DEMO_MODEL))
    backend.seed(0)
    backend.attach_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # a LoRA that moves the policy away from the reference
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.03, generator=torch.Generator().manual_seed(len(name)))
    return backend


def unpaired_rows() -> list[dict]:
    rows = []
    for index, row in enumerate(preference_rows(seed=5, count=EXAMPLES // 2)):
        prompt = [{"role": "user", "content": row["prompt"]}]
        # desirable and undesirable examples interleaved, and not one per pair: 5 of one class, 3 of the other
        label = index % 2 == 0
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": row["chosen"]}], "label": True})
        rows.append(
            {"prompt": prompt, "completion": [{"role": "assistant", "content": row["rejected"]}], "label": label}
        )
    return rows


@pytest.fixture(scope="module")
def trl_side(policy: TorchBackend, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    merged = copy.deepcopy(policy.model).merge_and_unload().eval()
    reference = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    args = KTOConfig(
        output_dir=str(tmp_path_factory.mktemp("kto")),
        per_device_train_batch_size=EXAMPLES,
        beta=0.1,
        max_length=256,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default on a machine with bf16: the prepared reference model would run under autocast
        **WEIGHTS,
    )
    trainer = KTOTrainer(
        model=merged,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(unpaired_rows()),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer._compute_loss(merged, batch, return_outputs=False)
    metrics = {k: float(np.mean(v)) for k, v in trainer._metrics["eval"].items() if v}
    return batch, float(loss), metrics


def _parts(ids: torch.Tensor, attention: torch.Tensor, completion: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, reply ids) of one TRL row, from its attention and completion masks."""
    real = attention.bool()
    ids, completion = ids[real], completion[real].bool()
    return ids[~completion].numpy().astype(np.int32), ids[completion].numpy().astype(np.int32)


def test_kto_equals_trls_kto_trainer_on_the_same_batch(policy: TorchBackend, trl_side) -> None:
    batch, trl_loss, trl_metrics = trl_side
    examples = []
    for i in range(EXAMPLES):
        prompt, reply = _parts(batch["input_ids"][i], batch["attention_mask"][i], batch["completion_mask"][i])
        kl_prompt, kl_reply = _parts(
            batch["KL_input_ids"][i], batch["KL_attention_mask"][i], batch["KL_completion_mask"][i]
        )
        assert np.array_equal(prompt, kl_prompt)
        examples.append(TokenizedPair(i, prompt, reply, kl_reply, label=bool(batch["label"][i])))
    labels = [e.label for e in examples]
    assert 0 < sum(labels) < EXAMPLES  # both classes in the batch
    duet_batch = collate(examples, policy.tokenizer.pad_token_id or 0)
    logps = torch.from_numpy(policy.sequence_logps(duet_batch, adapter=True))
    reference = torch.from_numpy(policy.sequence_logps(duet_batch, adapter=False))
    lengths = torch.from_numpy(duet_batch.response_lengths.astype(np.float64))
    outputs = PolicyOutputs.from_rows(logps, lengths, reference, torch.from_numpy(duet_batch.labels).double())
    objective = build_objective(ObjectiveConfig(name="kto", beta=0.1, **WEIGHTS))
    result = evaluate(objective, TorchOps(), outputs)
    assert float(result.metrics["kl"]) > 0  # the clamp is not what is being compared
    assert float(result.loss) == pytest.approx(trl_loss, abs=TOLERANCE, rel=TOLERANCE)
    for key in COMPARED:
        assert float(result.metrics[key]) == pytest.approx(trl_metrics[key], abs=TOLERANCE, rel=TOLERANCE), key
